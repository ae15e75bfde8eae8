"""`geosoc evaluate`: SSL-SoilNet against what soil mappers would use instead, on the same held-out folds.

Every model sees the same folds: the SampleSet's spatial blocks (`cv="spatial"`) or a seeded random assignment
(`cv="random"`), repeated `repeats` times with other seeds. For each (model, repeat, fold) the fold is held out
entirely: networks pick their checkpoint and conformal calibration on a validation part of the other folds;
trees are fitted on the other folds. Pretraining runs once, on the unlabelled SampleSet (no targets).
Each finished (model, repeat, fold) leaves its held-out predictions (and, for networks, its checkpoint) under
`evaluation/runs/<cv>-k<folds>-<digest>/<model>-<settings>/`, so a re-run with the same folds and settings skips
it; the tables and the figure are then made from all of them, and the summary says how many runs were reused.

`<model>+rk` and `stack` are made from pair runs (each fitted model refitted without two folds: evaluation/nested.py),
and the summary ends with the model to map with, chosen without any held-out fold's targets (evaluation/recommend.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr

from geosoc.catalog import Catalog
from geosoc.data.sampling import open_sampleset, spatial_folds
from geosoc.data.streaming import SampleData
from geosoc.errors import InputError, NotFoundError
from geosoc.evaluation import nested, network_runs, recommend
from geosoc.fingerprints import fingerprint, model_code
from geosoc.io.bars import progress_bar
from geosoc.io.locks import exclusive
from geosoc.io.storage import exists, filesystem, join, published
from geosoc.learn import baselines, checkpoint, context, ensemble
from geosoc.learn.device import resolve_device
from geosoc.learn.models import NetworkConfig
from geosoc.learn.training import (
    Context,
    finetune_network,
    forward_all,
    pretrain_region,
    region_encoders,
    stage_urls,
)
from geosoc.stats.metrics import METRICS, regression_metrics
from geosoc.stopwatch import Spent, collecting
from geosoc.version import __version__

log = logging.getLogger(__name__)

MODELS = ("ssl", "supervised", "hybrid", "rf", "gbm", "qrf")  # the default models of any SampleSet
AEF_MODELS = baselines.AEF_NAMES  # added by default when the SampleSet carries AlphaEarth embeddings
ALL_MODELS = (*MODELS, *AEF_MODELS)
# Named only (--models): `<model>+rk` of any model, `stack`, tree models with spatial context (`qrf+nn`).
TREES = baselines.NAMES
NETWORKS = ("ssl", "supervised")
NEEDS_PRETRAINING = ("ssl", "hybrid")
DESCRIPTIONS = {
    "ssl": "SSL-SoilNet: pretrained encoders, fine-tuned",
    "supervised": "the same network from scratch (no pretraining)",
    "hybrid": "gradient boosting on covariates + pretrained embeddings",
    "rf": "random forest on covariates",
    "gbm": "gradient boosting on covariates (quantile loss)",
    "qrf": "quantile regression forest on covariates",
    "aef-rf": "random forest on the AlphaEarth embedding (cell and 5 x 5 mean)",
    "aef-qrf": "quantile regression forest on the AlphaEarth embedding (cell and 5 x 5 mean)",
    "aef+cov-qrf": "quantile regression forest on the AlphaEarth embedding and the covariates",
    "aef-hybrid": "gradient boosting on covariates + the AlphaEarth embedding",
}
CV = Literal["spatial", "random"]


@dataclass
class Evaluation:
    metrics: pd.DataFrame  # one row per (model, repeat, fold)
    summary: dict[str, Any]  # per model: mean and sd over folds, and pooled metrics
    predictions: pd.DataFrame
    outputs: dict[str, str]


class Times:
    """Where a campaign's time went: per model, the phases of the runs it made (fit, calibrate, predict, other:
    reading, writing), each in wall and CPU seconds; a reused run costs nothing and is not counted. The campaign's
    own phases (inputs: the SampleSet and the tree features, computed once; report: tables and figure) apart.
    Network runs made in processes of their own (`network_processes`) overlap each other and the trees, so the
    phases' wall seconds add up to more than the campaign's (`wall_s`, from its start to the report)."""

    PHASES = ("fit", "calibrate", "predict", "other")

    def __init__(self, models: tuple[str, ...]) -> None:
        self.models: dict[str, dict[str, Spent]] = {m: {} for m in models}
        self.runs = dict.fromkeys(models, 0)
        self.campaign: dict[str, Spent] = {}
        self.started = time.perf_counter()
        self.network_processes = 0

    def add(self, who: str, spent: dict[str, Spent], run: bool = False) -> None:
        """Add a collection's phases to a model's (`run`: one run of it) or, for "campaign", to the campaign's."""
        into = self.campaign if who == "campaign" else self.models[who]
        for name, value in spent.items():
            into.setdefault(name, Spent()).add(value)
        if run:
            self.runs[who] += 1

    def to_dict(self) -> dict[str, Any]:
        """summary.json's "time": seconds per phase, wall and CPU (all of this process's threads)."""
        def seconds(phases: dict[str, Spent], names: tuple[str, ...]) -> dict[str, dict[str, float]]:
            return {kind: {n: round(getattr(phases.get(n, Spent()), kind), 2) for n in names}
                    for kind in ("wall", "cpu")}

        everything = [*self.models.values(), self.campaign]
        return {
            "wall_s": round(time.perf_counter() - self.started, 2),
            "cpu_s": round(sum(v.cpu for phases in everything for v in phases.values()), 2),
            "network_processes": self.network_processes,
            "models": {m: {"runs": self.runs[m], **seconds(phases, self.PHASES)} for m, phases in self.models.items()},
            "campaign": seconds(self.campaign, tuple(self.campaign)),
        }


