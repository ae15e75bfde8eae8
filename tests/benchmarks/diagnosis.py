"""Why the networks trail the forests on the demo, measured (not a test; CPU, the demo catalog's small models).

    python tests/benchmarks/diagnosis.py [--root DIR] [--labels 50,100,200,500] [--models ...] [--probe-only]
                                    [--pretrain-epochs N]

1. A learning curve: ssl, supervised, hybrid, rf and qrf in 5-fold spatial cross-validation with 50, 100, 200
   and 500 simulated lab samples. One cube, one unlabelled SampleSet (10,000 random locations) and one
   pretraining serve every size, so the sizes differ only in their labels. Prints pooled R² and RMSE per model
   and size, and `demo_ssl_vs_supervised_rmse_ratio_<N>_labels=<x>` (goal <= 0.9 at 100).
2. A linear probe of the frozen encoders: ridge regression (spatial folds) from the pretrained embeddings of the
   10,000 unlabelled locations to latents the synthetic world knows (impeded drainage, wetness, mean
   temperature, clay, the field-mosaic contrast, log true SOC), beside the same network untrained (a random
   encoder: the floor) and the trees' covariate features (what a linear model gets without any encoder).
3. What the ViT sees of the centre pixel: the same probe from the image embedding to the centre pixel's bands
   and to the 5 x 5 px window mean around it (mean R² over bands).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from geosoc.catalog import Catalog, SyntheticSource, load_catalog
from geosoc.cli import evaluation_table, print_table
from geosoc.data.cube import build_cube
from geosoc.data.sampling import random_points, sample_points, samples_url
from geosoc.data.streaming import SampleData
from geosoc.demo import simulated_lab_points
from geosoc.evaluation.campaign import evaluate_region
from geosoc.learn import baselines, checkpoint
from geosoc.learn.models import SoilNet
from geosoc.learn.training import forward_all, pretrain_region, stage_urls
from geosoc.sources.synthetic import Landscape
from geosoc.threads import use_threads

LATENTS = ("drainage", "wet", "tmean", "clay", "mosaic", "log_soc")
PROBE_SAMPLES = 4000  # of the unlabelled locations: enough for a stable ridge fit, seconds to embed


def shared_root(root: Path, pretrain_epochs: int | None) -> str:
    """The cube, the unlabelled SampleSet and the pretrained encoders every label count shares (pretrained for
    `pretrain_epochs`, default the catalog's; a pretraining with fewer epochs is continued)."""
    loaded = load_catalog("demo")
    config = loaded.config
    shared = str(root / "shared")
    cube = build_cube(loaded, shared, progress=False)
    unlabelled = samples_url(shared, "unlabelled")
    if not Path(unlabelled).exists():
        points = random_points(cube, 10_000, config.sampling.patch_size, config.training.seed)
        sample_points(cube, points, unlabelled, config.sampling.patch_size, kind="unlabelled",
                      fold_block_size=config.sampling.fold_block_size, folds=5, seed=config.training.seed)
    started = time.perf_counter()
    metrics = pretrain_region(config, shared, epochs=pretrain_epochs, ctx=None)  # resumes; nothing if finished
    print(f"pretraining: {time.perf_counter() - started:.0f} s, {len(metrics.get('history', []))} epochs, best "
          f"validation NT-Xent {metrics.get('best_val_loss', float('nan')):.3f}")
    return shared


def labelled_root(root: Path, shared: str, labels: int) -> str:
    """A region root with `labels` simulated lab samples and the shared pretrained encoders."""
    loaded = load_catalog("demo")
    config = loaded.config
    out = str(root / f"labels-{labels}")
    if not Path(samples_url(out, "labelled")).exists():
        cube = f"{shared}/cube.zarr"
        points = simulated_lab_points(cube, loaded, labels, config.training.seed)
        sample_points(cube, points, samples_url(out, "labelled"), config.sampling.patch_size,
                      fold_block_size=config.sampling.fold_block_size, folds=5, seed=config.training.seed)
        shutil.copytree(stage_urls(shared)["pretrain"], stage_urls(out)["pretrain"])
    return out


def learning_curve(root: Path, shared: str, sizes: list[int], models: tuple[str, ...], threads: int) -> None:
    catalog = load_catalog("demo").config
    rows = []
    for labels in sizes:
        started = time.perf_counter()
        result = evaluate_region(catalog, labelled_root(root, shared, labels), models=models, threads=threads,
                                 progress=False)
        print(f"\n{labels} labels: {time.perf_counter() - started:.0f} s")
        print_table(evaluation_table(result.summary))
        pooled = {m: result.summary["models"][m]["pooled"] for m in models}
        rows.append((labels, pooled))
        if {"ssl", "supervised"} <= set(models):
            ratio = pooled["ssl"]["rmse"] / pooled["supervised"]["rmse"]
            print(f"demo_ssl_vs_supervised_rmse_ratio_{labels}_labels={ratio:.3f}")
    print("\nlearning curve, pooled R² (RMSE g/kg):")
    print("labels | " + " | ".join(models))
    for labels, pooled in rows:
        print(f"{labels} | " + " | ".join(f"{pooled[m]['r2']:.3f} ({pooled[m]['rmse']:.2f})" for m in models))


def probe_r2(features: np.ndarray, targets: np.ndarray, groups: np.ndarray) -> float:
    """Held-out R² of a ridge regression (alpha chosen inside), on spatial folds; mean over target columns."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    predicted = cross_val_predict(model, features, targets, groups=groups, cv=GroupKFold(5))
    return float(r2_score(targets, predicted, multioutput="uniform_average"))


def probes(shared: str, config: Catalog | None = None) -> None:
    """The probes on the region at `shared` (its unlabelled SampleSet and pretrained encoders) of `config`'s
    landscape (default: the demo's; tests/benchmarks/continent.py passes the continent's)."""
    config = config or load_catalog("demo").config
    assert isinstance(config.imagery.source, SyntheticSource)
    url = stage_urls(shared)["pretrain"]
    data = SampleData(stage_urls(shared)["unlabelled"])
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(data.size, size=min(PROBE_SAMPLES, data.size), replace=False))
    device = torch.device("cpu")
    pretrained, meta = checkpoint.load_model(url, device)
    norm = checkpoint.normalisation(url, meta)
    torch.manual_seed(0)
    untrained = SoilNet(pretrained.config).eval()
    size = pretrained.config.embedding
    embedded = {name: forward_all(net, data, rows, norm, device, 256)[1]
                for name, net in (("pretrained", pretrained), ("untrained", untrained))}

    field = Landscape(config.imagery.source.seed).fields(data.x[rows], data.y[rows], config.region.crs)
    latents = {name: field[name] for name in LATENTS if name != "log_soc"} | {"log_soc": np.log(field["soc"])}
    batch = data.rows(rows)
    covariates = baselines.covariate_features(batch, data.bands, data.variables, data.time).values
    covariates = np.nan_to_num(covariates - np.nanmean(covariates, axis=0))
    groups = data.fold[rows]

    print(f"\nlinear probe on {len(rows)} unlabelled locations (held-out R², ridge, 5 spatial folds):")
    print("latent | pretrained image+climate | untrained image+climate | pretrained image | pretrained climate | "
          "covariate features")
    for name, values in latents.items():
        keep = np.isfinite(values)
        target = values[keep]

        def r2(features: np.ndarray, keep: np.ndarray = keep, target: np.ndarray = target) -> float:
            return probe_r2(features[keep], target, groups[keep])

        both = {k: v[:, : 2 * size] for k, v in embedded.items()}
        figures = (r2(both["pretrained"]), r2(both["untrained"]), r2(embedded["pretrained"][:, :size]),
                   r2(embedded["pretrained"][:, size : 2 * size]), r2(covariates))
        print(f"{name} | " + " | ".join(f"{f:.3f}" for f in figures))
        print(f"probe_{name}_r2 pretrained={figures[0]:.3f} untrained={figures[1]:.3f}")

    patch = batch["patch"]
    c, h = patch.shape[-1] // 2, baselines.WINDOW // 2
    centre = np.nan_to_num(patch[:, :, c, c])
    window = np.nan_to_num(np.nanmean(patch[:, :, c - h : c + h + 1, c - h : c + h + 1], axis=(2, 3)))
    print("\nwhat the image embedding holds of the centre (held-out R², mean over bands):")
    for name in ("pretrained", "untrained"):
        image = embedded[name][:, :size]
        print(f"vit_centre_pixel_r2 {name}={probe_r2(image, centre, groups):.3f} "
              f"window{baselines.WINDOW}={probe_r2(image, window, groups):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="keep the artefacts here (default: a temporary folder)")
    parser.add_argument("--labels", default="50,100,200,500", help="label counts of the learning curve")
    parser.add_argument("--models", default="ssl,supervised,hybrid,rf,qrf")
    parser.add_argument("--probe-only", action="store_true", help="only the probes (no learning curve)")
    parser.add_argument("--pretrain-epochs", type=int, help="pretraining epochs (default: the demo catalog's)")
    args = parser.parse_args()
    threads = use_threads()
    folder = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="geosoc-diagnosis-"))
    try:
        shared = shared_root(folder, args.pretrain_epochs)
        probes(shared)
        if not args.probe_only:
            learning_curve(folder, shared, [int(n) for n in args.labels.split(",")],
                           tuple(args.models.split(",")), threads)
    finally:
        if not args.root:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
