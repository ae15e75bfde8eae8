"""Models made from other models' held-out predictions (`+rk`, `stack`) and the recommendation: none of them reads
a held-out fold's targets. Synthetic prediction tables stand in for a campaign's runs (the campaign end to end is
in test_evaluation.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from geosoc.evaluation.nested import derived_predictions, needs_pairs, pairs
from geosoc.evaluation.recommend import mappable, per_fold_choices, recommend
from geosoc.stats.metrics import regression_metrics

FOLDS = 4


def world(seed: int = 0, n: int = 240) -> pd.DataFrame:
    """Samples on a 100 x 100 square, 4 folds of vertical strips, SOC from a smooth field times noise."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
    smooth = np.sin(x / 15) + np.cos(y / 12)
    return pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(n)], "x": x, "y": y,
                         "fold": np.minimum(x // 25, FOLDS - 1).astype(int),
                         "observed": np.exp(2.5 + 0.5 * smooth + rng.normal(0, 0.1, n)), "smooth": smooth})


def model_predictions(samples: pd.DataFrame, model: str, skill: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Outer (held-out fold) and pair-run predictions of a made-up model that sees `skill` of the smooth field:
    its predictions are a function of the sample alone (not of which folds were held out), as a model would
    roughly be; 'rf' has no interval."""
    rng = np.random.default_rng(seed)
    median = np.exp(2.5 + 0.5 * skill * samples["smooth"].to_numpy() + rng.normal(0, 0.05, len(samples)))
    lower, upper = (np.full(len(samples), np.nan),) * 2 if model == "rf" else (median * 0.8, median * 1.25)
    base = samples.assign(model=model, repeat=0, q05=lower, q50=median, q95=upper)
    outer = base.copy()
    inner = []
    for j, k in pairs(samples["fold"].to_numpy()):
        part = base[base["fold"].isin((j, k))].copy()
        part["with_fold"] = np.where(part["fold"] == j, k, j)
        inner.append(part)
    columns = ["model", "repeat", "fold", "sample_id", "x", "y", "observed", "q05", "q50", "q95"]
    return outer[columns], pd.concat(inner)[[*columns, "with_fold"]]


def campaign(samples: pd.DataFrame, skills: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    made = [model_predictions(samples, m, s, i) for i, (m, s) in enumerate(skills.items())]
    return pd.concat([o for o, _ in made], ignore_index=True), pd.concat([i for _, i in made], ignore_index=True)


def test_pairs_and_what_needs_them() -> None:
    assert pairs(np.array([2, 0, 1, 1])) == [(0, 1), (0, 2), (1, 2)]
    assert needs_pairs(("ssl", "rf", "qrf+rk")) == ()  # the base of qrf+rk is not evaluated: nothing to pair
    assert needs_pairs(("ssl", "rf", "qrf", "qrf+rk")) == ("qrf",)
    assert needs_pairs(("ssl", "rf", "stack")) == ("ssl", "rf")
    from geosoc.errors import InputError
    from geosoc.evaluation.nested import check_folds

    with pytest.raises(InputError, match="two or more models"):
        check_folds(("rf", "stack"), 5)
    with pytest.raises(InputError, match=r"rf\+rk need at least 3 folds"):
        check_folds(("rf", "rf+rk"), 2)
    check_folds(("rf", "qrf", "stack", "rf+rk"), 3)


def test_residual_kriging_recovers_what_the_model_misses() -> None:
    """A model that sees half of the smooth field leaves the rest in its residuals: kriging them lifts its R²,
    its interval (none for rf) is calibrated on the training part, and the variogram is reported per fold."""
    samples = world()
    outer, inner = campaign(samples, {"rf": 0.5, "qrf": 0.5})
    frames, learnt = derived_predictions(outer, inner, ("rf", "qrf", "rf+rk", "qrf+rk"), seed=0)
    for model in ("rf", "qrf"):
        before = regression_metrics(outer[outer["model"] == model]["observed"], outer[outer["model"] == model]["q50"])
        kriged = frames[frames["model"] == f"{model}+rk"]
        after = regression_metrics(kriged["observed"], kriged["q50"], kriged["q05"], kriged["q95"])
        assert after["r2"] > before["r2"] + 0.1
        assert 0.8 <= after["picp"] <= 0.98
        assert len(kriged) == len(samples) and set(kriged["fold"]) == set(range(FOLDS))
    assert [v["fold"] for v in learnt["rf+rk"]] == list(range(FOLDS))
    assert all(v["variogram"]["variance"] > 0 for v in learnt["rf+rk"])


def poisoned(frame: pd.DataFrame, fold: int, column: str = "observed") -> pd.DataFrame:
    """The rows of `fold` with absurd targets (the held-out fold's, wherever they appear as held out)."""
    frame = frame.copy()
    rows = frame["fold"] == fold
    frame.loc[rows, column] = 1e4 * (1 + np.arange(rows.sum()) % 7)
    return frame


@pytest.mark.parametrize("model", ["stack", "rf+rk"])
def test_a_held_out_fold_targets_change_nothing_it_is_scored_by(model: str) -> None:
    """Poisoning fold 2's targets where it is held out (the outer predictions) changes neither the weights or
    variogram learnt for fold 2 nor its predictions: they come from the pair runs of its training part."""
    samples = world(1)
    outer, inner = campaign(samples, {"rf": 0.3, "qrf": 0.6, "gbm": 0.8})
    models = ("rf", "qrf", "gbm", model)
    clean, clean_learnt = derived_predictions(outer, inner, models, seed=0)
    dirty, dirty_learnt = derived_predictions(poisoned(outer, 2), inner, models, seed=0)
    columns = ["sample_id", "q05", "q50", "q95"]
    pd.testing.assert_frame_equal(clean[clean["fold"] == 2][columns].reset_index(drop=True),
                                  dirty[dirty["fold"] == 2][columns].reset_index(drop=True))
    assert clean_learnt[model][2] == dirty_learnt[model][2]


def test_stack_weights_follow_the_training_part() -> None:
    """The stack leans on the model that explains the training part (non-negative weights), and a fold's
    weights change when its training part's targets do."""
    samples = world(2)
    outer, inner = campaign(samples, {"rf": 0.1, "qrf": 0.9})
    frames, learnt = derived_predictions(outer, inner, ("rf", "qrf", "stack"), seed=0)
    for fold in learnt["stack"]:
        weights: dict[str, Any] = fold["weights"]
        assert min(weights.values()) >= 0 and weights["qrf"] > weights["rf"]
    stack = frames[frames["model"] == "stack"]
    assert regression_metrics(stack["observed"], stack["q50"])["r2"] > 0.5
    changed = derived_predictions(outer, poisoned(inner, 1), ("rf", "qrf", "stack"), seed=0)[1]["stack"]
    assert changed[2]["weights"] != learnt["stack"][2]["weights"]  # fold 1 is part of fold 2's training part


def metrics_of(predictions: pd.DataFrame) -> pd.DataFrame:
    rows = [{"model": m, "repeat": r, "fold": f, **regression_metrics(g["observed"].to_numpy(), g["q50"].to_numpy())}
            for (m, r, f), g in predictions.groupby(["model", "repeat", "fold"])]
    return pd.DataFrame(rows)


def test_recommendation_never_reads_the_held_out_fold() -> None:
    """Each fold's choice rests on the other folds' scores: shuffling (or poisoning) a fold's targets leaves its
    own choice as it was. The recommendation is among models that map (not the stack), and its honest score is
    that of the per-fold choices."""
    samples = world(3)
    outer, inner = campaign(samples, {"rf": 0.4, "qrf": 0.5, "supervised": 0.7})
    frames, _ = derived_predictions(outer, inner, ("rf", "qrf", "supervised", "stack"), seed=0)
    predictions = pd.concat([outer, frames], ignore_index=True)
    metrics = metrics_of(predictions)
    result = recommend(metrics, predictions)
    assert result is not None and result["model"] == "supervised" and "stack" not in result["candidates"]
    assert result["chosen_for"] == result["of"] == FOLDS
    rng = np.random.default_rng(0)
    for fold in range(FOLDS):
        shuffled = predictions.copy()
        rows = shuffled["fold"] == fold
        shuffled.loc[rows, "observed"] = rng.permutation(shuffled.loc[rows, "observed"].to_numpy())
        for changed in (shuffled, poisoned(predictions, fold)):
            choices = per_fold_choices(metrics_of(changed), tuple(result["candidates"]))
            assert choices.loc[choices["fold"] == fold, "model"].item() == result["per_fold"][fold]["model"]


def test_what_maps() -> None:
    assert mappable("ssl") and mappable("qrf") and mappable("rf+rk") and mappable("aef-qrf+rk")
    assert not mappable("hybrid") and not mappable("stack") and not mappable("ssl+rk")


def test_spatial_context_features() -> None:
    """`xy`: coordinates along six directions; `nn`: the nearest training samples' log1p SOC and distances, a
    training sample's own value left out even where another sample shares its place."""
    from geosoc.learn import context

    xy = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    soc = np.array([1.0, 3.0, 7.0, 15.0])
    oblique = context.features("xy", xy, soc, np.array([[2.0, 1.0]]))
    assert oblique.shape == (1, 6) and oblique[0, 0] == 2 and oblique[0, 3] == pytest.approx(1)
    own = context.features("nn", xy, soc, xy, training=True)
    assert own.shape == (4, 10)
    assert own[0, :4].tolist() == pytest.approx([np.log1p(3), 0, np.log1p(7), 5])  # not its own 1.0
    assert own[1, :2].tolist() == pytest.approx([np.log1p(1), 0])
    assert np.isnan(own[:, -2:]).all()  # 3 others only: the 4th and 5th neighbours are missing
    held = context.features("nn", xy, soc, np.array([[9.0, 0.0]]))
    assert held[0, :2].tolist() == pytest.approx([np.log1p(15), 1])
    assert context.names("nn")[:2] == ["nn1_log1p_soc", "nn1_distance"]
    with pytest.raises(ValueError, match="xy, nn"):
        context.features("buffers", xy, soc, xy)


def _poison_fold(url: str, fold: int, value: float) -> None:
    import zarr

    group = zarr.open_group(url, mode="r+")
    target, folds = group["target"][:], group["fold"][:]
    target[(folds == fold) & np.isfinite(target)] = value
    group["target"][:] = target


def test_evaluate_with_kriging_stacking_context_and_its_recommendation(trained_region: tuple[Any, str],
                                                                        tmp_path: Any, small_forests: None) -> None:
    """`geosoc evaluate` end to end on the tiny region (3 spatial folds): the forests with kriging, a stack over a
    network and the trees, a forest with nearest-sample features. The pair runs are made once and reused; the
    summary has each fold's variogram and weights and the recommendation. Then the same campaign on a copy whose
    fold-0 targets are poisoned: every model's fold-0 predictions, the stack and `+rk` included, are unchanged."""
    import json
    from pathlib import Path

    from geosoc.catalog import load_catalog
    from geosoc.evaluation.campaign import evaluate_region
    from tests.helpers import copy_region

    models = ("supervised", "rf", "qrf+nn", "rf+rk", "stack")
    results, places = {}, {}
    for name in ("clean", "poisoned"):
        path, root = places[name] = copy_region(trained_region, Path(tmp_path) / name, leave_out=("unlabelled.zarr",))
        if name == "poisoned":
            _poison_fold(f"{root}/samples/labelled.zarr", 0, 5e3)
        config = load_catalog(path=path).config
        results[name] = evaluate_region(config, root, models=models, epochs=1, progress=False)
    clean = results["clean"]
    summary = json.loads((Path(clean.outputs["summary.json"])).read_text())
    assert list(summary["models"]) == list(models)
    assert len(summary["models"]["rf+rk"]["per_fold"]) == 3 and "variogram" in summary["models"]["rf+rk"]["per_fold"][0]
    weights = summary["models"]["stack"]["per_fold"][0]["weights"]
    assert set(weights) == {"supervised", "rf", "qrf+nn"} and min(weights.values()) >= 0
    assert summary["recommendation"]["model"] in ("supervised", "rf", "qrf+nn", "rf+rk")
    assert summary["recommendation"]["of"] == 3 and "never decide" in summary["recommendation"]["rule"]
    runs = Path(clean.outputs["summary.json"]).parent / "runs"
    pair_runs = sorted(p.name for p in runs.glob("*/supervised-*/r0-p*-*.parquet"))
    assert pair_runs == ["r0-p0-1.parquet", "r0-p0-2.parquet", "r0-p1-2.parquet"]  # a pair run per two folds
    columns = ["model", "sample_id", "q05", "q50", "q95"]

    def fold_zero(result: Any) -> pd.DataFrame:
        part = result.predictions[result.predictions["fold"] == 0][columns]
        return part.sort_values(["model", "sample_id"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(fold_zero(clean), fold_zero(results["poisoned"]))
    assert results["poisoned"].summary["models"]["stack"]["per_fold"][0] == summary["models"]["stack"]["per_fold"][0]
    assert (results["poisoned"].summary["models"]["rf+rk"]["per_fold"][0]
            == summary["models"]["rf+rk"]["per_fold"][0])
    path, root = places["clean"]
    again = evaluate_region(load_catalog(path=path).config, root, models=models, epochs=1, progress=False)
    assert all(again.summary["models"][m]["reused_runs"] == 3 for m in ("supervised", "rf", "qrf+nn"))
    pd.testing.assert_frame_equal(fold_zero(again), fold_zero(clean))
