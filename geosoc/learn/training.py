"""Pretraining (cross-modal contrastive) and fine-tuning (quantile regression): plain torch, any device.

Both loops read a SampleSet, split it (seeded) into training and validation parts, compute normalisation
statistics on the training part only, and write checkpoints under one URL: the best model by validation
loss at the top (`model.safetensors`, `config.json`) and a resumable `last/` (weights, optimizer, epoch,
history). Running again resumes from `last/`. The test fold, when given, is never seen: checkpoints are
chosen on the validation part. A `Context` lets Ray Train run the same loops on several workers.

Batches come from `streaming.SampleStream` through a DataLoader (any SampleSet size, equal steps per rank);
normalisation and augmentation run on the training device; every loss comes from a forward pass of the
(possibly DistributedDataParallel-wrapped) model, so gradients are averaged over workers.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from geosoc.catalog import Catalog, FinetuneConfig, ModelConfig, PretrainConfig, StageConfig
from geosoc.data.streaming import SampleData, SampleStream, data_loader, on_device, to_device
from geosoc.errors import IncompatibleError, InputError
from geosoc.fingerprints import fingerprint
from geosoc.io.bars import progress_bar
from geosoc.io.locks import exclusive
from geosoc.io.storage import check_writable, join
from geosoc.learn import checkpoint, collective, ensemble
from geosoc.learn.device import precision, resolve_device
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.models.losses import nt_xent, pinball
from geosoc.learn.normalisation import Normalisation
from geosoc.learn.sizing import resolve_model, sizes_of
from geosoc.stats import aoa
from geosoc.stats.calibration import conformal_offset, conformal_quantile, covering_scores, interval
from geosoc.stats.metrics import regression_metrics
from geosoc.stopwatch import phase

log = logging.getLogger(__name__)

STATS_SAMPLES = 4096  # training samples used to estimate normalisation statistics
STATS_BATCH_BYTES = 16 * 2**20  # ... read this much at a time (bounded memory whatever the SampleSet)


def fit_normalisation(data: SampleData, train: np.ndarray, log_target: bool, seed: int) -> Normalisation:
    """Per-band and per-variable mean and standard deviation over up to STATS_SAMPLES training samples (whole
    chunks of them when streamed), accumulated batch by batch so that memory stays bounded."""
    pick = np.sort(data.chunk_order(train, np.random.default_rng(seed))[:STATS_SAMPLES])
    sums: dict[str, np.ndarray] = {}
    step = max(1, STATS_BATCH_BYTES // max(1, data.nbytes // max(1, data.size)))
    for start in range(0, len(pick), step):
        batch = data.rows(pick[start : start + step])
        for name, axes in (("patch", (0, 2, 3)), ("climate", (0, 1))):
            if name in batch:
                values = batch[name].astype(np.float64)
                finite = np.isfinite(values)
                part = np.stack([finite.sum(axis=axes), np.where(finite, values, 0).sum(axis=axes),
                                 np.where(finite, values**2, 0).sum(axis=axes)])
                sums[name] = sums[name] + part if name in sums else part
    norm = Normalisation(log_target=log_target)
    for name, (count, total, squares) in sums.items():
        mean = total / np.maximum(count, 1)
        std = np.sqrt(np.maximum(squares / np.maximum(count, 1) - mean**2, 0)) + 1e-6
        if name == "patch":
            norm.band_mean, norm.band_std = mean.tolist(), std.tolist()
        else:
            norm.climate_mean, norm.climate_std = mean.tolist(), std.tolist()
    target = data.target[train]
    target = target[np.isfinite(target)]
    if len(target):
        values = np.log1p(target) if log_target else target
        norm.target_mean, norm.target_std = float(values.mean()), float(values.std() + 1e-6)
    return norm


def augment_patches(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the 8 symmetries of the square per sample (90-degree rotations and flips: soil has no preferred
    orientation), as whole-batch tensor ops on the patch's device. `generator` lives on that device."""
    flips = torch.rand((3, patch.shape[0], 1, 1, 1), generator=generator, device=patch.device) < 0.5
    out = torch.where(flips[0], patch.transpose(2, 3), patch)
    out = torch.where(flips[1], out.flip(3), out)
    return torch.where(flips[2], out.flip(2), out)