def fold_sets(x: np.ndarray, y: np.ndarray, own: np.ndarray, cv: CV, folds: int | None, repeats: int, seed: int,
              block: float) -> list[np.ndarray]:
    """Fold of every labelled sample, one array per repeat."""
    k = folds or len(np.unique(own))
    out = []
    for repeat in range(repeats):
        if cv == "spatial":
            same = repeat == 0 and k == len(np.unique(own))  # the SampleSet's own folds first
            out.append(own.astype(np.int64) if same else spatial_folds(x, y, block, k, seed + repeat).astype(np.int64))
        else:
            order = np.random.default_rng(seed + repeat).permutation(len(x))
            assignment = np.empty(len(x), dtype=np.int64)
            assignment[order] = np.arange(len(x)) % k
            out.append(assignment)
    return out


def evaluate_region(catalog: Catalog, root: str, *, cv: CV = "spatial", folds: int | None = None,
                    models: tuple[str, ...] | None = None, repeats: int = 1, epochs: int | None = None,
                    threads: int = 1, progress: bool = True, device: torch.device | None = None,
                    seeds: int | None = None) -> Evaluation:
    """Every model on the same folds of `<root>/samples/labelled.zarr`; results under `<root>/evaluation/`.
    `seeds` replaces the catalog's ensemble size for the networks (and so starts runs of its own). `models`
    defaults to MODELS, and AEF_MODELS besides when the SampleSet carries AlphaEarth embeddings."""
    if seeds is not None:
        if seeds < 1:
            raise InputError(f"--seeds must be at least 1, got {seeds}")
        finetune = catalog.training.finetune.model_copy(update={"seeds": seeds})
        catalog = catalog.model_copy(update={"training": catalog.training.model_copy(update={"finetune": finetune})})
    if models is not None and not models:
        raise InputError(f"--models names no model; give one or more of {', '.join(ALL_MODELS)}, comma-separated "
                         "(or leave --models out for every model the SampleSet has inputs for)")
    unknown = [m for m in models or () if not nested.known(m, ALL_MODELS, TREES)]
    if unknown:
        raise InputError(f"unknown model(s) {unknown}; choose among {', '.join(ALL_MODELS)}, any of them with "
                         "+rk (residual kriging), stack, or a tree model with +xy or +nn (spatial context)")
    if cv not in ("spatial", "random"):
        raise InputError(f"--cv must be 'spatial' or 'random', got {cv!r}")
    if repeats < 1 or (folds is not None and folds < 2):
        raise InputError(f"need --repeats >= 1 and --folds >= 2 (got {repeats} and {folds})")
    out = join(root, "evaluation")
    with exclusive(out, "evaluate"):  # one campaign writes there at a time; the runs inside have their own locks
        return _campaign_under_lock(catalog, root, out, cv, folds, models, repeats, epochs, threads, progress,
                                    resolve_device(device))


def default_models(samples: xr.Dataset) -> tuple[str, ...]:
    """What `evaluate` runs unless told: every model the SampleSet has the inputs of."""
    return ALL_MODELS if "embedding" in samples else MODELS


