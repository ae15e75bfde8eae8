"""Time of a climate-only, RaCA-sized evaluation: `geosoc evaluate` (all six models, 5 spatial folds) on a survey of
N sites with 61 monthly values of 13 TerraClimate variables each and nothing else, with the conus catalog's
defaults (CPU; not a test).

    python tests/benchmarks/climate_survey.py [--sites 6000] [--unlabelled N] [--root DIR] [--catalog FILE]
                                              [--models ssl supervised ...] [--threads T]

The survey: N random land sites (the conus catalog's bounds and land mask, EPSG:5070) of the synthetic landscape,
each with its 2010-01 .. 2015-01 series of 13 of TerraClimate's 14 variables (all but wind speed `vs`: the user's
RaCA survey had 13) and the landscape's true SOC times a 10 % log-normal lab error (as `geosoc demo`
labels its samples), written as a CSV of `<variable>_<YYYY-MM>` columns and read by `sampleset_from_table` (the
path of `geosoc sample-table`) into samples/labelled.zarr. Another `--unlabelled` sites (default: as many) without
SOC make samples/unlabelled.zarr, which ssl and hybrid pretrain on.

The evaluation runs phase by phase, each timed (wall and CPU seconds): pretraining, then each model alone
(`evaluate_region(models=(m,))`), then all six together, which reuses every run and makes the table. Lines:
`<phase>_s=<wall> cpu_s=<cpu>`, `network_ssl=` and `network_supervised=` (the architecture the catalog's `model:` section resolves to for this
survey, see geosoc.learn.sizing), `<network>_epochs=` (epochs trained per fine-tuning run, mean over folds and
members), then the results table and `total_s=<wall of pretraining and the six models>`. Scale down with
`--sites 600` for a quick run; the issue's goal is `total_s` < 3600 at 6,000 sites on 2 cores.

Its skill figures flatter every model: the synthetic world's climate explains its SOC far better (pooled R² about
0.36 for every model) than real series explain real SOC (about 0.09 at best on a real 6,000-site TerraClimate
survey). This measures time and memory, not skill.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio

from geosoc.catalog import CLIMATE_VARIABLES, LoadedCatalog, load_catalog
from geosoc.cli import evaluation_table, print_table
from geosoc.data.points import Columns, lonlat
from geosoc.data.sampling import samples_url
from geosoc.data.tables import sampleset_from_table
from geosoc.demo import LAB_ERROR
from geosoc.evaluation.campaign import MODELS, NEEDS_PRETRAINING, NETWORKS, evaluate_region
from geosoc.io.storage import join
from geosoc.learn import checkpoint, ensemble
from geosoc.learn.training import Context, finetune_network, pretrain_region, region_encoders, stage_urls
from geosoc.sources.synthetic import Landscape
from geosoc.threads import use_threads

VARIABLES = [v for v in CLIMATE_VARIABLES if v != "vs"]  # 13
COLUMNS = Columns("site", ("lon",), ("lat",), "soc", crs="EPSG:4326", units="g/kg")


def land_sites(catalog: LoadedCatalog, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` uniform random points (region CRS) on land: inside the region's mask and off the landscape's water."""
    config = catalog.config
    xmin, ymin, xmax, ymax = config.region.bounds
    landscape = Landscape(0)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    with rasterio.open(catalog.resolve(config.region.mask)) if config.region.mask else _no_mask() as mask:
        while sum(len(x) for x in xs) < n:
            x, y = rng.uniform(xmin, xmax, 4 * n), rng.uniform(ymin, ymax, 4 * n)
            keep = np.isfinite(landscape.soc_at(x, y, config.region.crs))
            if mask is not None:
                lon, lat = lonlat(x, y, config.region.crs)
                keep &= np.array([v[0] for v in mask.sample(zip(lon, lat))]) > 0
            xs.append(x[keep])
            ys.append(y[keep])
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


class _no_mask:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def survey_table(catalog: LoadedCatalog, path: Path, n: int, labelled: bool, seed: int) -> None:
    """A CSV of `n` sites: id, lon, lat, the series as `<variable>_<YYYY-MM>` columns, and SOC when labelled."""
    config = catalog.config
    assert config.climate is not None
    rng = np.random.default_rng(seed)
    x, y = land_sites(catalog, n, rng)
    months = config.climate.months
    series = Landscape(0).climate_at(x, y, config.region.crs, months, VARIABLES)  # (site, month, variable)
    lon, lat = lonlat(x, y, config.region.crs)
    columns: dict[str, Any] = {"site": [f"{'lab' if labelled else 'site'}-{seed}-{i}" for i in range(n)],
                               "lon": lon, "lat": lat}
    if labelled:
        truth = Landscape(0).soc_at(x, y, config.region.crs)
        columns["soc"] = truth * np.exp(rng.normal(0.0, LAB_ERROR, n))
    for j, variable in enumerate(VARIABLES):
        for t, month in enumerate(months):
            columns[f"{variable}_{month:%Y-%m}"] = series[:, t, j]
    pd.DataFrame(columns).to_csv(path, index=False, float_format="%.6g")


