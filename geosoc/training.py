"""Pretraining (cross-modal contrastive) and fine-tuning (quantile regression): plain torch, any device.

Both loops read a SampleSet, split it (seeded) into training and validation parts, compute normalisation
statistics on the training part only, and write checkpoints under one URL: the best model by validation
loss at the top (`model.safetensors`, `config.json`) and a resumable `last/` (weights, optimizer, epoch,
history). Running again resumes from `last/`. The test fold, when given, is never seen: checkpoints are
chosen on the validation part. A `Context` lets Ray Train run the same loops on several workers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from geosoc import aoa, checkpoint
from geosoc.calibration import conformal_offset, interval
from geosoc.catalog import Catalog, FinetuneConfig, PretrainConfig
from geosoc.errors import GeosocError
from geosoc.metrics import regression_metrics
from geosoc.models import ModelConfig, SoilNet
from geosoc.models.losses import nt_xent, pinball
from geosoc.sampling import open_sampleset
from geosoc.storage import exists, join

log = logging.getLogger(__name__)

IN_MEMORY_LIMIT = 4 * 2**30  # SampleSets smaller than this are loaded whole; larger ones are read per batch
STATS_SAMPLES = 4096  # training samples used to estimate normalisation statistics


@dataclass
class Normalisation:
    """Input and target scaling, estimated on the training split and stored in every checkpoint."""

    band_mean: list[float] = field(default_factory=list)
    band_std: list[float] = field(default_factory=list)
    climate_mean: list[float] = field(default_factory=list)
    climate_std: list[float] = field(default_factory=list)
    log_target: bool = True
    target_mean: float = 0.0
    target_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        return cls(**data)

    def inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        if "patch" in batch and self.band_mean:
            mean = np.asarray(self.band_mean, np.float32)[None, :, None, None]
            std = np.asarray(self.band_std, np.float32)[None, :, None, None]
            out["patch"] = torch.from_numpy(np.nan_to_num((batch["patch"] - mean) / std)).to(device)
        if "climate" in batch and self.climate_mean:
            mean, std = np.asarray(self.climate_mean, np.float32), np.asarray(self.climate_std, np.float32)
            out["climate"] = torch.from_numpy(np.nan_to_num((batch["climate"] - mean) / std)).to(device)
        return out

    def encode_target(self, target: np.ndarray) -> np.ndarray:
        values = np.log1p(target) if self.log_target else target
        return ((values - self.target_mean) / self.target_std).astype(np.float32)

    def decode_target(self, z: np.ndarray) -> np.ndarray:
        values = z * self.target_std + self.target_mean
        return np.expm1(values) if self.log_target else values


class SampleData:
    """A SampleSet's arrays for training: in memory when small, otherwise read from Zarr batch by batch."""

    def __init__(self, url: str, modalities: tuple[str, ...] = ("patch", "climate")):
        self.url = url
        ds = open_sampleset(url)
        self.attrs = dict(ds.attrs)
        self.size = ds.sizes["sample"]
        self.bands = [str(b) for b in ds["band"].values] if "patch" in ds and "patch" in modalities else []
        self.variables = [str(v) for v in ds["variable"].values] if "climate" in ds and "climate" in modalities else []
        self.months = ds.sizes.get("time", 0)
        self.time = ds["time"].values if "time" in ds.coords and self.variables else None
        self.patch_size = ds.sizes.get("py", 0)
        self.fold = ds["fold"].values.astype(np.int64)
        self.target = ds["target"].values.astype(np.float64)
        self.arrays: dict[str, Any] = {
            name: ds[name].data for name, present in (("patch", self.bands), ("climate", self.variables)) if present
        }
        self._loaded = False

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if not self._loaded:  # on first use, so that describing a SampleSet reads no pixels
            self.arrays = {k: a.compute() if a.nbytes < IN_MEMORY_LIMIT else a for k, a in self.arrays.items()}
            self._loaded = True
        order = np.sort(indices)  # contiguous reads from Zarr; the order within a batch does not matter
        out = {name: np.asarray(array[order], dtype=np.float32) for name, array in self.arrays.items()}
        out["target"] = self.target[order]
        return out


