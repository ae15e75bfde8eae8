"""The embedded demo: every step of the pipeline on the synthetic demo region, offline, in minutes.

Lab samples are simulated at random valid locations from the landscape's hidden true SOC with a 10 %
multiplicative measurement error, so the demo's accuracy figures are against a known truth. A synthetic continent
(catalogs/europe-synthetic.yaml) gets its survey the way LUCAS is drawn instead, as a table `geosoc sample
--points` reads: `simulated_lucas_table`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pyproj import Transformer

from geosoc.catalog import LoadedCatalog, SyntheticSource
from geosoc.data.cube import build_cube
from geosoc.data.points import Points, lonlat
from geosoc.data.sampling import open_sampleset, random_points, sample_points
from geosoc.errors import CatalogError
from geosoc.evaluation.campaign import MODELS, Evaluation, default_models, evaluate_region
from geosoc.io.storage import default_root
from geosoc.learn.training import Context, finetune_region, pretrain_region, stage_urls
from geosoc.maps.inference import map_region
from geosoc.sources.from_catalog import open_layers
from geosoc.sources.synthetic import WATER, Landscape
from geosoc.threads import available_cores

LABELLED_POINTS = 400
# The evaluation's models: the default ones of a SampleSet with embeddings but aef-hybrid, whose boosting on
# covariates + embedding (12 boosted fits of 270 features per fold) would take `make demo` past 5 minutes;
# `geosoc evaluate --region demo` and tests/benchmarks/skill.py run it.
DEMO_MODELS = (*MODELS, "aef-rf", "aef-qrf", "aef+cov-qrf")
LAB_ERROR = 0.10
TEST_FOLD = 0
LUCAS_GRID = 2000.0  # m: LUCAS's sites are nodes of a 2 km grid in EPSG:3035 (its land-use frame survey)


def with_lab_error(truth: np.ndarray, seed: int) -> np.ndarray:
    """True SOC times a log-normal lab error of LAB_ERROR (10 %)."""
    return truth * np.exp(np.random.default_rng(seed).normal(0.0, LAB_ERROR, len(truth)))


def simulated_lab_points(cube_url: str, catalog: LoadedCatalog, n: int, seed: int) -> Points:
    """Random valid locations labelled with the true SOC times a log-normal lab error."""
    config = catalog.config
    assert isinstance(config.imagery.source, SyntheticSource)
    points = random_points(cube_url, n, config.sampling.patch_size, seed=seed + 1000,
                           max_nodata=config.sampling.max_nodata)
    truth = Landscape(config.imagery.source.seed).soc_at(points.x, points.y, config.region.crs)
    ids = np.array([f"lab-{i}" for i in range(n)], dtype=object)
    return Points(ids, points.x, points.y, points.lon, points.lat, with_lab_error(truth, seed), "g/kg",
                  "simulated lab samples")


def simulated_lucas_table(catalog: LoadedCatalog, n: int, seed: int) -> pd.DataFrame:
    """`n` simulated LUCAS topsoil sites as a LUCAS 2018 table (POINTID, TH_LONG, TH_LAT, OC in g/kg to 0.1, what
    `geosoc sample --points FILE --format lucas2018` reads), drawn the way LUCAS is: random nodes of a 2 km grid
    (LUCAS_GRID, in the catalog's CRS) on land, i.e. inside `region.mask` with data at their pixel and not on open
    water, labelled with the landscape's true SOC at the site times a 10 % lab error. Needs no cube: the mask and
    the landscape are read at the sites only. Fewer than `n` when the region's land has fewer nodes."""
    config = catalog.config
    if not isinstance(config.imagery.source, SyntheticSource):
        raise CatalogError(f"{catalog.path}: simulated lab samples need the synthetic landscape; imagery.source.kind "
                           f"must be 'synthetic', got {config.imagery.source.kind!r}")
    grid, crs = config.imagery_grid, config.region.crs
    landscape = Landscape(config.imagery.source.seed)
    inside = getattr(open_layers(catalog)[0].reader, "inside", None)  # region.mask, if the catalog has one
    to_crs = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    xmin, ymin, xmax, ymax = grid.bounds
    nodes_x = np.arange(np.ceil(xmin / LUCAS_GRID), np.floor(xmax / LUCAS_GRID) + 1) * LUCAS_GRID
    nodes_y = np.arange(np.ceil(ymin / LUCAS_GRID), np.floor(ymax / LUCAS_GRID) + 1) * LUCAS_GRID
    rng = np.random.default_rng([seed, 2018])
    order = rng.permutation(len(nodes_x) * len(nodes_y))  # visited at random, a batch at a time, until n are kept
    kept: list[tuple[np.ndarray, ...]] = []
    found, batch = 0, max(4 * n, 1024)
    for start in range(0, len(order), batch):
        index = order[start : start + batch]
        # as the table will give them: lon/lat to 6 decimals (~0.1 m), read back into the region's CRS
        lon, lat = (np.round(v, 6) for v in lonlat(nodes_x[index % len(nodes_x)], nodes_y[index // len(nodes_x)], crs))
        x, y = to_crs.transform(lon, lat)
        rows, cols = grid.rowcol(x, y)
        cx, cy = grid.x_of(cols), grid.y_of(rows)  # the centre of the pixel a site's patch is centred on
        keep = (rows >= 0) & (rows < grid.height) & (cols >= 0) & (cols < grid.width)
        if inside is not None:
            keep &= inside(cx, cy)
        keep &= (landscape.fields(x, y, crs)["land_cover"] != WATER)
        keep &= (landscape.fields(cx, cy, crs)["land_cover"] != WATER)
        kept.append((x[keep], y[keep], lon[keep], lat[keep]))
        found += int(keep.sum())
        if found >= n:
            break
    x, y, lon, lat = (np.concatenate(part)[:n] for part in zip(*kept, strict=True))
    soc = with_lab_error(landscape.soc_at(x, y, crs), seed)
    return pd.DataFrame({"POINTID": np.arange(1, len(x) + 1) + 10_000_000, "TH_LONG": lon, "TH_LAT": lat,
                         "OC": np.round(soc, 1)})


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
