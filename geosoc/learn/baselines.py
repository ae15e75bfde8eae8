"""What soil mappers use instead of SSL-SoilNet, on features from the same SampleSet: random forest, gradient
boosting, quantile regression forest, and a hybrid (boosting on covariates plus the pretrained encoders'
embeddings). Every model is fitted on log1p(SOC), like the network, and predicts the median and a 90 % interval
(q05, q95) in the original units; the plain random forest has no interval (NaN). Boosting intervals are
conformalized (CQR on out-of-fold predictions of the training part), like the network's.

Covariate features, per sample: for every band the patch-centre value and the mean of the 5 x 5 px window
around it; for every climate variable the mean, the seasonal amplitude (range of the monthly climatology) and
the mean of each calendar month.

Embedding features (the `aef-*` models), per sample: for each of the AlphaEarth embedding's 64 axes the value
at the sample's cell and the mean over the 5 x 5 cells around it (the SampleSet's `embedding`). `aef-rf` and
`aef-qrf` use them alone, `aef+cov-qrf` beside the covariate features, `aef-hybrid` is boosting on both (the
hybrid with the AlphaEarth embedding in place of the pretrained encoders').
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from geosoc.errors import InputError
from geosoc.stopwatch import phase

WINDOW = 5  # px: the small window around the patch centre
QUANTILES = (0.05, 0.5, 0.95)
TREES = 300  # per forest
BOOSTING_ROUNDS = 300  # per quantile


@dataclass
class Features:
    values: np.ndarray  # (n, features), NaN where a covariate is missing
    names: list[str]


def _all_nan_is_nan() -> warnings.catch_warnings:
    """The mean of an all-NaN slice is NaN, which is what a missing covariate should be: no warning for it."""
    return warnings.catch_warnings(action="ignore", category=RuntimeWarning)


def covariate_features(batch: dict[str, np.ndarray], bands: list[str], variables: list[str],
                       months: np.ndarray | None) -> Features:
    """Tabular features of samples (see the module docstring) from a batch of patches and/or climate series."""
    columns: list[np.ndarray] = []
    names: list[str] = []
    if "patch" in batch and bands:
        patch = batch["patch"]
        c, h = patch.shape[-1] // 2, WINDOW // 2
        columns.append(patch[:, :, c, c])
        names += [f"{b}_centre" for b in bands]
        with _all_nan_is_nan():
            columns.append(np.nanmean(patch[:, :, c - h : c + h + 1, c - h : c + h + 1], axis=(2, 3)))
        names += [f"{b}_window{WINDOW}" for b in bands]
    if "climate" in batch and variables:
        series = batch["climate"]  # (n, time, variable)
        calendar = (months.astype("datetime64[M]").astype(int) % 12) if months is not None else np.arange(
            series.shape[1]) % 12
        present = [m for m in range(12) if (calendar == m).any()]  # calendar months the series covers
        with _all_nan_is_nan():
            columns.append(np.nanmean(series, axis=1))
            climatology = np.stack([np.nanmean(series[:, calendar == m], axis=1) for m in present], axis=1)
            columns.append(np.nanmax(climatology, axis=1) - np.nanmin(climatology, axis=1))
        names += [f"{v}_mean" for v in variables] + [f"{v}_amplitude" for v in variables]
        columns.append(climatology.reshape(len(series), -1))
        names += [f"{v}_m{m + 1:02d}" for m in present for v in variables]
    return Features(np.concatenate(columns, axis=1).astype(np.float32), names)


def embedding_features(patches: np.ndarray, bands: list[str]) -> Features:
    """Tabular features of (n, band, p, p) embedding vectors around samples: the centre cell and the mean of
    the p x p cells (NaN where none has data)."""
    c = patches.shape[-1] // 2
    with _all_nan_is_nan():
        window = np.nanmean(patches, axis=(2, 3))
    names = [f"{b}_centre" for b in bands] + [f"{b}_window{patches.shape[-1]}" for b in bands]
    return Features(np.concatenate([patches[:, :, c, c], window], axis=1).astype(np.float32), names)


Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]  # q05, median, q95 in the original units
AEF_NAMES = ("aef-rf", "aef-qrf", "aef+cov-qrf", "aef-hybrid")
NAMES = ("rf", "gbm", "qrf", "hybrid", *AEF_NAMES)
# The estimator each model is (what `fit` makes, how `Fitted.predict` reads it) ...
ESTIMATOR = {"rf": "rf", "gbm": "gbm", "qrf": "qrf", "hybrid": "gbm", "aef-rf": "rf", "aef-qrf": "qrf",
             "aef+cov-qrf": "qrf", "aef-hybrid": "gbm"}
# ... and the features it reads: covariates, AlphaEarth embedding features, the pretrained encoders' embeddings.
INPUTS = {"rf": ("covariates",), "gbm": ("covariates",), "qrf": ("covariates",), "hybrid": ("covariates", "ssl"),
          "aef-rf": ("aef",), "aef-qrf": ("aef",), "aef+cov-qrf": ("covariates", "aef"),
          "aef-hybrid": ("covariates", "aef")}


def uses_aef(name: str) -> bool:
    """Whether a model reads the AlphaEarth embedding (its SampleSet needs an `embedding` array)."""
    return "aef" in INPUTS.get(name, ())


def aef_features(samples: Any, indices: np.ndarray) -> Features:
    """The AlphaEarth embedding features of samples (`embedding_features`) from their SampleSet."""
    bands = [str(b) for b in samples["embedding_band"].values]
    return embedding_features(np.asarray(samples["embedding"].values[indices], np.float32), bands)


def require_embeddings(samples: Any, url: str, models: tuple[str, ...]) -> None:
    """Refuse models that read the AlphaEarth embedding when the SampleSet has none, saying how to get it."""
    wanting = [m for m in models if uses_aef(m)]
    if wanting and "embedding" not in samples:
        raise InputError(f"{url} has no AlphaEarth embeddings, which {', '.join(wanting)} read: add an `embeddings:` "
                         "section to the catalog (source: cog or earthengine, year: ...), rebuild the cube "
                         "(`geosoc build-cube`) and sample again (`geosoc sample`), or leave them out with --models")


def _imputed(model: Any) -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline

    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), model)


@dataclass
class Fitted:
    """A fitted tabular model: its estimators (one, or one per quantile for boosting), the features it uses and
    the CQR offset of its interval (log space). Saved with `geosoc.maps.tabular` (skops, no pickle)."""

    name: str  # the estimator: rf, qrf or gbm (ESTIMATOR)
    estimators: list[Any]
    usable: np.ndarray  # bool per feature: those with a value somewhere in the training part
    offset: float = 0.0

    def predict(self, x: np.ndarray) -> Prediction:
        x = x[:, self.usable]
        if self.name == "rf":
            median = np.expm1(_forest_mean(self.estimators[0], x))
            nan = np.full(len(x), np.nan)
            return nan, median, nan
        if self.name == "qrf":
            predicted = np.expm1(np.asarray(self.estimators[0].predict(x, quantiles=list(QUANTILES))))
            return predicted[:, 0], predicted[:, 1], predicted[:, 2]
        from geosoc.stats.calibration import interval

        z = np.stack([model.predict(x) for model in self.estimators], axis=1)
        lower, median, upper = interval(z, list(QUANTILES), self.offset)
        return np.expm1(lower), np.expm1(median), np.expm1(upper)


def _forest_mean(model: Any, x: np.ndarray) -> np.ndarray:
    """A random forest's prediction: the mean of its trees' predictions (each a leaf's mean target). A quantile
    forest's trees are a random forest's (see `fit_predict`), but its own "mean" reads the training samples it
    kept in its leaves (one per leaf by default), so it is averaged here from its trees, as scikit-learn does."""
    forest = model[-1]  # after the imputer
    if not hasattr(forest, "forest_"):  # a random forest
        return np.asarray(model.predict(x))
    filled = model[:-1].transform(x)
    return np.mean([tree.predict(filled) for tree in forest.estimators_], axis=0)


def _boosted(jobs: list[tuple[np.ndarray, np.ndarray, float]], seed: int, threads: int) -> list[Any]:
    """Histogram gradient boosting (pinball loss, log-space targets), one model per (x, z, quantile) job, the jobs
    `threads` at a time, each fit on one thread. On a few hundred samples a fit's own OpenMP threads mostly wait on
    each other (and spin where other work shares the cores), so independent fits side by side use the cores
    better; the models are the same either way (a fit's result does not depend on its thread count)."""
    from joblib import Parallel, delayed

    if threads <= 1 or len(jobs) == 1:
        return [_boost(x, z, q, seed) for x, z, q in jobs]
    return list(Parallel(n_jobs=min(threads, len(jobs)), prefer="threads")(
        delayed(_boost)(x, z, q, seed) for x, z, q in jobs))


def _boost(x: np.ndarray, z: np.ndarray, quantile: float, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="openmp"):  # this thread's OpenMP only (the limit is per thread)
        return HistGradientBoostingRegressor(loss="quantile", quantile=quantile, max_iter=BOOSTING_ROUNDS,
                                             learning_rate=0.05, max_bins=_bins(len(z)),
                                             random_state=seed).fit(x, z)


def _bins(samples: int) -> int:
    """Histogram bins per feature: scikit-learn's most (255) from 1,275 training samples up, about one bin per 5
    samples below (at least 32). A leaf holds at least 20 samples, so bins of 5 place a split at most a quarter
    of a leaf away from where 255 would; on a few hundred samples, scanning every bin of every feature at every
    node is most of a fit's time."""
    return min(255, max(32, samples // 5))


def fit(name: str, train_x: np.ndarray, train_y: np.ndarray, seed: int, threads: int,
        groups: np.ndarray | None = None) -> Fitted:
    """Fit a tabular model on log1p(SOC). Boosting (gbm, hybrid) gets a conformalized interval: the CQR offset
    comes from out-of-fold predictions of an inner split of the training part (quantile boosting alone
    under-covers), cross-conformal over `groups` (the training part's spatial folds) so that the held-out
    residuals are as far from their training data as a held-out fold is; a shuffled 3-fold split only when
    there are fewer than two groups. The plain random forest has no interval. `name` is any model of NAMES; the
    result is named by its estimator (rf, qrf or gbm)."""
    if name not in ESTIMATOR:
        raise ValueError(f"unknown tabular model {name!r}; one of {', '.join(NAMES)}")
    name = ESTIMATOR[name]
    usable = ~np.isnan(train_x).all(axis=0)
    x, z = train_x[:, usable], np.log1p(train_y)
    if name == "rf":
        from sklearn.ensemble import RandomForestRegressor

        model = _imputed(RandomForestRegressor(n_estimators=TREES, n_jobs=threads, random_state=seed))
        with phase("fit"):
            return Fitted(name, [model.fit(x, z)], usable)
    if name == "qrf":
        from quantile_forest import RandomForestQuantileRegressor

        model = _imputed(RandomForestQuantileRegressor(n_estimators=TREES, n_jobs=threads, random_state=seed))
        with phase("fit"):
            return Fitted(name, [model.fit(x, z)], usable)
    from geosoc.stats.calibration import conformal_offset

    with phase("calibrate"):  # the offset reads the outer quantiles only: no median is fitted for it
        splits = _calibration_splits(len(z), groups, seed)
        bounds = (QUANTILES[0], QUANTILES[-1])
        inner = _boosted([(x[part], z[part], q) for part, _ in splits for q in bounds], seed, threads)
        oof = np.empty((len(z), len(bounds)))
        for i, (_, held) in enumerate(splits):
            oof[held] = np.stack([model.predict(x[held]) for model in inner[2 * i : 2 * i + 2]], axis=1)
        offset = conformal_offset(oof[:, 0], oof[:, 1], z, bounds[1] - bounds[0])
    with phase("fit"):
        return Fitted(name, _boosted([(x, z, q) for q in QUANTILES], seed, threads), usable, float(offset))


def _calibration_splits(n: int, groups: np.ndarray | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner (fit, held-out) splits for the CQR offset: whole groups held out, at most 3 splits."""
    from sklearn.model_selection import GroupKFold, KFold

    if groups is not None and len(np.unique(groups)) >= 2:
        return list(GroupKFold(min(3, len(np.unique(groups)))).split(np.zeros(n), groups=groups))
    return list(KFold(3, shuffle=True, random_state=seed).split(np.zeros(n)))


def fit_predict(model: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int,
                threads: int, groups: np.ndarray | None = None, forests: dict[Any, Fitted] | None = None) -> Prediction:
    """Fit a tabular model (any of NAMES, on the features its INPUTS name) and predict.

    `forests`, a dict the caller keeps for one training part, fits each forest once for the models that share it:
    rf and qrf on the same features and seed grow the same trees (quantile-forest grows scikit-learn's random
    forest and also keeps the training samples of its leaves), so the quantile forest is fitted for whichever of
    them comes first and read by both, rf taking its mean (the random forest's prediction, to float rounding)."""
    if forests is not None and ESTIMATOR[model] in ("rf", "qrf"):
        key = (INPUTS[model], seed)
        if key not in forests:
            forests[key] = fit("qrf", train_x, train_y, seed, threads, groups)
        fitted = Fitted(ESTIMATOR[model], forests[key].estimators, forests[key].usable)
    else:
        fitted = fit(model, train_x, train_y, seed, threads, groups)
    with phase("predict"):
        return fitted.predict(test_x)
