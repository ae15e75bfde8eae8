"""The embedded demo: every step of the pipeline on the synthetic demo region, offline, in minutes.

Lab samples are simulated at random valid locations from the landscape's hidden true SOC with a 10 %
multiplicative measurement error, so the demo's accuracy figures are against a known truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geosoc.catalog import LoadedCatalog, SyntheticSource
from geosoc.data.cube import build_cube
from geosoc.data.points import Points
from geosoc.data.sampling import open_sampleset, random_points, sample_points
from geosoc.errors import CatalogError
from geosoc.evaluation.campaign import MODELS, Evaluation, default_models, evaluate_region
from geosoc.io.storage import default_root
from geosoc.learn.training import Context, finetune_region, pretrain_region, stage_urls
from geosoc.maps.inference import map_region
from geosoc.sources.synthetic import Landscape
from geosoc.threads import available_cores

LABELLED_POINTS = 400
# The evaluation's models: the default ones of a SampleSet with embeddings but aef-hybrid, whose boosting on
# covariates + embedding (12 boosted fits of 270 features per fold) would take `make demo` past 5 minutes;
# `geosoc evaluate --region demo` and tests/benchmarks/skill.py run it.
DEMO_MODELS = (*MODELS, "aef-rf", "aef-qrf", "aef+cov-qrf")
LAB_ERROR = 0.10
TEST_FOLD = 0


def simulated_lab_points(cube_url: str, catalog: LoadedCatalog, n: int, seed: int) -> Points:
    """Random valid locations labelled with the true SOC times a log-normal lab error."""
    config = catalog.config
    assert isinstance(config.imagery.source, SyntheticSource)
    points = random_points(cube_url, n, config.sampling.patch_size, seed=seed + 1000,
                           max_nodata=config.sampling.max_nodata)
    truth = Landscape(config.imagery.source.seed).soc_at(points.x, points.y, config.region.crs)
    error = np.exp(np.random.default_rng(seed).normal(0.0, LAB_ERROR, n))
    ids = np.array([f"lab-{i}" for i in range(n)], dtype=object)
    return Points(ids, points.x, points.y, points.lon, points.lat, truth * error, "g/kg", "simulated lab samples")


@dataclass
class DemoResult:
    cube: str
    unlabelled: int
    labelled: int
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    maps: dict[str, str]
    evaluation: Evaluation
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step, in order


@contextmanager
def _timed(seconds: dict[str, float], step: str, report: Callable[[str], None] | None) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start
    if report is not None:
        report(f"{step}: {seconds[step]:.0f} s")


def run_demo(catalog: LoadedCatalog, root: str | None = None, progress: bool = True,
             labelled: int = LABELLED_POINTS, report: Callable[[str], None] | None = None) -> DemoResult:
    """Every step on a synthetic catalog (the demo region by default); `report` hears each step's wall time."""
    config = catalog.config
    if not isinstance(config.imagery.source, SyntheticSource):
        raise CatalogError(f"{catalog.path}: the demo simulates lab samples from the synthetic landscape; "
                           f"imagery.source.kind must be 'synthetic', got {config.imagery.source.kind!r}")
    root = root or default_root(config.region.name)
    urls = stage_urls(root)
    sampling, seed = config.sampling, config.training.seed
    seconds: dict[str, float] = {}
    with _timed(seconds, "cube", report):
        cube = build_cube(catalog, root, progress=progress)
    with _timed(seconds, "samples", report):
        unlabelled = random_points(cube, sampling.unlabelled, sampling.patch_size, seed,
                                   max_nodata=sampling.max_nodata)
        folds: dict[str, Any] = {"fold_block_size": sampling.fold_block_size, "folds": sampling.folds, "seed": seed,
                                 "max_nodata": sampling.max_nodata}
        n_unlabelled = sample_points(cube, unlabelled, urls["unlabelled"], sampling.patch_size, kind="unlabelled",
                                     **folds).samples
        lab = simulated_lab_points(cube, catalog, labelled, seed)
        n_labelled = sample_points(cube, lab, urls["labelled"], sampling.patch_size, **folds).samples
    ctx = Context(progress=progress)
    with _timed(seconds, "pretrain", report):
        pretrained = pretrain_region(config, root, ctx=ctx)
    with _timed(seconds, "finetune", report):
        finetuned = finetune_region(config, root, test_fold=TEST_FOLD, ctx=ctx)
    with _timed(seconds, "map", report):
        maps = map_region(config, root, progress=progress)
    with _timed(seconds, "evaluate", report):
        models = tuple(m for m in default_models(open_sampleset(urls["labelled"])) if m in DEMO_MODELS)
        evaluation = evaluate_region(config, root, progress=progress, threads=available_cores(), models=models)
    return DemoResult(cube, n_unlabelled, n_labelled, pretrained, finetuned, maps, evaluation, seconds)