def fit_normalisation(data: SampleData, train: np.ndarray, log_target: bool, seed: int) -> Normalisation:
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(train, min(len(train), STATS_SAMPLES), replace=False))
    batch = data.batch(pick)
    norm = Normalisation(log_target=log_target)
    if "patch" in batch:
        norm.band_mean = np.nanmean(batch["patch"], axis=(0, 2, 3)).tolist()
        norm.band_std = (np.nanstd(batch["patch"], axis=(0, 2, 3)) + 1e-6).tolist()
    if "climate" in batch:
        norm.climate_mean = np.nanmean(batch["climate"], axis=(0, 1)).tolist()
        norm.climate_std = (np.nanstd(batch["climate"], axis=(0, 1)) + 1e-6).tolist()
    target = data.target[train]
    target = target[np.isfinite(target)]
    if len(target):
        values = np.log1p(target) if log_target else target
        norm.target_mean, norm.target_std = float(values.mean()), float(values.std() + 1e-6)
    return norm


def augment_patches(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 90-degree rotation and horizontal flip per sample (soil has no preferred orientation)."""
    n = patch.shape[0]
    turns = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = patch.clone()
    for k in range(1, 4):
        chosen = (turns == k).nonzero().flatten().to(patch.device)
        if len(chosen):
            out[chosen] = torch.rot90(out[chosen], k, dims=(2, 3))
    chosen = flips.nonzero().flatten().to(patch.device)
    if len(chosen):
        out[chosen] = torch.flip(out[chosen], dims=(3,))
    return out


def augment_climate(series: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Jitter and per-variable scaling: a second view of a climate series for climate-only pretraining."""
    noise = torch.randn(series.shape, generator=generator).to(series.device) * 0.1
    scale = 1 + torch.randn((series.shape[0], 1, series.shape[2]), generator=generator).to(series.device) * 0.1
    return series * scale + noise


@dataclass
class Context:
    """How a loop runs: this process alone, or one of several Ray Train workers."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
    report: Callable[[dict[str, Any]], None] = lambda metrics: None
    progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def model_config(catalog: Catalog, data: SampleData) -> ModelConfig:
    m = catalog.model
    return ModelConfig(
        bands=data.bands, variables=data.variables, patch_size=data.patch_size, months=data.months,
        image_patch=m.image.patch, image_dim=m.image.dim, image_depth=m.image.depth, image_heads=m.image.heads,
        climate_dim=m.climate.dim, climate_layers=m.climate.layers, climate_heads=m.climate.heads,
        climate_feedforward=m.climate.feedforward, embedding=m.embedding, quantiles=list(m.quantiles),
    )


def split(data: SampleData, validation_fraction: float, seed: int, test_fold: int | None,
          labelled: bool, folds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices; the test fold (if any) and unlabelled rows (if labels needed) excluded.

    `folds` replaces the SampleSet's own (spatial) folds, e.g. a seeded random assignment."""
    usable = np.ones(data.size, dtype=bool)
    folds = data.fold if folds is None else folds
    if test_fold is not None:
        if test_fold not in set(folds[np.isfinite(data.target)].tolist() if labelled else folds.tolist()):
            raise GeosocError(f"{data.url}: no fold {test_fold} to hold out; its folds are "
                              f"{sorted(set(folds.tolist()))}")
        usable &= folds != test_fold
    if labelled:
        usable &= np.isfinite(data.target)
    indices = np.random.default_rng(seed).permutation(np.flatnonzero(usable))
    n_val = max(2, int(round(len(indices) * validation_fraction)))
    if len(indices) < 4:
        raise GeosocError(f"{data.url}: only {len(indices)} usable samples; need at least 4 to train")
    return np.sort(indices[n_val:]), np.sort(indices[:n_val])


def _batches(indices: np.ndarray, size: int, rng: np.random.Generator | None, ctx: Context) -> Iterator[np.ndarray]:
    order = rng.permutation(indices) if rng is not None else indices
    order = order[ctx.rank :: ctx.world]  # each worker its own shard
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        if len(chunk) >= 2:
            yield chunk


def _contrastive_loss(model: SoilNet, inputs: dict[str, torch.Tensor], temperature: float, train: bool,
                      generator: torch.Generator) -> torch.Tensor:
    module = getattr(model, "module", model)
    if module.image is not None and module.climate is not None:
        patch = augment_patches(inputs["patch"], generator) if train else inputs["patch"]
        return nt_xent(module.image(patch), module.climate(inputs["climate"]), temperature)
    if module.image is not None:  # SimCLR: two augmented views of the same patch
        return nt_xent(module.image(augment_patches(inputs["patch"], generator)),
                       module.image(augment_patches(inputs["patch"], generator)), temperature)
    return nt_xent(module.climate(augment_climate(inputs["climate"], generator)),
                   module.climate(augment_climate(inputs["climate"], generator)), temperature)


def pretrain(samples_url: str, out_url: str, config: ModelConfig, stage: PretrainConfig, *, seed: int = 0,
             resume: bool = True, ctx: Context | None = None) -> dict[str, Any]:
    """Contrastive pretraining on (unlabelled) samples; checkpoints under `out_url`."""
    ctx = ctx or Context()
    data = SampleData(samples_url, _modalities(config))
    train, val = split(data, stage.validation_fraction, seed, None, labelled=False)
    norm = fit_normalisation(data, train, log_target=False, seed=seed)

    def loss_fn(model: SoilNet, batch: dict[str, np.ndarray], is_train: bool, gen: torch.Generator) -> tuple:
        return _contrastive_loss(model, norm.inputs(batch, ctx.device), stage.temperature, is_train, gen), None

    return _fit("pretrain", data, train, val, norm, config, stage, out_url, loss_fn, None, seed, resume, ctx,
                patience=None)


def finetune(samples_url: str, out_url: str, config: ModelConfig, stage: FinetuneConfig, *,
             pretrained_url: str | None = None, test_fold: int | None = None, seed: int = 0,
             resume: bool = True, ctx: Context | None = None, folds: np.ndarray | None = None) -> dict[str, Any]:
    """Both branches and the head trained on labelled samples with a pinball loss over the quantiles.

    `folds` (default: the SampleSet's) decides what `test_fold` holds out; it is also the grouping of the
    area-of-applicability reference."""
    ctx = ctx or Context()
    data = SampleData(samples_url, _modalities(config))
    folds = data.fold if folds is None else np.asarray(folds)
    train, val = split(data, stage.validation_fraction, seed, test_fold, labelled=True, folds=folds)
    norm = fit_normalisation(data, train, stage.log_target, seed)
    initial = None
    if pretrained_url is not None:
        saved = Normalisation.from_dict(checkpoint.load_config(pretrained_url)[1]["normalisation"])
        norm.band_mean, norm.band_std = saved.band_mean, saved.band_std  # the encoders learned these inputs
        norm.climate_mean, norm.climate_std = saved.climate_mean, saved.climate_std
        initial = {k: v for k, v in checkpoint.load_weights(pretrained_url).items() if not k.startswith("head.")}
    quantiles = torch.tensor(config.quantiles, dtype=torch.float32, device=ctx.device)

    def loss_fn(model: SoilNet, batch: dict[str, np.ndarray], is_train: bool, gen: torch.Generator) -> tuple:
        inputs = norm.inputs(batch, ctx.device)
        if is_train and "patch" in inputs:
            inputs["patch"] = augment_patches(inputs["patch"], gen)
        target = torch.from_numpy(norm.encode_target(batch["target"])).to(ctx.device)
        prediction = model(inputs)
        return pinball(prediction.float(), target, quantiles), prediction.detach().float().cpu().numpy()

    def evaluate(predictions: np.ndarray, batch_targets: np.ndarray) -> dict[str, float]:
        lower, median, upper = (norm.decode_target(z) for z in interval(predictions, config.quantiles, 0.0))
        return regression_metrics(batch_targets, median, lower, upper)

    result = _fit("finetune", data, train, val, norm, config, stage, out_url, loss_fn, evaluate, seed, resume, ctx,
                  patience=stage.patience, initial=initial,
                  extra={"test_fold": test_fold, "pretrained": pretrained_url, "units": data.attrs.get("units", ""),
                         "folds": _digest(folds)})
    if ctx.is_main:
        calibrate(out_url, data, train, val, norm, stage.batch_size, ctx.device, seed, folds)
    return result


def _digest(values: np.ndarray) -> str:
    """A short fingerprint of an array (the fold assignment a run was made with)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]


def forward_all(model: SoilNet, data: SampleData, indices: np.ndarray, norm: Normalisation, device: torch.device,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(quantiles in the normalised target space, embedding features) of samples, in the order of `indices`."""
    outputs, features = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            order = np.argsort(chunk)  # data.batch returns sorted rows
            batch = norm.inputs(data.batch(chunk), device)
            feats = model.features(batch)
            quantiles = model.quantiles_of(feats)
            restore = np.argsort(order)
            outputs.append(quantiles.float().cpu().numpy()[restore])
            features.append(feats.float().cpu().numpy()[restore])
    return np.concatenate(outputs), np.concatenate(features)


def predict_samples(url: str, data: SampleData, indices: np.ndarray, device: torch.device,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fine-tuned checkpoint's (lower, median, upper) at samples, in the original units, calibrated."""
    model, meta = checkpoint.load_model(url, device)
    norm = Normalisation.from_dict(meta["normalisation"])
    z, _ = forward_all(model, data, indices, norm, device, batch_size)
    lower, median, upper = interval(z, model.config.quantiles, checkpoint.offset_of(meta))
    return norm.decode_target(lower), norm.decode_target(median), norm.decode_target(upper)


def calibrate(url: str, data: SampleData, train: np.ndarray, val: np.ndarray, norm: Normalisation, batch_size: int,
              device: torch.device, seed: int, folds: np.ndarray) -> None:
    """After fine-tuning, from the best checkpoint: the CQR offset of its interval, fitted on the validation part,
    and the area-of-applicability reference of the samples it learned from (training and validation parts).
    Nothing is redone when both are already there for the best epoch (a re-run that trained nothing)."""
    saved = checkpoint.load_config(url)[1]
    best_epoch = saved.get("epoch")
    if checkpoint.calibration_of(saved).get("epoch") == best_epoch and exists(join(url, checkpoint.AOA_FILE)):
        return
    model, meta = checkpoint.load_model(url, device)
    quantiles = model.config.quantiles
    level = round(quantiles[-1] - quantiles[0], 6)
    z_val, _ = forward_all(model, data, val, norm, device, batch_size)
    offset = conformal_offset(z_val[:, 0], z_val[:, -1], norm.encode_target(data.target[val]), level)
    fitted = np.sort(np.concatenate([train, val]))
    _, features = forward_all(model, data, fitted, norm, device, batch_size)
    checkpoint.save_aoa(url, aoa.fit(features, folds[fitted], seed))
    checkpoint.update_meta(url, {"calibration": {"method": "cqr", "level": level, "offset": offset,
                                                 "samples": len(val), "epoch": best_epoch}})


def _modalities(config: ModelConfig) -> tuple[str, ...]:
    return tuple(name for name, present in (("patch", config.bands), ("climate", config.variables)) if present)


def _fit(stage_name: str, data: SampleData, train: np.ndarray, val: np.ndarray, norm: Normalisation,
         config: ModelConfig, stage: Any, out_url: str, loss_fn: Callable, evaluate: Callable | None, seed: int,
         resume: bool, ctx: Context, patience: int | None, initial: dict[str, torch.Tensor] | None = None,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = SoilNet(config)
    if initial is not None:
        model.load_state_dict(initial, strict=False)
    model = ctx.wrap(model.to(ctx.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=stage.learning_rate)
    last = join(out_url, "last")
    start, history, best = 0, [], math.inf
    meta = {"stage": stage_name, "normalisation": norm.to_dict(), "samples": data.url, "seed": seed, **(extra or {})}
    run = {k: meta.get(k) for k in ("stage", "samples", "seed", "test_fold", "pretrained", "folds")}
    if resume and checkpoint.exists(last):
        info = checkpoint.state_info(last)
        if info.get("run") != run:
            raise GeosocError(
                f"{out_url} holds another run ({_describe_run(info.get('run'))}); this one is {_describe_run(run)}. "
                "Pass --fresh to start over there, or write this run elsewhere"
            )
        getattr(model, "module", model).load_state_dict(checkpoint.load_weights(last))
        checkpoint.load_state(last, optimizer)
        start, history, best = info["epoch"], info["history"], info["best"]
        log.info("%s: resuming from %s at epoch %d", stage_name, last, start)
    generator = torch.Generator().manual_seed(seed + ctx.rank)
    autocast = torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
    stale = 0
    for epoch in range(start, stage.epochs):
        rng = np.random.default_rng([seed, epoch])
        model.train()
        losses = []
        batches = list(_batches(train, stage.batch_size, rng, ctx))
        for indices in tqdm(batches, desc=f"{stage_name} {epoch + 1}/{stage.epochs}", leave=False,
                            disable=not (ctx.progress and ctx.is_main)):
            with autocast:
                loss, _ = loss_fn(model, data.batch(indices), True, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        metrics.update(_validate(model, data, val, stage.batch_size, loss_fn, evaluate, generator, autocast))
        history.append(metrics)
        improved = metrics["val_loss"] < best
        if improved:
            best, stale = metrics["val_loss"], 0
        else:
            stale += 1
        if ctx.is_main:
            if improved:
                checkpoint.save_model(out_url, model, config, {**meta, "epoch": epoch + 1, "metrics": metrics})
            checkpoint.save_model(last, model, config, meta)
            checkpoint.save_state(last, optimizer, {"epoch": epoch + 1, "history": history, "best": best, "run": run})
            tqdm.write(_format(stage_name, metrics)) if ctx.progress else log.info(_format(stage_name, metrics))
        ctx.report(metrics)
        if patience is not None and stale >= patience:
            log.info("%s: no validation improvement for %d epochs; stopping", stage_name, patience)
            break
    return {"best_val_loss": best, "history": history, "checkpoint": out_url}


def _describe_run(run: dict[str, Any] | None) -> str:
    if not run:
        return "a run made by an older geosoc, without a record of what defines it"
    held = "no test fold" if run.get("test_fold") is None else f"test fold {run['test_fold']} held out"
    origin = "from pretrained encoders" if run.get("pretrained") else "from scratch"
    return f"{run.get('stage')} of {run.get('samples')}, {held}, {origin}, seed {run.get('seed')}"


def _validate(model: torch.nn.Module, data: SampleData, val: np.ndarray, batch_size: int, loss_fn: Callable,
              evaluate: Callable | None, generator: torch.Generator, autocast: Any) -> dict[str, float]:
    model.eval()
    losses, weights, predictions, targets = [], [], [], []
    single = Context()  # validation is not sharded: every worker sees the same numbers
    with torch.no_grad(), autocast:
        for indices in _batches(val, batch_size, None, single) if len(val) >= 2 else []:
            batch = data.batch(indices)
            loss, prediction = loss_fn(model, batch, False, generator)
            losses.append(loss.item())
            weights.append(len(indices))
            if prediction is not None:
                predictions.append(prediction)
                targets.append(batch["target"])
    out = {"val_loss": float(np.average(losses, weights=weights)) if losses else float("nan")}
    if evaluate is not None and predictions:
        out.update({f"val_{k}": v for k, v in evaluate(np.concatenate(predictions), np.concatenate(targets)).items()})
    return out


def _format(stage: str, metrics: dict[str, Any]) -> str:
    return f"{stage} " + "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def stage_urls(root: str) -> dict[str, str]:
    """Where each stage reads and writes under a region root."""
    from geosoc.sampling import samples_url

    return {
        "unlabelled": samples_url(root, "unlabelled"),
        "labelled": samples_url(root, "labelled"),
        "pretrain": join(root, "models", "pretrain"),
        "finetune": join(root, "models", "finetune"),
    }


def pretrain_region(catalog: Catalog, root: str, *, epochs: int | None = None, batch_size: int | None = None,
                    samples: str | None = None, resume: bool = True, ctx: Context | None = None) -> dict[str, Any]:
    """`geosoc pretrain`: the catalog's pretraining on the region's unlabelled SampleSet."""
    urls = stage_urls(root)
    samples = samples or urls["unlabelled"]
    config = model_config(catalog, SampleData(samples))
    stage = _override(catalog.training.pretrain, epochs, batch_size)
    return pretrain(samples, urls["pretrain"], config, stage, seed=catalog.training.seed, resume=resume, ctx=ctx)


def finetune_region(catalog: Catalog, root: str, *, epochs: int | None = None, batch_size: int | None = None,
                    samples: str | None = None, test_fold: int | None = None, pretrained: str | None | bool = True,
                    resume: bool = True, ctx: Context | None = None, out: str | None = None,
                    folds: np.ndarray | None = None, seed: int | None = None) -> dict[str, Any]:
    """`geosoc finetune` (and each network run of `geosoc evaluate`): from the region's pretrained encoders when
    there are any (`pretrained=False`: not), into `out` (default models/finetune)."""
    urls = stage_urls(root)
    samples = samples or urls["labelled"]
    if pretrained is True:
        pretrained = urls["pretrain"] if checkpoint.exists(urls["pretrain"]) else None
    if pretrained:
        config = checkpoint.load_config(pretrained)[0]
        config.quantiles = list(catalog.model.quantiles)
        data = SampleData(samples)
        if (config.bands, config.variables) != (data.bands, data.variables):
            raise GeosocError(
                f"{samples} has bands {data.bands} and variables {data.variables}, but the pretrained model at "
                f"{pretrained} expects {config.bands} and {config.variables}"
            )
    else:
        config = model_config(catalog, SampleData(samples))
    stage = _override(catalog.training.finetune, epochs, batch_size)
    return finetune(samples, out or urls["finetune"], config, stage, pretrained_url=pretrained or None,
                    test_fold=test_fold, seed=catalog.training.seed if seed is None else seed, resume=resume, ctx=ctx,
                    folds=folds)


def _override(stage: Any, epochs: int | None, batch_size: int | None) -> Any:
    updates = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    return stage.model_copy(update=updates)
