"""Skill in spatial cross-validation: SSL-SoilNet against supervised-only, hybrid, random forest, boosting and a
quantile forest, every model on the same 5 spatial folds (not a test; CPU, the catalogs' small models).

    python tests/benchmarks/skill.py [--region demo|edgeroi] [--root DIR] [--repeats 1]

- demo: the synthetic demo region, 500 simulated lab samples (true SOC with a 10 % lab error) and 10,000
  unlabelled locations for cross-modal pretraining. Last lines: `ssl_vs_supervised_rmse_ratio=<x>` (goal <= 0.9)
  and `ssl_picp90=<x>` (goal 0.85-0.95).
- edgeroi: real data: the Edgeroi profiles' topsoil SOC (first horizon, g/kg) on the real 100/250 m covariate
  grids, image only (SimCLR pretraining on 2,000 unlabelled Edgeroi patches). Last lines:
  `edgeroi_best_minus_rf_r2=<x>` (the geosoc model, SSL network or hybrid, chosen without the test fold, minus
  the random forest; goal >= 0.05) and `edgeroi_picp90=<x>` (of that choice; goal 0.85-0.95).

Choosing "the best geosoc model" by its score on the test folds flatters it (selection on the test set). Here
the choice for each held-out fold is made on the other folds' scores only (a leave-one-fold-out selection: the
held-out fold's targets never decide), and the chosen model's score on that fold counts. The old,
test-fold choice is printed beside it for comparison.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from geosoc.catalog import load_catalog
from geosoc.cli import evaluation_table, print_table
from geosoc.data.cube import build_cube
from geosoc.data.points import read_points
from geosoc.data.sampling import random_points, sample_points, samples_url
from geosoc.demo import simulated_lab_points
from geosoc.evaluation.campaign import evaluate_region
from geosoc.threads import use_threads

EDGEROI_POINTS = Path(__file__).resolve().parents[2] / "geosoc" / "data" / "edgeroi" / "edgeroi_topsoil_first_horizon.csv"


def prepare(region: str, root: str, labelled: int, unlabelled: int) -> None:
    catalog = load_catalog(region)
    config = catalog.config
    sampling, seed = config.sampling, config.training.seed
    cube = build_cube(catalog, root, progress=False)
    folds = {"fold_block_size": sampling.fold_block_size, "folds": 5, "seed": seed}
    if region == "demo":
        points = simulated_lab_points(cube, catalog, labelled, seed)
    else:
        points = read_points(EDGEROI_POINTS, config.region.crs, "edgeroi", bounds=config.imagery_grid.bounds,
                             on_error="drop")
    report = sample_points(cube, points, samples_url(root, "labelled"), sampling.patch_size, **folds)
    print(f"labelled: {report.samples} samples ({len(report.dropped)} dropped for missing data)")
    random = random_points(cube, unlabelled, sampling.patch_size, seed)
    sample_points(cube, random, samples_url(root, "unlabelled"), sampling.patch_size, kind="unlabelled", **folds)
    print(f"unlabelled: {unlabelled} random locations")


def chosen_without_the_test_fold(metrics: pd.DataFrame, candidates: tuple[str, ...]) -> pd.DataFrame:
    """Per (repeat, fold): the candidate with the best mean R² over the *other* folds, and its row for this fold."""
    rows = []
    for (repeat, fold), _ in metrics.groupby(["repeat", "fold"]):
        others = metrics[(metrics["repeat"] == repeat) & (metrics["fold"] != fold) & metrics["model"].isin(candidates)]
        choice = others.groupby("model")["r2"].mean().idxmax()
        rows.append(metrics[(metrics["repeat"] == repeat) & (metrics["fold"] == fold) & (metrics["model"] == choice)])
    return pd.concat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", choices=("demo", "edgeroi"), default="demo")
    parser.add_argument("--root", help="keep the artefacts here (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    threads = use_threads()
    folder = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="geosoc-skill-"))
    try:
        root = str(folder / args.region)
        if not Path(root, "samples", "unlabelled.zarr").exists():
            prepare(args.region, root, labelled=500, unlabelled=10_000 if args.region == "demo" else 2_000)
        result = evaluate_region(load_catalog(args.region).config, root, repeats=args.repeats, threads=threads,
                                 progress=False)
        print_table(evaluation_table(result.summary))
        stats = result.summary["models"]
        if args.region == "demo":
            print(f"ssl_vs_supervised_rmse_ratio={stats['ssl']['mean']['rmse'] / stats['supervised']['mean']['rmse']:.3f}")
            print(f"ssl_picp90={stats['ssl']['mean']['picp']:.3f}")
        else:
            on_test = max(("ssl", "hybrid"), key=lambda m: stats[m]["mean"]["r2"])
            print(f"old, chosen on the test folds (flatters): {on_test}, R² minus rf "
                  f"{stats[on_test]['mean']['r2'] - stats['rf']['mean']['r2']:.3f}")
            chosen = chosen_without_the_test_fold(result.metrics, ("ssl", "hybrid"))
            rf = result.metrics[result.metrics["model"] == "rf"]
            print(f"chosen without the test fold, per fold: {', '.join(chosen['model'])}")
            print(f"edgeroi_best_minus_rf_r2={chosen['r2'].mean() - rf['r2'].mean():.3f}")
            print(f"edgeroi_picp90={chosen['picp'].mean():.3f}")
    finally:
        if not args.root:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