def _campaign_under_lock(catalog: Catalog, root: str, out: str, cv: CV, folds: int | None,
                         models: tuple[str, ...] | None,
                         repeats: int, epochs: int | None, threads: int, progress: bool,
                         device: torch.device) -> Evaluation:
    urls = stage_urls(root)
    samples = open_sampleset(urls["labelled"])
    models = nested.with_bases(models or default_models(samples))
    fitted = tuple(m for m in models if not nested.is_derived(m))
    estimators = tuple(nested.split(m)[0] for m in fitted)  # what each fitted model is, context aside
    baselines.require_embeddings(samples, urls["labelled"], estimators)
    labelled = np.flatnonzero(np.isfinite(samples["target"].values))
    if len(labelled) < 10:
        raise InputError(f"{urls['labelled']}: only {len(labelled)} labelled samples; evaluation needs at least 10")
    times = Times(models)
    with collecting("inputs") as spent:
        data = SampleData(urls["labelled"])
    times.add("campaign", spent)
    x, y = samples["x"].values[labelled], samples["y"].values[labelled]
    sets = fold_sets(x, y, data.fold[labelled], cv, folds, repeats, catalog.training.seed,
                     catalog.sampling.fold_block_size)
    nested.check_folds(models, len(np.unique(sets[0])))
    pretrained = None
    if any(m in NEEDS_PRETRAINING for m in estimators):
        if not checkpoint.is_checkpoint(urls["pretrain"]) and not exists(urls["unlabelled"]):
            raise NotFoundError(f"models ssl and hybrid need pretrained encoders: create {urls['unlabelled']} "
                                "(`geosoc sample --random N`) or leave them out with --models")
        pretrained = urls["pretrain"]
        if _trained_epochs(pretrained) >= catalog.training.pretrain.epochs:
            log.info("ssl and hybrid use the pretrained encoders at %s as they are (evaluate's --epochs sets "
                     "fine-tuning only; `geosoc pretrain --epochs N` trains them further)", pretrained)
        else:  # resumes an unfinished pretraining
            with collecting("pretrain") as spent:
                pretrain_region(catalog, root, ctx=Context(device=device, progress=progress))
            times.add("campaign", spent)
    with collecting("inputs") as spent:
        inputs = _inputs(samples, data, labelled, estimators, pretrained, device)
    times.add("campaign", spent)
    ids = samples["sample_id"].values[labelled]
    observed = data.target[labelled]
    tasks: list[tuple[str, int, tuple[int, ...]]] = [(m, r, (int(k),)) for r, fs in enumerate(sets)
                                                     for k in np.unique(fs) for m in fitted]
    tasks += [(m, r, pair) for r, fs in enumerate(sets) for pair in nested.pairs(fs)
              for m in nested.needs_pairs(models)]
    runs = join(out, "runs", _campaign(cv, sets, ids, observed))
    scratch = None if "supervised" not in models else finetune_network(catalog, urls["labelled"], None,
                                                                          region_encoders(root))
    aef = fingerprint(inputs["aef"].tobytes()) if "aef" in inputs else ""  # other vectors: other runs
    folders = {m: f"{m}-{_settings(m, catalog, epochs, pretrained, scratch, aef)}" for m in fitted}
    parts: list[pd.DataFrame] = []
    inner: list[pd.DataFrame] = []  # the pair runs' predictions
    xy = np.stack([x, y], axis=1)
    reused: dict[str, int] = dict.fromkeys(models, 0)
    forests: dict[Any, Any] = {}  # the training part's forests, each fitted once for the models that read it
    part_of_forests: tuple[Any, ...] = ()
    urls_of = {(m, r, held): join(runs, folders[m], _run_name(r, held)) for m, r, held in tasks}  # + .parquet
    networks = {(m, r, held): network_runs.NetworkRun(m, r, held, urls_of[m, r, held],
                                                      *_run_folds(data.size, labelled, sets[r], held))
                for m, r, held in tasks if m in NETWORKS and not exists(f"{urls_of[m, r, held]}.parquet")}
    shared = network_runs.Campaign(catalog, root, urls["labelled"], epochs, pretrained)
    parts_in_order = {part: i for i, part in enumerate(dict.fromkeys((r, held) for _, r, held in tasks))}
    work = sorted(tasks, key=lambda t: (parts_in_order[t[1], t[2]], t[0] in NETWORKS))  # trees first, nets training
    frames: dict[tuple[str, int, tuple[int, ...]], pd.DataFrame] = {}
    with network_runs.started(shared, list(networks.values()), device, threads, data) as made:
        times.network_processes = made.processes
        for model, repeat, held in progress_bar(iterable=work, desc="evaluate", unit="run", disable=not progress):
            if (repeat, held) != part_of_forests:  # a new training part (the tasks go part by part)
                forests, part_of_forests = {}, (repeat, held)
            url = f"{urls_of[model, repeat, held]}.parquet"
            if exists(url):
                reused[model] += len(held) == 1  # held-out folds reused (pair runs apart)
            else:
                each = {}
                if model in NETWORKS:
                    members, spent = made.result(networks[model, repeat, held])  # here, or in a process of its own
                    times.add(model, spent)
                    lower, median, upper = ensemble.mean_interval(members)
                    each = {f"q50_seed{k}": part[1] for k, part in enumerate(members)}
                with collecting("other") as spent:
                    test = np.isin(sets[repeat], held)
                    if model not in NETWORKS:
                        estimator, kind = nested.split(model)
                        table = np.concatenate([inputs[name] for name in baselines.INPUTS[estimator]], axis=1)
                        train_x, test_x = context.tables(kind, table, xy, observed, test)
                        lower, median, upper = baselines.fit_predict(estimator, train_x, observed[~test], test_x,
                                                                     catalog.training.seed + repeat, threads,
                                                                     groups=sets[repeat][~test],
                                                                     forests=forests if kind is None else None)
                    frame = pd.DataFrame({"model": model, "repeat": repeat, "fold": sets[repeat][test],
                                          "sample_id": [str(i) for i in ids[test]],
                                          "x": x[test], "y": y[test], "observed": observed[test], "q05": lower,
                                          "q50": median, "q95": upper, **each})
                    with published(url) as local:
                        frame.to_parquet(local, index=False)
                times.add(model, spent, run=True)
            fs, path = filesystem(url)
            frames[model, repeat, held] = pd.read_parquet(fs.open(path, "rb"))
    for task in tasks:  # in the tasks' order, whatever order they were made in
        frame, held = frames[task], task[2]
        if len(held) == 1:
            parts.append(frame)
        else:  # each sample of a pair run is out of fold for the other fold of the pair
            inner.append(frame.assign(with_fold=np.where(frame["fold"] == held[0], held[1], held[0])))
    predictions = pd.concat(parts, ignore_index=True)
    derived, learnt = nested.derived_predictions(predictions, pd.concat(inner, ignore_index=True) if inner
                                                 else predictions.iloc[:0], models, catalog.training.seed)
    predictions = pd.concat([predictions, derived], ignore_index=True)
    return _recommended(_report(predictions, out, models, samples["target"].attrs.get("units", ""), cv,
                                samples["target"].attrs.get("long_name", "SOC"), reused, times), learnt)