def prepare(catalog: LoadedCatalog, root: str, sites: int, unlabelled: int, folder: Path) -> None:
    config = catalog.config
    folds = {"fold_block_size": config.sampling.fold_block_size, "folds": config.sampling.folds,
             "seed": config.training.seed}
    for kind, n, seed in (("labelled", sites, 1), ("unlabelled", unlabelled, 2)):
        table = folder / f"survey-{kind}-{n}.csv"
        survey_table(catalog, table, n, kind == "labelled", seed)
        spec = COLUMNS if kind == "labelled" else Columns("site", ("lon",), ("lat",), None, crs="EPSG:4326")
        report = sampleset_from_table(table, samples_url(root, kind), config.region.crs, "csv", spec, **folds)
        print(f"{kind}: {report.samples} sites -> {report.url}")


def timed(name: str, seconds: dict[str, float], work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`work(*args, **kwargs)`; prints and keeps its wall time, prints its CPU time (all threads of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work(*args, **kwargs)
    seconds[name] = time.perf_counter() - wall
    print(f"{name}_s={seconds[name]:.1f} cpu_s={time.process_time() - cpu:.1f}", flush=True)
    return result


def epochs_trained(root: str, model: str) -> list[int]:
    """Epochs each fine-tuning run of `model` (every fold and ensemble member) trained before it stopped."""
    runs = sorted(Path(join(root, "evaluation", "runs")).glob(f"*/{model}-*/r*-f*"))
    out = []
    for run in (r for r in runs if re.fullmatch(r"r\d+-f\d+", r.name) and checkpoint.is_checkpoint(str(r))):
        members = ensemble.member_urls(str(run), checkpoint.load_config(str(run))[1])
        out += [int(checkpoint.state_info(join(url, "last"))["epoch"]) for url in members]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=6000, help="labelled sites (default 6000, RaCA-sized)")
    parser.add_argument("--unlabelled", type=int, help="unlabelled sites for pretraining (default: --sites)")
    parser.add_argument("--catalog", help="a catalog file (default: the shipped conus catalog)")
    parser.add_argument("--root", help="keep the artefacts here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, help="torch and tree threads (default: the available cores)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: all six")
    args = parser.parse_args()
    threads = use_threads(args.threads)
    catalog = load_catalog(path=args.catalog) if args.catalog else load_catalog("conus")
    config = catalog.config
    unlabelled = args.unlabelled or args.sites
    folder = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="geosoc-survey-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        root = str(folder / f"survey-{args.sites}")
        print(f"sites={args.sites} unlabelled={unlabelled} months={len(config.climate.months) if config.climate else 0} "
              f"variables={len(VARIABLES)} threads={threads} catalog={catalog.path.name}")
        if not Path(samples_url(root, "unlabelled")).exists():
            prepare(catalog, root, args.sites, unlabelled, folder)
        seconds: dict[str, float] = {}
        networks = {}
        if any(m in NEEDS_PRETRAINING for m in args.models):
            timed("pretrain", seconds, pretrain_region, config, root, ctx=Context(progress=False))
            networks["ssl"] = checkpoint.load_config(stage_urls(root)["pretrain"])[0]
        networks["supervised"] = finetune_network(config, stage_urls(root)["labelled"], None, region_encoders(root))
        for name, network in networks.items():
            print(f"network_{name}=climate {network.climate_dim} wide x {network.climate_layers} layers, "
                  f"{network.climate_heads} heads, feedforward {network.climate_feedforward}, embedding "
                  f"{network.embedding}")
        for model in args.models:
            timed(model, seconds, evaluate_region, config, root, models=(model,), threads=threads, progress=False)
        result = timed("report", seconds, evaluate_region, config, root, models=tuple(args.models), threads=threads,
                       progress=False)
        for model in (m for m in NETWORKS if m in args.models):
            epochs = epochs_trained(root, model)
            print(f"{model}_epochs={np.mean(epochs):.1f} (runs: {len(epochs)}, min {min(epochs)}, max {max(epochs)})")
        print_table(evaluation_table(result.summary))
        for model in args.models:
            print(f"{model}_pooled_r2={result.summary['models'][model]['pooled']['r2']:.3f}")
        print(f"total_s={sum(v for k, v in seconds.items() if k != 'report'):.0f}")
    finally:
        if not args.root:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