def augment_climate(series: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Jitter and per-variable scaling: a second view of a climate series for climate-only pretraining."""
    noise = torch.randn(series.shape, generator=generator, device=series.device) * 0.1
    scale = 1 + torch.randn((series.shape[0], 1, series.shape[2]), generator=generator, device=series.device) * 0.1
    return series * scale + noise


@dataclass
class Context:
    """How a loop runs: this process alone, or one of several Ray Train workers."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=resolve_device)
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
    report: Callable[[dict[str, Any], str | None], None] = lambda metrics, checkpoint_url: None  # url: rank 0
    progress: bool = True
    loader_workers: int | None = None  # DataLoader processes (default: streaming.loader_workers)
    lock: bool = True  # rank 0 takes the checkpoint's one-writer lock (False: a Ray job's driver holds it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def model_config(catalog: Catalog, data: SampleData, labelled: bool, like: ModelConfig | None = None) -> NetworkConfig:
    """The catalog's architecture on the SampleSet's bands, variables, patch size and months, its unset sizes
    chosen for the samples a stage learns from: the labelled ones (`labelled`, fine-tuning) or all (or `like`'s)."""
    samples = int(np.isfinite(data.target).sum()) if labelled else data.size
    return network_config(catalog.model, data.bands, data.variables, data.patch_size, data.months, samples, like)


def network_config(m: ModelConfig, bands: list[str], variables: list[str], patch_size: int, months: int,
                   samples: int, like: ModelConfig | None = None) -> NetworkConfig:
    """A `model:` section resolved against the data's shape and size (`samples`, or the sizes of `like`: see
    `sizing.resolve_model`; also what `predict --dry-run` sizes from)."""
    m = resolve_model(m, samples, like)
    image, climate = m.image.model_dump(), m.climate.model_dump()
    return NetworkConfig(
        bands=bands, variables=variables, patch_size=patch_size, months=months,
        image_patch=image["patch"], image_dim=image["dim"], image_depth=image["depth"], image_heads=image["heads"],
        climate_dim=climate["dim"], climate_layers=climate["layers"], climate_heads=climate["heads"],
        climate_feedforward=climate["feedforward"], embedding=m.model_dump()["embedding"],
        quantiles=list(m.quantiles), nodata_mask=True, centre_pixel=m.image.centre_pixel,
    )


def finetune_network(catalog: Catalog, samples: str, pretrained: str | None, like: str | None = None) -> NetworkConfig:
    """The network fine-tuning trains: the pretrained encoders' (`pretrained`) with the catalog's quantiles; from
    scratch, the catalog's model for the labelled samples, its unset sizes those of the encoders at `like` when
    given (the region's pretrained ones: `supervised` is then the same network as `ssl`, without pretraining)."""
    data = SampleData(samples)
    if pretrained is None:
        return model_config(catalog, data, labelled=True,
                            like=sizes_of(checkpoint.load_config(like)[0]) if like is not None else None)
    config = checkpoint.load_config(pretrained)[0]  # the encoders'; the head is the catalog's
    config.quantiles, config.centre_pixel = list(catalog.model.quantiles), catalog.model.image.centre_pixel
    if (config.bands, config.variables) != (data.bands, data.variables):
        raise IncompatibleError(
            f"{samples} has bands {data.bands} and variables {data.variables}, but the pretrained model at "
            f"{pretrained} expects {config.bands} and {config.variables}"
        )
    return config


MIN_CALIBRATION = 19  # validation samples at least: the 90 % CQR quantile, rank ceil(0.9 (n + 1)), is then not
# the single worst residual (it is for n < 19: with 11 samples the offset was the largest validation error)


def split(data: SampleData, validation_fraction: float, seed: int, test_fold: int | None,
          labelled: bool, folds: np.ndarray | None = None, group: int = 0,
          groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices; the test fold (if any) and unlabelled rows (if labels needed) excluded.

    With labels (fine-tuning, whose validation part picks the epoch and calibrates the interval), the validation
    part is whole spatial blocks of the SampleSet's fold grid, like the held-out fold it stands in for, of at
    least `validation_fraction` of the samples and at least MIN_CALIBRATION (at most half of them); a random share
    of that size where every sample lies in one block or the SampleSet has no block grid. Without labels, a random
    `validation_fraction`.
    `folds` replaces the SampleSet's own (spatial) folds, e.g. a seeded random assignment. With `groups` G > 1
    the same draw yields G disjoint validation parts of that size, and this is part `group` of them."""
    if not 0 <= group < groups:
        raise ValueError(f"validation group {group} of {groups}")
    usable = np.ones(data.size, dtype=bool)
    folds = data.fold if folds is None else folds
    if test_fold is not None:
        if test_fold not in set(folds[np.isfinite(data.target)].tolist() if labelled else folds.tolist()):
            raise InputError(f"{data.url}: no fold {test_fold} to hold out; its folds are "
                             f"{sorted(set(folds.tolist()))}")
        usable &= folds != test_fold
    if labelled:
        usable &= np.isfinite(data.target)
    indices = np.random.default_rng(seed).permutation(np.flatnonzero(usable))
    n_val = max(2, int(round(len(indices) * validation_fraction)))
    if len(indices) < 4:
        raise InputError(f"{data.url}: only {len(indices)} usable samples; need at least 4 to train")
    wanted = max(n_val, MIN_CALIBRATION) if labelled else n_val
    half = len(indices) // 2  # the most any validation part may hold out, however drawn
    if groups > 1 and groups * wanted > half:
        raise InputError(f"{data.url}: {groups} validation groups of at least {wanted} samples each would together "
                         f"hold out more than half of its {len(indices)} usable samples; use fewer groups "
                         "(finetune.validation_groups) or a smaller finetune.validation_fraction")
    if labelled:
        held = _validation_blocks(data, indices, wanted, seed, group, groups)
        if held is not None:
            return np.sort(indices[~held]), np.sort(indices[held])
    size = min(wanted, half) if labelled else n_val  # a random share: the same rule as the blocks
    part = np.zeros(len(indices), dtype=bool)
    part[group * size:(group + 1) * size] = True
    return np.sort(indices[~part]), np.sort(indices[part])


def _validation_blocks(data: SampleData, indices: np.ndarray, wanted: int, seed: int, group: int = 0,
                       groups: int = 1) -> np.ndarray | None:
    """Which of `indices` form validation part `group` of `groups`: whole blocks of side `data.block_size`, taken
    in one seeded order, part after part, each until at least `wanted` samples, passing over a block that would
    take more than half of them (it stays on offer to the next part). None (a random share instead, for every
    part) when the SampleSet has no block grid, the samples lie in fewer than two blocks or no block fits. Every
    part is drawn, whichever is asked for, so that a part too small to calibrate stops the first member, before
    any training."""
    if data.block_size <= 0:
        return None
    keys = np.stack([np.floor(data.x[indices] / data.block_size), np.floor(data.y[indices] / data.block_size)], 1)
    blocks, block_of = np.unique(keys, axis=0, return_inverse=True)
    if len(blocks) < 2:
        return None
    sizes = np.bincount(block_of.ravel(), minlength=len(blocks))
    left = list(np.random.default_rng(seed).permutation(len(blocks)))
    parts = []
    for _ in range(groups):
        chosen, count = [], 0
        for block in left:
            if count >= wanted:
                break
            if count + sizes[block] <= len(indices) // 2:
                chosen.append(block)
                count += sizes[block]
        taken = set(chosen)
        left = [block for block in left if block not in taken]
        parts.append((chosen, count))
    if not parts[0][0]:
        return None
    if groups > 1 and (short := [i + 1 for i, (_, count) in enumerate(parts) if count < MIN_CALIBRATION]):
        raise InputError(f"{data.url}: its {len(blocks)} spatial blocks leave validation part(s) "
                         f"{', '.join(map(str, short))} of {groups} under {MIN_CALIBRATION} samples; use fewer "
                         "finetune.validation_groups or a smaller sampling.fold_block_size")
    return np.isin(block_of.ravel(), parts[group][0])


def contrastive_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], temperature: float, train: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """NT-Xent between the two views of each location: image and climate, or (one modality) two augmentations.

    The forward goes through `model` itself, so that DistributedDataParallel arms its gradient all-reduce; in
    training the negatives are gathered from every worker."""
    config = cast(NetworkConfig, getattr(model, "module", model).config)
    if config.bands and config.variables:
        patch = augment_patches(inputs["patch"], generator) if train else inputs["patch"]
        embeddings = model({"patch": patch, "climate": inputs["climate"]}, output="embeddings")
        a, b = embeddings["image"], embeddings["climate"]
    elif config.bands:  # SimCLR: two augmented views of the same patch, in one forward pass
        views = torch.cat([augment_patches(inputs["patch"], generator) for _ in range(2)])
        a, b = model({"patch": views}, output="embeddings")["image"].chunk(2)
    else:
        views = torch.cat([augment_climate(inputs["climate"], generator) for _ in range(2)])
        a, b = model({"climate": views}, output="embeddings")["climate"].chunk(2)
    return nt_xent(a, b, temperature, gather=train)


@contextmanager
def _one_writer(out_url: str, ctx: Context, what: str) -> Iterator[None]:
    """The checkpoint's one-writer lock for the block, taken by the writer (rank 0) unless the Ray job's driver
    holds it for the workers (`ctx.lock`). Taking it, or the writability check without it, comes before any work,
    so a read-only root fails now and not after an epoch (and only rank 0 probes: ranks probing side by side
    removed each other's new folders)."""
    if ctx.is_main and ctx.lock:
        with exclusive(out_url, what):
            yield
        return
    if ctx.is_main:
        check_writable(out_url)
    yield


def pretrain(samples_url: str, out_url: str, config: NetworkConfig, stage: PretrainConfig, *, seed: int = 0,
             resume: bool = True, ctx: Context | None = None) -> dict[str, Any]:
    """Contrastive pretraining on (unlabelled) samples; checkpoints under `out_url`."""
    ctx = ctx or Context()
    with _one_writer(out_url, ctx, "pretrain"):
        data = SampleData(samples_url, _modalities(config))
        train, val = split(data, stage.validation_fraction, seed, None, labelled=False)
        norm = fit_normalisation(data, train, log_target=False, seed=seed)

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], is_train: bool,
                    gen: torch.Generator) -> tuple[torch.Tensor, None]:
            return contrastive_loss(model, norm.apply(batch), stage.temperature, is_train, gen), None

        return _fit("pretrain", data, train, val, norm, config, stage, out_url, loss_fn, None, seed, resume, ctx,
                    patience=None)


def finetune(samples_url: str, out_url: str, config: NetworkConfig, stage: FinetuneConfig, *,
             pretrained_url: str | None = None, test_fold: int | None = None, seed: int = 0,
             resume: bool = True, ctx: Context | None = None, folds: np.ndarray | None = None,
             validation_seed: int | None = None, validation_group: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Both branches and the head trained on labelled samples with a pinball loss over the quantiles.

    `folds` (default: the SampleSet's) decides what `test_fold` holds out; it is also the grouping of the
    area-of-applicability reference. `validation_seed` (default `seed`) draws the validation blocks: an
    ensemble's members share that draw, so that the ensemble can be calibrated as one. `validation_group`
    (g, G): this run holds out part g of G disjoint parts of that draw (see `split`)."""
    ctx = ctx or Context()
    with _one_writer(out_url, ctx, "finetune"):
        return _finetune(samples_url, out_url, config, stage, pretrained_url, test_fold, seed, resume, ctx, folds,
                         seed if validation_seed is None else validation_seed, validation_group)


def _finetune(samples_url: str, out_url: str, config: NetworkConfig, stage: FinetuneConfig, pretrained_url: str | None,
              test_fold: int | None, seed: int, resume: bool, ctx: Context, folds: np.ndarray | None,
              validation_seed: int, validation_group: tuple[int, int]) -> dict[str, Any]:
    data = SampleData(samples_url, _modalities(config))
    folds = data.fold if folds is None else np.asarray(folds)
    group, groups = validation_group
    train, val = split(data, stage.validation_fraction, validation_seed, test_fold, labelled=True, folds=folds,
                       group=group, groups=groups)
    norm = fit_normalisation(data, train, stage.log_target, seed)
    if pretrained_url is not None:
        saved = checkpoint.normalisation(pretrained_url, checkpoint.load_config(pretrained_url)[1])
        norm.band_mean, norm.band_std = saved.band_mean, saved.band_std  # the encoders learned these inputs
        norm.climate_mean, norm.climate_std = saved.climate_mean, saved.climate_std
    quantiles = torch.tensor(config.quantiles, dtype=torch.float32, device=ctx.device)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], is_train: bool,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = norm.apply(batch)
        if is_train and "patch" in inputs:
            inputs["patch"] = augment_patches(inputs["patch"], gen)
        prediction = model(inputs).float()
        return pinball(prediction, norm.encode_target_tensor(batch["target"]), quantiles), prediction.detach()

    def evaluate(predictions: np.ndarray, batch_targets: np.ndarray) -> dict[str, float]:
        lower, median, upper = (norm.decode_target(z) for z in interval(predictions, config.quantiles, 0.0))
        return regression_metrics(batch_targets, median, lower, upper)

    result = _fit("finetune", data, train, val, norm, config, stage, out_url, loss_fn, evaluate, seed, resume, ctx,
                  patience=stage.patience, pretrained_url=pretrained_url,
                  extra={"test_fold": test_fold, "pretrained": pretrained_url, "units": data.attrs.get("units", ""),
                         "folds": _digest(folds), "validation_seed": validation_seed, "validation_part": group + 1})
    if ctx.is_main:
        with phase("calibrate"):
            calibrate(out_url, data, train, val, norm, stage.batch_size, ctx.device, seed, folds)
    return {**result, "validation": val}


def _digest(values: np.ndarray) -> str:
    """A short fingerprint of an array (the fold assignment a run was made with)."""
    return fingerprint(np.ascontiguousarray(values, dtype=np.int64).tobytes())


def forward_all(model: SoilNet, data: SampleData, indices: np.ndarray, norm: Normalisation, device: torch.device,
                batch_size: int, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(quantiles in the normalised target space, embedding features) of samples, in the order of `indices`."""
    unique, inverse = np.unique(indices, return_inverse=True)
    stream = SampleStream(data, unique, batch_size, shuffle=False, min_batch=1)
    outputs, features, order = [], [], []
    model.eval()
    with torch.no_grad(), precision(device):  # as maps compute: the calibrated interval is the mapped one
        for batch in data_loader(stream, device, workers):  # loader workers may interleave batches
            feats = model.features(norm.apply(to_device(batch, device))).float()  # exactly as the map's Predictor
            outputs.append(model.quantiles_of(feats).float())
            features.append(feats)
            order.append(batch["index"])
    if not outputs:
        return np.empty((0, len(model.config.quantiles)), np.float32), np.empty((0, 0), np.float32)
    rows = np.searchsorted(unique, torch.cat(order).numpy())  # where each output row belongs among `unique`

    def in_order(parts: list[torch.Tensor]) -> np.ndarray:
        values = torch.cat(parts).cpu().numpy()
        placed = np.empty_like(values)
        placed[rows] = values
        return placed[inverse]

    return in_order(outputs), in_order(features)


def predict_samples(url: str, data: SampleData, indices: np.ndarray, device: torch.device,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fine-tuned checkpoint's (lower, median, upper) at samples, in the original units, calibrated; of an
    ensemble, the members' averaged."""
    return ensemble.mean_interval(member_predictions(url, data, indices, device, batch_size))


def member_predictions(url: str, data: SampleData, indices: np.ndarray, device: torch.device,
                       batch_size: int = 256) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each ensemble member's (lower, median, upper) at samples, in the original units, calibrated."""
    parts = []
    for member in ensemble.load_members(url, device)[0]:
        z, _ = forward_all(member.model, data, indices, member.norm, device, batch_size)
        parts.append(member.decoded_interval(z))
    return parts


def calibrate(url: str, data: SampleData, train: np.ndarray, val: np.ndarray, norm: Normalisation, batch_size: int,
              device: torch.device, seed: int, folds: np.ndarray) -> None:
    """After fine-tuning, from the best checkpoint: the CQR offset of its interval, fitted on the validation part,
    and the area-of-applicability reference of the samples it learned from (training and validation parts).
    Nothing is redone when both are already there for the best epoch (a re-run that trained nothing)."""
    saved = checkpoint.load_config(url)[1]
    best_epoch = saved.get("epoch")
    if checkpoint.calibration_of(saved).get("epoch") == best_epoch and checkpoint.has_file(url, checkpoint.AOA_FILE):
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


def calibrate_ensemble(url: str, data: SampleData, parts: list[tuple[list[int], np.ndarray]], batch_size: int,
                       device: torch.device) -> None:
    """One CQR offset for the ensemble at `url`, written into every member: its interval is the mean of the
    members' widened, decoded bounds (`ensemble.mean_interval`), and the offset makes that mean cover on the
    validation blocks. Each member's own offset covers its own errors; the mean's are smaller, so the mean of such
    intervals over-covered (PICP90 0.96 on Edgeroi) and was wider than it needed to be. `parts`: (members,
    their shared validation indices) per validation group; a part's samples are scored by the mean of the members
    that held it out, and the scores of all parts pool into one quantile."""
    members, meta = ensemble.load_members(url, device)
    scores = []
    for chosen, val in parts:
        group = [members[i] for i in chosen]
        raw = [forward_all(m.model, data, val, m.norm, device, batch_size)[0] for m in group]

        def bounds(offsets: np.ndarray, group: list[ensemble.Member] = group,
                   raw: list[np.ndarray] = raw) -> tuple[np.ndarray, np.ndarray]:
            widened = [member.decoded_interval(z, offsets) for member, z in zip(group, raw, strict=True)]
            lower, _, upper = ensemble.mean_interval(widened)
            return lower, upper

        scores.append(covering_scores(bounds, data.target[val]))
    offset = conformal_quantile(np.concatenate(scores), checkpoint.calibration_of(meta).get("level", 0.9))
    for member_url in ensemble.member_urls(url, meta):
        own = checkpoint.calibration_of(member_url)
        checkpoint.update_meta(member_url, {"calibration": {**own, "method": "cqr-ensemble", "offset": offset,
                                                            "members": len(members), "parts": len(parts),
                                                            "samples": sum(len(val) for _, val in parts)}})


def _modalities(config: NetworkConfig) -> tuple[str, ...]:
    return tuple(name for name, present in (("patch", config.bands), ("climate", config.variables)) if present)


RUN_KEYS = ("stage", "samples", "seed", "test_fold", "pretrained", "folds")  # what defines a run, for resuming


def _unset_run_keys(seed: int) -> dict[str, Any]:
    """What defines a run only where set, each with the value that a run without it had: an ensemble member's
    validation draw (the run's own seed) and part (the first), the validation share (the default). Recorded only
    where they differ, so a run saved before they existed keeps its identity (one with another share is refused:
    resume it with --fresh)."""
    return {"validation_seed": seed, "validation_part": 1,
            "validation_fraction": StageConfig.model_fields["validation_fraction"].default}


def _fit(stage_name: str, data: SampleData, train: np.ndarray, val: np.ndarray, norm: Normalisation,
         config: NetworkConfig, stage: Any, out_url: str, loss_fn: Callable, evaluate: Callable | None, seed: int,
         resume: bool, ctx: Context, patience: int | None, pretrained_url: str | None = None,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = SoilNet(config)
    if pretrained_url is not None:  # the pretrained encoders (the head is trained afresh)
        checkpoint.fit_weights(pretrained_url, net, checkpoint.load_weights(pretrained_url), skip="head.")
    if stage_name == "pretrain":  # the head is not trained by the contrastive loss (DDP needs every other
        net.head.requires_grad_(False)  # parameter to get a gradient) and is dropped by fine-tuning
    model = ctx.wrap(net.to(ctx.device))
    optimizer = make_optimizer(model, stage.learning_rate, ctx.device)
    last = join(out_url, "last")
    start, history, best, stale, saved_rng = 0, [], math.inf, 0, None
    unset = _unset_run_keys(seed)
    given = {"validation_fraction": stage.validation_fraction, **(extra or {})}
    meta = {"stage": stage_name, "normalisation": norm.to_dict(), "samples": data.url, "seed": seed,
            **{k: v for k, v in given.items() if k not in unset or v != unset[k]}}
    run = {k: meta.get(k) for k in RUN_KEYS} | {k: meta[k] for k in unset if k in meta}
    if resume and checkpoint.is_checkpoint(last):
        saved = checkpoint.snapshot(last)  # one save: weights, optimizer and epoch all come from it
        info = checkpoint.state_info(last, saved)
        if info.get("run") != run:
            raise IncompatibleError(
                f"{out_url} holds another run ({_describe_run(info.get('run'))}); this one is {_describe_run(run)}. "
                "Pass --fresh to start over there, or write this run elsewhere"
            )
        checkpoint.fit_weights(last, getattr(model, "module", model), checkpoint.load_weights(last, saved))
        checkpoint.load_state(last, optimizer, saved)
        start, history, best = info["epoch"], info["history"], info["best"]
        stale, saved_rng = int(info.get("stale", 0)), info.get("rng")
        log.info("%s: resuming from %s at epoch %d", stage_name, last, start)
    if collective.from_rank0([start, stale], ctx) != [start, stale]:  # "nothing left to train" alike on all ranks
        raise IncompatibleError(f"{last}: worker {ctx.rank} read another save than worker 0 (it changed while they "
                                "read it); run again to resume from one save")
    stream = SampleStream(data, train, stage.batch_size, shuffle=True, seed=seed, rank=ctx.rank, world=ctx.world)
    if not len(stream):
        raise InputError(f"{data.url}: {len(train)} training samples over {ctx.world} worker(s) leave fewer than 2 "
                         "per worker; use fewer workers or more samples")
    loader = data_loader(stream, ctx.device, ctx.loader_workers)
    generator = torch.Generator(device=ctx.device).manual_seed(seed + ctx.rank)
    if saved_rng is not None and ctx.world == 1:  # one worker: the resumed run is the run it resumes, to the bit
        set_rng_state(saved_rng, generator, ctx.device)
    autocast = precision(ctx.device)
    stopped_early = patience is not None and stale >= patience  # a resumed run that had stopped stays stopped
    if start >= stage.epochs or stopped_early:
        if stopped_early:
            log.info("%s: %s stopped early at epoch %d (no validation improvement for %d epochs); nothing left to "
                     "train", stage_name, out_url, start, patience)
        else:
            log.warning("%s: nothing left to train: %s holds %d epochs and %d were asked; ask for more (--epochs) "
                        "or start over (--fresh)", stage_name, out_url, start, stage.epochs)
        if history:
            ctx.report(history[-1], out_url if ctx.is_main else None)
    for epoch in range(start, start if stopped_early else stage.epochs):
        stream.set_epoch(epoch)
        train_loss, steps = train_epoch(model, optimizer, loader, loss_fn, ctx, generator, autocast,
                                        desc=f"{stage_name} {epoch + 1}/{stage.epochs}")
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "steps": steps}
        metrics.update(_validate(model, data, val, stage.batch_size, loss_fn, evaluate, generator, autocast, ctx))
        metrics = _agreed(metrics, ctx)  # stop, best model and history decided alike on every rank
        history.append(metrics)
        improved = metrics["val_loss"] < best
        if improved:
            best, stale = metrics["val_loss"], 0
        else:
            stale += 1
        if ctx.is_main:
            if improved:
                checkpoint.save_model(out_url, model, config, {**meta, "epoch": epoch + 1, "metrics": metrics})
            checkpoint.save_model(last, model, config, meta, optimizer,
                                  {"epoch": epoch + 1, "history": history, "best": best, "run": run,
                                   "stale": stale, "rng": rng_state(generator, ctx.device)})
            tqdm.write(_format(stage_name, metrics)) if ctx.progress else log.info(_format(stage_name, metrics))
        ctx.report(metrics, out_url if ctx.is_main else None)
        if patience is not None and stale >= patience:
            log.info("%s: no validation improvement for %d epochs; stopping", stage_name, patience)
            break
    return {"best_val_loss": best, "history": history, "checkpoint": out_url}


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, str]:
    """The random streams a training epoch draws from (augmentation generator, torch's global RNG for dropout,
    CUDA's), as base64 text for the resumable state's JSON."""
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    encoded = {name: base64.b64encode(state.numpy().tobytes()).decode() for name, state in states.items()}
    return {"device": device.type, **encoded}


def set_rng_state(saved: dict[str, str], generator: torch.Generator, device: torch.device) -> None:
    """Put back what `rng_state` saved on the same kind of device (a CUDA generator's state is not a CPU one's:
    a run moved between them starts its random streams afresh)."""
    if saved.get("device") != device.type:
        log.info("the saved random streams are a %s device's: this %s run starts them afresh", saved.get("device"),
                 device.type)
        return

    def tensor(name: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(saved[name])), dtype=torch.uint8)

    generator.set_state(tensor("generator"))
    torch.set_rng_state(tensor("torch"))
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensor("cuda"), device)


def make_optimizer(model: torch.nn.Module, learning_rate: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; fused into a few kernels on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=device.type == "cuda")


def train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[dict[str, torch.Tensor]],
                loss_fn: Callable, ctx: Context, generator: torch.Generator, autocast: Any,
                desc: str = "") -> tuple[float, int]:
    """One pass of optimisation steps over host batches: (mean training loss over all workers, steps).

    The loss is summed on the device and read once at the end: no step waits for the host."""
    model.train()
    running = torch.zeros((), device=ctx.device)
    steps = 0
    total = len(batches) if isinstance(batches, Sized) else None
    for batch in progress_bar(iterable=on_device(batches, ctx.device), total=total, desc=desc, leave=False,
                              disable=not (ctx.progress and ctx.is_main)):
        with autocast:
            loss, _ = loss_fn(model, batch, True, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach().float()
        steps += 1
    running = collective.summed(running, ctx) / ctx.world  # every rank made the same number of steps
    return (running / steps).item() if steps else float("nan"), steps


def _describe_run(run: dict[str, Any] | None) -> str:
    if not run:
        return "a run made by an older geosoc, without a record of what defines it"
    held = "no test fold" if run.get("test_fold") is None else f"test fold {run['test_fold']} held out"
    origin = "from pretrained encoders" if run.get("pretrained") else "from scratch"
    blocks = "" if run.get("validation_seed") is None else f", validation blocks of seed {run['validation_seed']}"
    if run.get("validation_part") is not None:
        blocks += f", validation part {run['validation_part']}"
    if run.get("validation_fraction") is not None:
        blocks += f", validation share {run['validation_fraction']}"
    return f"{run.get('stage')} of {run.get('samples')}, {held}, {origin}, seed {run.get('seed')}{blocks}"


def _validate(model: torch.nn.Module, data: SampleData, val: np.ndarray, batch_size: int, loss_fn: Callable,
              evaluate: Callable | None, generator: torch.Generator, autocast: Any, ctx: Context) -> dict[str, float]:
    """Loss (and metrics) on the whole validation part: each worker scores its share (rank r takes every
    world-th sample from r) with the unwrapped model, so that no collective runs inside a forward; the sums and
    the predictions are then combined, so every worker ends with the figures of the whole part."""
    module = getattr(model, "module", model)
    module.eval()
    shard = val[ctx.rank::ctx.world]
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss x samples, samples
    predictions, indices = [], []
    stream = SampleStream(data, shard, batch_size, shuffle=False)
    with torch.no_grad(), autocast:
        for batch in data_loader(stream, ctx.device, ctx.loader_workers) if len(stream) else []:
            batch = to_device(batch, ctx.device)
            loss, prediction = loss_fn(module, batch, False, generator)
            sums[0] += loss.double() * len(batch["index"])
            sums[1] += len(batch["index"])
            if prediction is not None:
                predictions.append(prediction.float())
                indices.append(batch["index"])
    total, count = collective.summed(sums, ctx).tolist()
    out = {"val_loss": total / count if count else float("nan")}
    if evaluate is not None and len(val):
        sizes = [len(val[r::ctx.world]) for r in range(ctx.world)]
        width = len(cast(SoilNet, module).config.quantiles)  # a rank with no share still sends (0, width) predictions
        mine = torch.cat(predictions) if predictions else torch.empty((0, width), device=ctx.device)
        where = torch.cat(indices).to(ctx.device) if indices else torch.empty(0, dtype=torch.int64, device=ctx.device)
        scored = collective.gathered(where, sizes, ctx).cpu().numpy()
        if len(scored):
            everyone = collective.gathered(mine.reshape(len(where), -1), sizes, ctx).cpu().numpy()
            out.update({f"val_{k}": v for k, v in evaluate(everyone, data.target[scored]).items()})
    return out


def _agreed(metrics: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The validation figures every rank decides from: rank 0's (see `collective`)."""
    keys = sorted(k for k in metrics if k.startswith("val_"))
    return {**metrics, **dict(zip(keys, collective.from_rank0([float(metrics[k]) for k in keys], ctx)))}


def _format(stage: str, metrics: dict[str, Any]) -> str:
    return f"{stage} " + "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def stage_urls(root: str) -> dict[str, str]:
    """Where each stage reads and writes under a region root."""
    from geosoc.data.sampling import samples_url

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
    # the encoders only: the head and what it reads besides them come with fine-tuning
    config = replace(model_config(catalog, SampleData(samples), labelled=False), centre_pixel=False)
    stage = _override(catalog.training.pretrain, epochs, batch_size)
    return pretrain(samples, urls["pretrain"], config, stage, seed=catalog.training.seed, resume=resume, ctx=ctx)


def finetune_region(catalog: Catalog, root: str, *, epochs: int | None = None, batch_size: int | None = None,
                    samples: str | None = None, test_fold: int | None = None, pretrained: str | None | bool = True,
                    resume: bool = True, ctx: Context | None = None, out: str | None = None,
                    folds: np.ndarray | None = None, seed: int | None = None,
                    seeds: int | None = None) -> dict[str, Any]:
    """`geosoc finetune` (and each network run of `geosoc evaluate`): from the region's pretrained encoders when
    there are any (`pretrained=False`: not, but with their architecture, see `finetune_network`), into `out`
    (default models/finetune). With `seeds` K > 1 (default: the catalog's), an ensemble: K runs with seeds
    seed .. seed + K - 1, member 0 at `out` (see `ensemble`)."""
    urls = stage_urls(root)
    samples = samples or urls["labelled"]
    if pretrained is True:
        pretrained = urls["pretrain"] if checkpoint.is_checkpoint(urls["pretrain"]) else None
    config = finetune_network(catalog, samples, pretrained or None, region_encoders(root))
    stage = _override(catalog.training.finetune, epochs, batch_size)
    out = out or urls["finetune"]
    seed = catalog.training.seed if seed is None else seed
    members = stage.seeds if seeds is None else seeds
    if members < 1:
        raise InputError(f"an ensemble needs at least 1 member (--seeds), got {members}")
    groups = min(stage.validation_groups, members)
    part_of = [member % groups for member in range(members)]  # the validation part each member holds out
    results = [finetune(samples, ensemble.member_url(out, member), config, stage, pretrained_url=pretrained or None,
                        test_fold=test_fold, seed=seed + member, resume=resume, ctx=ctx, folds=folds,
                        validation_seed=seed, validation_group=(part_of[member], groups))
               for member in range(members)]
    writer = ctx or Context()
    if writer.is_main:
        with _one_writer(out, writer, "finetune"):
            checkpoint.update_meta(out, {ensemble.MEMBERS: members})
            if members > 1:
                holders = [[m for m, part in enumerate(part_of) if part == g] for g in range(groups)]
                parts = [(chosen, results[chosen[0]]["validation"]) for chosen in holders]
                with phase("calibrate"):
                    calibrate_ensemble(out, SampleData(samples, _modalities(config)), parts, stage.batch_size,
                                       writer.device)
    first = {k: v for k, v in results[0].items() if k != "validation"}
    return {**first, "members": members, "member_val_loss": [result["best_val_loss"] for result in results]}


def region_encoders(root: str) -> str | None:
    """The region's pretrained encoders (models/pretrain), if it has any."""
    url = stage_urls(root)["pretrain"]
    return url if checkpoint.is_checkpoint(url) else None


# Samples per worker and step at most: 2**20 of the paper's patches (64 x 64 px x 14 bands, float32) are 240 GB, more
# than any accelerator holds (and far beyond the batches contrastive or regression training use).
MAX_BATCH = 2**20


def _override(stage: Any, epochs: int | None, batch_size: int | None) -> Any:
    """The catalog's stage with `epochs` / `batch_size` replaced, checked like the catalog's own values."""
    if epochs is not None and epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    if batch_size is not None and not 2 <= batch_size <= MAX_BATCH:
        raise InputError(f"--batch-size must be from 2 (a contrastive batch needs negatives) to {MAX_BATCH:,} samples "
                         f"per worker, got {batch_size}")
    updates = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    return stage.model_copy(update=updates)