def _inputs(samples: xr.Dataset, data: SampleData, labelled: np.ndarray, models: tuple[str, ...],
            pretrained: str | None, device: torch.device) -> dict[str, np.ndarray]:
    """The tree models' features of the labelled samples, computed once for every model and fold: covariates,
    and where a model reads them the pretrained encoders' embeddings and the AlphaEarth embedding features."""
    inputs = {"covariates": baselines.covariate_features(data.rows(labelled), data.bands, data.variables,
                                                         data.time).values}
    if "hybrid" in models:
        inputs["ssl"] = _embeddings(pretrained, data, labelled, device)
    if any(baselines.uses_aef(m) for m in models):
        inputs["aef"] = baselines.aef_features(samples, labelled).values
    return inputs


def _run_folds(size: int, labelled: np.ndarray, folds: np.ndarray,
               held: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A network run's fold of every sample of the SampleSet (-1: unlabelled; a pair run holds out its two folds
    as the first) and its held-out samples."""
    test = np.isin(folds, held)
    full = np.full(size, -1, dtype=np.int64)
    full[labelled] = np.where(test, held[0], folds)
    return full, labelled[test]


def _run_name(repeat: int, held: tuple[int, ...]) -> str:
    """A run's name in its model's folder: `r0-f3` holds out fold 3, the pair run `r0-p1-3` folds 1 and 3."""
    return f"r{repeat}-f{held[0]}" if len(held) == 1 else f"r{repeat}-p{held[0]}-{held[1]}"


def _recommended(evaluation: Evaluation, learnt: dict[str, list[dict[str, Any]]]) -> Evaluation:
    """The summary with what each fold of a derived model learnt (variograms, weights) and the recommendation
    (`recommend`), written again."""
    summary = evaluation.summary
    for model, folds in learnt.items():
        summary["models"][model]["per_fold"] = folds
    summary["recommendation"] = recommend.recommend(evaluation.metrics, evaluation.predictions)
    with published(evaluation.outputs["summary.json"]) as path:
        path.write_text(json.dumps(summary, indent=2))
    return evaluation


def _trained_epochs(url: str) -> int:
    """Epochs a training stage's checkpoint holds (0 when there is none yet)."""
    last = join(url, "last")
    return int(checkpoint.state_info(last)["epoch"]) if checkpoint.is_checkpoint(last) else 0


