"""Honest skill: metrics against scikit-learn and hand computations, no leakage of the test fold, conformal
calibration, fold-safe fine-tuning runs, and `geosoc evaluate` with every model, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from geosoc.catalog import FinetuneConfig, PretrainConfig, load_catalog
from geosoc.errors import GeosocError
from geosoc.learn import checkpoint
from geosoc.learn.training import finetune, pretrain
from geosoc.stats.calibration import conformal_offset, conformal_quantile, covering_scores, widen
from geosoc.stats.metrics import regression_metrics
from geosoc.threads import available_cores
from tests.helpers import CPU, config_for, copy_region, tiny_sampleset


def test_metrics_against_sklearn_and_by_hand() -> None:
    rng = np.random.default_rng(0)
    observed = rng.lognormal(3, 0.5, 200)
    predicted = observed * rng.normal(1, 0.2, 200) + 2
    lower, upper = predicted * 0.7, predicted * 1.3
    m = regression_metrics(observed, predicted, lower, upper)
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(observed, predicted)))
    assert m["mae"] == pytest.approx(mean_absolute_error(observed, predicted))
    assert m["r2"] == pytest.approx(r2_score(observed, predicted))
    mo, mp = observed.mean(), predicted.mean()
    ccc = 2 * np.mean((observed - mo) * (predicted - mp)) / (observed.var() + predicted.var() + (mo - mp) ** 2)
    assert m["ccc"] == pytest.approx(ccc)
    q1, q3 = np.percentile(observed, [25, 75])
    assert m["rpiq"] == pytest.approx((q3 - q1) / m["rmse"])
    assert m["bias"] == pytest.approx(np.mean(predicted - observed))
    assert m["picp"] == pytest.approx(np.mean((observed >= lower) & (observed <= upper)))
    assert m["width"] == pytest.approx(np.mean(upper - lower))


def test_metrics_degenerate_cases() -> None:
    constant = regression_metrics(np.full(5, 3.0), np.array([2.0, 3, 4, 3, 3]))
    assert constant["r2"] == r2_score(np.full(5, 3.0), [2.0, 3, 4, 3, 3])  # scikit-learn's convention
    assert constant["rpiq"] == 0.0 and constant["ccc"] == 0.0
    exact = regression_metrics(np.full(3, 2.0), np.full(3, 2.0))
    assert exact["rmse"] == 0 and np.isinf(exact["rpiq"]) and np.isnan(exact["ccc"])
    one = regression_metrics(np.array([5.0]), np.array([4.0]), np.array([3.0]), np.array([6.0]))
    assert np.isnan(one["r2"]) and one["rmse"] == 1.0 and one["picp"] == 1.0 and one["width"] == 3.0
    no_interval = regression_metrics(np.arange(4.0), np.arange(4.0), np.full(4, np.nan), np.full(4, np.nan))
    assert np.isnan(no_interval["picp"]) and np.isnan(no_interval["width"])
    assert all(np.isnan(v) for v in regression_metrics(np.array([]), np.array([])).values())


def test_conformal_calibration_fixes_an_overconfident_interval() -> None:
    rng = np.random.default_rng(1)
    truth = lambda n: rng.normal(0, 1, n)  # noqa: E731
    calibration, test = truth(500), truth(5000)
    median = np.zeros_like
    narrow = 0.2  # a deliberately over-confident "90 %" interval: +-0.2 where the noise has sd 1
    before = np.mean(np.abs(test) <= narrow)
    offset = conformal_offset(np.full(500, -narrow), np.full(500, narrow), calibration, 0.9)
    lower, upper = widen(np.full(5000, -narrow), np.full(5000, narrow), median(test), offset)
    after = np.mean((test >= lower) & (test <= upper))
    assert before < 0.25 and abs(after - 0.9) < 0.03
    wide = conformal_offset(np.full(500, -5.0), np.full(500, 5.0), calibration, 0.9)  # too wide: narrowed
    assert wide < 0


@pytest.mark.parametrize("n", [19, 40])
def test_the_conformal_rule_covers_at_the_nominal_rate_with_few_calibration_samples(n: int) -> None:
    """Exchangeable calibration and test data, a miscalibrated interval: over 4,000 repetitions the calibrated
    interval covers new data at ceil(0.9 (n + 1)) / (n + 1) (= 0.9 for n = 19, 0.902 for n = 40), within 0.005.
    A rank one too high or too low moves the coverage by 1 / (n + 1) >= 0.024, so this fails when the rule is off."""
    rng = np.random.default_rng(n)
    reps, tests = 4000, 50
    covered = np.empty(reps)
    for rep in range(reps):
        calibration, test = rng.standard_t(3, n), rng.standard_t(3, tests)  # heavy tails: no normal shortcut
        offset = conformal_offset(np.full(n, -0.5), np.full(n, 0.3), calibration, 0.9)
        lower, upper = widen(np.full(tests, -0.5), np.full(tests, 0.3), np.zeros(tests), offset)
        covered[rep] = np.mean((test >= lower) & (test <= upper))
    expected = np.ceil(0.9 * (n + 1)) / (n + 1)
    assert abs(covered.mean() - expected) < 0.005


def test_covering_scores_of_shifted_bounds_give_the_cqr_offset() -> None:
    """With bounds that are the interval shifted by the offset, each sample's least covering offset is its CQR
    score, so the two rules agree (narrowing included)."""
    rng = np.random.default_rng(1)
    lower, upper, observed = rng.normal(-1, 0.3, 40), rng.normal(1, 0.3, 40), rng.standard_t(3, 40)
    for lo, hi in ((lower, upper), (lower * 5, upper * 5)):
        expected = conformal_offset(lo, hi, observed, 0.9)
        found = conformal_quantile(covering_scores(lambda off, lo=lo, hi=hi: widen(lo, hi, np.zeros(40), off),
                                                   observed), 0.9)
        assert found == pytest.approx(expected, abs=1e-9)


def test_an_ensembles_mean_interval_covers_at_the_nominal_rate() -> None:
    """Three members, each with errors of its own, give log-space intervals that are decoded (exp) and averaged
    as `ensemble.mean_interval` does: one offset from `covering_scores` on 19 calibration samples makes the mean
    cover new data at 0.9 over 1,000 repetitions (within 0.01; one rank off moves it by 0.05). Each member's own
    offset covers its own errors, which the mean averages away: the mean of those intervals over-covers."""
    rng = np.random.default_rng(3)
    n, tests, reps, k = 19, 50, 1000, 3
    covered, own = np.empty(reps), np.empty(reps)

    def mean_bounds(centres: np.ndarray, offsets: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        lower, upper = widen(centres - 0.4, centres + 0.4, centres, offsets)
        return np.exp(lower).mean(0), np.exp(upper).mean(0)

    for rep in range(reps):
        truth = rng.normal(3, 1, n + tests)
        observed = np.exp(truth + 0.3 * rng.standard_t(4, n + tests))
        centres = truth + 0.4 * rng.standard_normal((k, n + tests))  # each member's own error
        offset = conformal_quantile(covering_scores(lambda off, fit=centres[:, :n]: mean_bounds(fit, off),
                                                    observed[:n]), 0.9)
        lower, upper = mean_bounds(centres[:, n:], offset)
        covered[rep] = np.mean((observed[n:] >= lower) & (observed[n:] <= upper))
        offsets = np.array([[conformal_offset(c - 0.4, c + 0.4, np.log(observed[:n]), 0.9)] for c in centres[:, :n]])
        lower, upper = mean_bounds(centres[:, n:], offsets)
        own[rep] = np.mean((observed[n:] >= lower) & (observed[n:] <= upper))
    assert abs(covered.mean() - 0.9) < 0.01
    assert own.mean() > covered.mean() + 0.02


def _poison(url: str, fold: int | None, value: float) -> None:
    """Replace the targets of one fold (or all) in place: a run that never sees them must not change."""
    import zarr

    group = zarr.open_group(url, mode="r+")
    target, folds = group["target"][:], group["fold"][:]
    target[folds == fold if fold is not None else slice(None)] = value
    group["target"][:] = target


def test_the_test_fold_never_reaches_training_validation_normalisation_or_calibration(tmp_path: Path) -> None:
    clean = tiny_sampleset(str(tmp_path / "clean.zarr"), n=64)
    poisoned = str(tmp_path / "poisoned.zarr")
    shutil.copytree(clean, poisoned)
    _poison(poisoned, 2, 1e6)
    stage = FinetuneConfig(epochs=2, batch_size=8, patience=100)
    for url, out in ((clean, tmp_path / "a"), (poisoned, tmp_path / "b")):
        finetune(url, str(out), config_for(clean), stage, test_fold=2, ctx=CPU)
    meta_a = json.loads((tmp_path / "a" / "config.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta_a["normalisation"] == meta_b["normalisation"] and meta_a["calibration"] == meta_b["calibration"]
    assert meta_a["test_fold"] == 2
    for key, value in checkpoint.load_weights(str(tmp_path / "a")).items():
        assert torch.equal(value, checkpoint.load_weights(str(tmp_path / "b"))[key]), key
    ref_a, ref_b = checkpoint.load_aoa(str(tmp_path / "a")), checkpoint.load_aoa(str(tmp_path / "b"))
    np.testing.assert_array_equal(ref_a.embeddings, ref_b.embeddings)
    assert 2 not in set(ref_a.folds.tolist())


def test_pretraining_reads_no_targets(tmp_path: Path) -> None:
    clean = tiny_sampleset(str(tmp_path / "clean.zarr"), n=40)
    poisoned = str(tmp_path / "poisoned.zarr")
    shutil.copytree(clean, poisoned)
    _poison(poisoned, None, 123.0)
    for url, out in ((clean, tmp_path / "a"), (poisoned, tmp_path / "b")):
        pretrain(url, str(out), config_for(clean), PretrainConfig(epochs=1, batch_size=8), ctx=CPU)
    weights_b = checkpoint.load_weights(str(tmp_path / "b"))
    for key, value in checkpoint.load_weights(str(tmp_path / "a")).items():
        assert torch.equal(value, weights_b[key]), key


def test_a_run_only_resumes_itself(tmp_path: Path) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"))
    out = str(tmp_path / "ft")
    stage = FinetuneConfig(epochs=1, batch_size=8)
    finetune(url, out, config_for(url), stage, test_fold=0, ctx=CPU)
    with pytest.raises(GeosocError, match=r"holds another run \(finetune .* test fold 0 held out.*test fold 1 held out"):
        finetune(url, out, config_for(url), stage.model_copy(update={"epochs": 2}), test_fold=1, ctx=CPU)
    finetune(url, out, config_for(url), stage, test_fold=1, ctx=CPU, resume=False)  # --fresh
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["test_fold"] == 1
    other_share = stage.model_copy(update={"epochs": 2, "validation_fraction": 0.3})  # (capped at half here)
    with pytest.raises(GeosocError, match=r"seed 0\); this one is .*, seed 0, validation share 0.3\."):
        finetune(url, out, config_for(url), other_share, test_fold=1, ctx=CPU)
    with pytest.raises(GeosocError, match="no fold 7 to hold out"):
        finetune(url, str(tmp_path / "x"), config_for(url), stage, test_fold=7, ctx=CPU)


def test_available_cores_is_within_the_affinity() -> None:
    import os

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def region_with_unlabelled(trained_region: tuple[Path, str],
                           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return copy_region(trained_region, tmp_path_factory.mktemp("evaluate"))


def test_evaluate_every_model_and_resume(region_with_unlabelled: tuple[Path, str], small_forests: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import geosoc.evaluation.campaign as evaluation
    from geosoc.cli import app

    path, root = region_with_unlabelled
    result = CliRunner().invoke(app, ["evaluate", "--catalog", str(path), "--root", root, "--epochs", "2", "-q"])
    assert result.exit_code == 0, result.output
    folder = Path(root) / "evaluation"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["models"]) == set(evaluation.MODELS)
    chosen, said = summary["recommendation"]["model"], " ".join(result.output.split())
    assert f"recommended: {chosen}, chosen for " in said and f"to map with {chosen}: geosoc " in said
    assert summary["recommendation"]["rule"] in said  # the rule, printed: it never reads a held-out fold
    # not a terminal here: the table is printed whole, not cut to 80 columns
    assert "…" not in result.output and "pooled R²" in result.output
    for model, stats in summary["models"].items():
        assert f"{stats['pooled']['r2']:.3f}" in result.output, model
    time = summary["time"]  # where it went: every model's runs by phase, and the campaign's own phases
    assert "where the evaluation's time went" in result.output
    for model, spent in time["models"].items():
        assert spent["runs"] == 3 and (spent["wall"]["fit"] > 0) == (model != "qrf"), model
        assert spent["wall"]["calibrate"] > 0 if model in ("ssl", "supervised", "hybrid", "gbm") else True, model
        assert spent["wall"]["predict"] > 0 and spent["wall"]["other"] > 0, model
    assert time["models"]["qrf"]["wall"]["fit"] == 0  # it reads the forest rf fitted on the same fold
    assert {"inputs", "report"} <= set(time["campaign"]["wall"]) <= {"inputs", "pretrain", "report"}
    parts = [v for spent in time["models"].values() for v in spent["cpu"].values()]
    assert time["cpu_s"] == pytest.approx(sum(parts) + sum(time["campaign"]["cpu"].values()), abs=0.1)
    assert time["wall_s"] > 0
    cores = available_cores()  # the command's threads: its networks' 6 runs train that many at a time
    assert time["network_processes"] == (min(cores, 6) if cores > 1 else 0)
    target = __import__("geosoc").open_sampleset(f"{root}/samples/labelled.zarr")["target"].attrs["long_name"]
    assert summary["target"] == target and f"({target} in " in result.output
    import pandas as pd

    metrics = pd.read_csv(folder / "metrics.csv")
    assert len(metrics) == len(evaluation.MODELS) * 3 and set(metrics["fold"]) == {0, 1, 2}
    predictions = pd.read_parquet(folder / "predictions.parquet")
    labelled = int(np.isfinite(__import__("geosoc").open_sampleset(f"{root}/samples/labelled.zarr")["target"]).sum())
    assert (predictions.groupby("model").size() == labelled).all()  # every labelled point held out exactly once
    assert set(predictions.columns) >= {"sample_id", "x", "y", "fold", "observed", "q05", "q50", "q95"}
    assert (folder / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert np.isnan(metrics.loc[metrics["model"] == "rf", "picp"]).all()
    ssl_runs = json.loads(next(folder.glob("runs/spatial-k3-*/ssl-*/r0-f1/config.json")).read_text())
    assert ssl_runs["test_fold"] == 1 and ssl_runs["pretrained"].endswith("models/pretrain")

    calls: list[str] = []
    real_fit_predict = evaluation.baselines.fit_predict

    def counting(*args, **kwargs):
        calls.append("tree")
        return real_fit_predict(*args, **kwargs)

    monkeypatch.setattr(evaluation.network_runs, "finetune_region", lambda *a, **k: calls.append("finetune"))
    monkeypatch.setattr(evaluation.baselines, "fit_predict", counting)
    again = evaluation.evaluate_region(load_catalog(path=path).config, root, epochs=2, progress=False)
    assert calls == [] and len(again.metrics) == len(metrics)  # every (model, fold) was already done
    assert all(s["reused_runs"] == 3 for s in again.summary["models"].values())
    assert all(s["runs"] == 0 and sum(s["wall"].values()) == 0 for s in again.summary["time"]["models"].values())
    monkeypatch.setattr(evaluation.network_runs, "member_predictions",
                        lambda run, data, rows, device: [(np.zeros(len(rows)),) * 3])
    other = evaluation.evaluate_region(load_catalog(path=path).config, root, epochs=3, models=("supervised", "rf"),
                                       progress=False)  # other epochs: the network runs again, the trees do not
    assert calls == ["finetune"] * 3 and other.summary["models"]["rf"]["reused_runs"] == 3
    assert other.summary["models"]["supervised"]["reused_runs"] == 0
    calls.clear()
    random = evaluation.evaluate_region(load_catalog(path=path).config, root, cv="random", folds=2,
                                        models=("rf", "qrf"), progress=False)
    assert random.summary["cv"] == "random" and len(random.metrics) == 4 and calls == ["tree"] * 4


def test_network_runs_in_processes_of_their_own_are_the_runs_made_here(trained_region: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    """On a CPU with two threads the network runs train side by side in two processes (one torch thread each);
    with one thread they train here in turn. The same runs: the same held-out predictions, to the bit."""
    from geosoc.evaluation.campaign import evaluate_region

    path, root = copy_region(trained_region, tmp_path)
    catalog = load_catalog(path=path).config
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        here = evaluate_region(catalog, root, models=("supervised",), epochs=1, threads=1, progress=False,
                               device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(Path(root) / "evaluation")
    apart = evaluate_region(catalog, root, models=("supervised",), epochs=1, threads=2, progress=False,
                            device=torch.device("cpu"))
    assert here.summary["time"]["network_processes"] == 0 and apart.summary["time"]["network_processes"] == 2
    assert apart.summary["time"]["models"]["supervised"]["runs"] == 3
    assert apart.summary["time"]["models"]["supervised"]["cpu"]["fit"] > 0  # the processes' own CPU time
    columns = ["sample_id", "q05", "q50", "q95"]
    pd.testing.assert_frame_equal(here.predictions[columns], apart.predictions[columns])


def test_a_network_process_that_dies_is_one_error_line() -> None:
    """A process of the pool killed (out of memory, say) under a run: one IncompleteError naming the run and how
    to go on, not a BrokenProcessPool traceback."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from geosoc.errors import IncompleteError
    from geosoc.evaluation import network_runs

    network = network_runs.NetworkRun("ssl", 0, (2,), "/runs/ssl-x/r0-f2", np.zeros(4, np.int64), np.arange(2))
    died: Future = Future()
    died.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    made = network_runs.Runs(None, torch.device("cpu"), None, {network.key: died}, processes=2)  # type: ignore[arg-type]
    with pytest.raises(IncompleteError, match=r"/runs/ssl-x/r0-f2 ended without a result .* --threads 1"):
        made.result(network)