def _settings(model: str, catalog: Catalog, epochs: int | None, pretrained: str | None,
              scratch: NetworkConfig | None = None, aef: str = "") -> str:
    """A digest of everything besides the folds that changes a model's held-out predictions: the catalog's model
    and training sections (with evaluate's --epochs), the seed, the pretrained encoders (their config.json names
    every weight file by SHA-256), the network `supervised` trains from scratch (`scratch`: its sizes may come from
    the data size or the pretrained encoders), the AlphaEarth features' digest (`aef`), geosoc's version and its
    model code (`fingerprints.model_code`). Runs with other settings go to another folder."""
    parts = [model, __version__, model_code(), str(catalog.training.seed)]
    if model in NETWORKS:
        parts += [catalog.model.model_dump_json(), catalog.training.finetune.model_dump_json(), str(epochs)]
    if model == "supervised" and scratch is not None:
        parts.append(json.dumps(scratch.to_dict(), sort_keys=True))
    if model in NEEDS_PRETRAINING and pretrained is not None:
        parts.append(checkpoint.config_bytes(pretrained).decode())
    if baselines.uses_aef(nested.split(model)[0]):
        parts.append(aef)
    return fingerprint(*parts, length=8)


def _campaign(cv: str, sets: list[np.ndarray], ids: np.ndarray, observed: np.ndarray) -> str:
    """Where a cross-validation's runs live: named by its kind and folds, and a digest of the fold assignment
    and the samples, so that other folds or a re-sampled SampleSet never reuse finished runs."""
    parts = (*sets, np.asarray([str(i) for i in ids]).astype("U"), observed)
    digest = fingerprint(*(np.ascontiguousarray(part).tobytes() for part in parts), length=10)
    return f"{cv}-k{len(np.unique(sets[0]))}-{digest}"


def _embeddings(pretrained: str | None, data: SampleData, indices: np.ndarray, device: torch.device) -> np.ndarray:
    """The pretrained encoders' embeddings of samples (their own input normalisation)."""
    assert pretrained is not None
    model, meta = checkpoint.load_model(pretrained, device)
    norm = checkpoint.normalisation(pretrained, meta)
    return forward_all(model, data, indices, norm, device, 256)[1]


def _metrics(group: pd.DataFrame) -> dict[str, float]:
    return regression_metrics(group["observed"].to_numpy(), group["q50"].to_numpy(), group["q05"].to_numpy(),
                              group["q95"].to_numpy())


def _report(predictions: pd.DataFrame, out: str, models: tuple[str, ...], units: str, cv: str,
            target: str = "SOC", reused: dict[str, int] | None = None, times: Times | None = None) -> Evaluation:
    """The tables and the figure; summary.json is written last, with the time of everything before it."""
    times = times or Times(models)
    with collecting("report") as spent:
        metrics, summary, outputs = _tables(predictions, out, models, units, cv, target, reused)
    times.add("campaign", spent)
    summary["time"] = times.to_dict()
    with published(outputs["summary.json"]) as path:
        path.write_text(json.dumps(summary, indent=2))
    return Evaluation(metrics, summary, predictions, outputs)


def _tables(predictions: pd.DataFrame, out: str, models: tuple[str, ...], units: str, cv: str, target: str,
            reused: dict[str, int] | None) -> tuple[pd.DataFrame, dict[str, Any], dict[str, str]]:
    rows = []
    for (model, repeat, fold), group in predictions.groupby(["model", "repeat", "fold"], sort=False):
        rows.append({"model": model, "repeat": repeat, "fold": fold, "n": len(group), **_metrics(group)})
    metrics = pd.DataFrame(rows)
    summary: dict[str, Any] = {"cv": cv, "target": target, "units": units, "models": {}}
    for model in models:
        per_fold = metrics[metrics["model"] == model]
        pooled = _metrics(predictions[predictions["model"] == model])
        summary["models"][model] = {
            "description": nested.describe(model, DESCRIPTIONS),
            "folds": int(len(per_fold)),
            "mean": {m: _finite(per_fold[m].mean()) for m in METRICS},
            "sd": {m: _finite(per_fold[m].std(ddof=1)) for m in METRICS},
            "pooled": {m: _finite(v) for m, v in pooled.items()},
            **_seed_spread(predictions[predictions["model"] == model]),
            "reused_runs": (reused or {}).get(model, 0),  # from earlier runs with the same folds and settings
        }
    outputs = {name: join(out, name) for name in ("metrics.csv", "summary.json", "predictions.parquet", "scatter.png")}
    with published(outputs["metrics.csv"]) as path:
        metrics.to_csv(path, index=False)
    with published(outputs["predictions.parquet"]) as path:
        predictions.to_parquet(path, index=False)
    with published(outputs["scatter.png"]) as path:
        _scatter(predictions, models, summary, path)
    return metrics, summary, outputs


def _seed_spread(part: pd.DataFrame) -> dict[str, Any]:
    """A network ensemble's members scored one by one (pooled R² and RMSE of each member's medians) and their
    spread: what one seed alone would have given. Empty for a model without members."""
    columns = sorted(c for c in part.columns if c.startswith("q50_seed") and part[c].notna().all())
    if not columns:
        return {}
    observed = part["observed"].to_numpy()
    each = [regression_metrics(observed, part[c].to_numpy()) for c in columns]
    return {"seeds": len(columns), "seed_r2": [_finite(m["r2"]) for m in each],
            "seed_sd": {k: _finite(ensemble.spread([m[k] for m in each])) for k in ("r2", "rmse")}}


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _scatter(predictions: pd.DataFrame, models: tuple[str, ...], summary: dict[str, Any], path: Path) -> dict[str, int]:
    """Observed against predicted median, one panel per model: every point with its 90 % interval, the 1:1 line,
    n, RMSE, pooled R² and PICP90. The axes end at 1.05 x the 99.5th percentile of observed and predicted values;
    points beyond are drawn at the edge as triangles and counted in the panel. Returns those counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, units = summary.get("target", "SOC"), summary.get("units", "")
    unit = f" ({units})" if units else ""
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False, dpi=110)
    limit = float(np.nanpercentile(predictions[["observed", "q50"]].to_numpy(), 99.5)) * 1.05
    beyond = {}
    for ax, model in zip(axes.ravel(), models):
        part = predictions[predictions["model"] == model]
        observed, median = part["observed"].to_numpy(), part["q50"].to_numpy()
        x, y = np.minimum(observed, limit), np.minimum(median, limit)
        outside = (observed > limit) | (median > limit)
        beyond[model] = int(outside.sum())
        lower, upper = np.minimum(part["q05"].to_numpy(), limit), np.minimum(part["q95"].to_numpy(), limit)
        ax.errorbar(x, y, yerr=[np.maximum(y - lower, 0), np.maximum(upper - y, 0)], fmt="none", ecolor="0.75",
                    elinewidth=0.5, zorder=1)
        ax.scatter(x[~outside], y[~outside], s=6, alpha=0.6, zorder=2)
        ax.scatter(x[outside], y[outside], s=14, marker="^", color="C3", zorder=3)
        ax.plot([0, limit], [0, limit], color="k", linewidth=0.8)
        ax.set_xlim(0, limit * 1.01)
        ax.set_ylim(0, limit * 1.01)
        pooled = summary["models"][model]["pooled"]
        shown = {"rmse": "RMSE", "r2": "R²", "picp": "PICP90"}
        lines = [f"n {len(part)}"] + [f"{shown[k]} {pooled[k]:.3g}" for k in shown if pooled.get(k) is not None]
        if beyond[model]:
            lines.append(f"{beyond[model]} beyond the axes (▲ at the edge)")
        ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel(f"observed {name}{unit}")
        ax.set_ylabel(f"predicted median {name}{unit}, 90 % interval")
    for ax in axes.ravel()[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return beyond