def test_evaluate_needs_unlabelled_samples_for_ssl(trained_region: tuple[Path, str], tmp_path: Path,
                                                  small_forests: None) -> None:
    from geosoc.evaluation.campaign import evaluate_region

    path, root = copy_region(trained_region, tmp_path, leave_out=("unlabelled.zarr",))
    with pytest.raises(GeosocError, match="need pretrained encoders"):
        evaluate_region(load_catalog(path=path).config, root, models=("ssl",), progress=False)
    with pytest.raises(GeosocError, match="unknown model"):
        evaluate_region(load_catalog(path=path).config, root, models=("svm",), progress=False)
    result = evaluate_region(load_catalog(path=path).config, root, models=("supervised", "gbm"), epochs=1,
                             progress=False, device=torch.device("cpu"))
    assert set(result.summary["models"]) == {"supervised", "gbm"}
    assert len(result.metrics) == 2 * 3 and np.isfinite(result.metrics["rmse"]).all()  # 2 models x 3 folds
    assert not Path(root, "models", "pretrain").exists()  # the supervised network needs no pretraining


def test_the_scatter_plot_shows_every_point(tmp_path: Path) -> None:
    """Points beyond the axes are drawn at the edge and counted, not dropped."""
    import pandas as pd

    from geosoc.evaluation.campaign import _scatter

    rng = np.random.default_rng(0)
    observed = np.append(rng.uniform(5, 30, 199), 400.0)  # one far observation
    rows = [pd.DataFrame({"model": model, "observed": observed, "q50": observed * 0.9, "q05": observed * 0.5,
                          "q95": observed * 1.5}) for model in ("rf", "qrf")]
    pooled = {"rmse": 3.0, "r2": 0.5, "picp": None}
    summary = {"target": "ORCDRC", "units": "g/kg", "models": {m: {"pooled": pooled} for m in ("rf", "qrf")}}
    beyond = _scatter(pd.concat(rows), ("rf", "qrf"), summary, tmp_path / "scatter.png")
    assert beyond == {"rf": 1, "qrf": 1}
    assert (tmp_path / "scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_the_stopwatch_gives_each_second_to_one_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested phases pause the outer one; time outside any phase goes to the collection's name; nothing is
    recorded with no collection open. A fake clock: wall ticks 1 s and CPU 2 s per reading."""
    from geosoc import stopwatch

    ticks = iter(range(100))
    monkeypatch.setattr(stopwatch, "_now", lambda: (t := next(ticks), 2.0 * t))
    with stopwatch.phase("fit"):  # no collection open: nothing read, nothing kept
        pass
    with stopwatch.collecting("other") as spent:  # reading 0
        with stopwatch.phase("fit"):  # 1
            with stopwatch.phase("calibrate"):  # 2
                pass  # 3
        # fit ends at 4
    # other ends at 5
    assert {name: (s.wall, s.cpu) for name, s in spent.items()} == {
        "other": (2.0, 4.0), "fit": (2.0, 4.0), "calibrate": (1.0, 2.0)}


def test_rf_and_qrf_share_one_forest_per_training_part(small_forests: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantile forest grows the random forest's trees: rf read from it predicts what a random forest fitted
    alone predicts, and one training part fits it once for both models. Samples come in pairs with the same
    features and other targets (two samples in one embedding cell), so leaves hold two targets."""
    from geosoc.learn import baselines

    rng = np.random.default_rng(3)
    x = np.repeat(rng.normal(size=(60, 6)), 2, axis=0).astype(np.float32)
    y = np.exp(x[:, 0] + rng.normal(0, 0.3, 120))
    train, test = slice(0, 90), slice(90, None)
    alone = {m: baselines.fit_predict(m, x[train], y[train], x[test], seed=1, threads=1) for m in ("rf", "qrf")}
    fits: list[str] = []
    real_fit = baselines.fit
    monkeypatch.setattr(baselines, "fit", lambda name, *a, **k: fits.append(name) or real_fit(name, *a, **k))
    forests: dict = {}
    shared = {m: baselines.fit_predict(m, x[train], y[train], x[test], seed=1, threads=1, forests=forests)
              for m in ("rf", "qrf")}
    assert fits == ["qrf"]
    np.testing.assert_allclose(shared["rf"][1], alone["rf"][1], rtol=1e-9)
    assert np.isnan(shared["rf"][0]).all() and np.isnan(shared["rf"][2]).all()
    for got, expected in zip(shared["qrf"], alone["qrf"], strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_boosting_calibrates_on_its_outer_quantiles_fitted_out_of_fold(small_forests: None, threads: int) -> None:
    """The CQR offset of gbm from held-out groups of the training part, recomputed here fit by fit (a few hundred
    samples: a histogram bin per 5 of them); the fits run side by side on two threads give the same models as one
    after the other."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.model_selection import GroupKFold
    from threadpoolctl import threadpool_limits

    from geosoc.learn import baselines

    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = np.exp(x[:, 0] + rng.normal(0, 0.4, 400))
    groups = np.repeat(np.arange(4), 100)
    fitted = baselines.fit("gbm", x, y, seed=2, threads=threads, groups=groups)
    z = np.log1p(y)

    def boosted(q: float, rows: np.ndarray) -> HistGradientBoostingRegressor:
        bins = max(32, len(rows) // 5)  # below 1,275 samples: a bin per 5 samples, at least 32
        with threadpool_limits(1, user_api="openmp"):  # on a few samples OpenMP's threads mostly wait
            return HistGradientBoostingRegressor(loss="quantile", quantile=q, max_iter=baselines.BOOSTING_ROUNDS,
                                                 learning_rate=0.05, max_bins=bins, random_state=2).fit(x[rows], z[rows])

    lower, upper = np.empty(len(z)), np.empty(len(z))
    for part, held in GroupKFold(3).split(x, groups=groups):
        lower[held], upper[held] = boosted(0.05, part).predict(x[held]), boosted(0.95, part).predict(x[held])
    assert fitted.offset == pytest.approx(conformal_offset(lower, upper, z, 0.9), abs=1e-12)
    everything = np.arange(len(z))
    for model, q in zip(fitted.estimators, baselines.QUANTILES, strict=True):
        np.testing.assert_array_equal(model.predict(x), boosted(q, everything).predict(x))
