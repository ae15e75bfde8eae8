"""Models made from other models' held-out predictions: `<model>+rk` (the model plus ordinary kriging of its
residuals) and `stack` (non-negative weights over the candidates), scored on each held-out fold like every model
and built without its targets.

Both need out-of-fold predictions on the training part of each held-out fold k. They come from *pair runs*: the
model refitted without two folds {j, k} and predicting both, so that its prediction at a sample of fold j saw
neither fold j's targets nor fold k's. A pair run serves two held-out folds (k for j's samples, j for k's), so K
folds need K (K - 1) / 2 of them per model. On the training part of fold k (every fold j != k, from run {j, k}):

- `+rk`: the residuals in log1p space, log1p(observed) - log1p(median), get a variogram (`stats.kriging`),
  and are kriged (ordinary kriging, local neighbourhoods) to fold k's samples: the median becomes
  expm1(log1p(median) + kriged residual). The interval is the model's (its median, for a model without one)
  moved by the same residual and calibrated conformally (CQR) on the training part: each sample's residual
  kriged from the other training folds only, added to its pair-run interval.
- `stack`: the weights w >= 0 minimising the squared error of sum(w_m median_m) against the observed SOC of the
  training part (NNLS), applied to the candidates' held-out medians; its interval is the weighted candidates'
  intervals (medians where a candidate has none), calibrated conformally on the training part in log1p space.

A fold's variogram and weights never see its targets: `tests/test_evaluation.py` poisons them and checks.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from geosoc.errors import InputError
from geosoc.stats.calibration import conformal_offset, widen
from geosoc.stats.kriging import (
    LEVEL,
    SUFFIX,
    cross_validated,
    fit_variogram,
    krige,
    kriged_offset,
    residuals,
    with_kriged,
)

RK = SUFFIX
STACK = "stack"
CONTEXT = {"+xy": "xy", "+nn": "nn"}  # spatial context features of a tree model (`learn.context`)


def is_kriged(model: str) -> bool:
    return model.endswith(RK)


def base_of(model: str) -> str:
    """The model a `<model>+rk` kriges the residuals of (the model itself otherwise)."""
    return model.removesuffix(RK)


def is_derived(model: str) -> bool:
    """Made from other models' runs, not fitted itself."""
    return is_kriged(model) or model == STACK


def split(model: str) -> tuple[str, str | None]:
    """A fitted model's estimator model and its spatial context (None without): `qrf+nn` is ("qrf", "nn")."""
    for suffix, kind in CONTEXT.items():
        if model.endswith(suffix):
            return model.removesuffix(suffix), kind
    return model, None


def known(model: str, fitted: tuple[str, ...], trees: tuple[str, ...]) -> bool:
    """Whether `model` is `stack`, one of `fitted`, a tree model of `trees` with a spatial context, or any of
    these (not the stack) with `+rk`."""
    if model == STACK:
        return True
    base, kind = split(base_of(model))
    return base in (trees if kind is not None else fitted)


def with_bases(models: tuple[str, ...]) -> tuple[str, ...]:
    """`models` with the base of every `+rk` model in it (before the first that needs it), each once."""
    out: list[str] = []
    for model in models:
        for name in ((base_of(model), model) if is_kriged(model) else (model,)):
            if name not in out:
                out.append(name)
    return tuple(out)


def describe(model: str, descriptions: dict[str, str]) -> str:
    """A model in words, from its estimator's description."""
    if model == STACK:
        return "non-negative weights over the fitted models, chosen on each training part's out-of-fold predictions"
    base, kind = split(base_of(model))
    words = descriptions[base]
    if kind == "xy":
        words += ", with coordinates (6 oblique axes)"
    elif kind == "nn":
        words += ", with the 5 nearest training samples' SOC and distances"
    return words + (", plus ordinary kriging of its residuals" if is_kriged(model) else "")


def needs_pairs(models: tuple[str, ...]) -> tuple[str, ...]:
    """The fitted models that need pair runs: the bases of `+rk` models, and every fitted model for a stack."""
    fitted = tuple(m for m in models if not is_derived(m))
    wanted = {base_of(m) for m in models if is_kriged(m)} | (set(fitted) if STACK in models else set())
    return tuple(m for m in fitted if m in wanted)


def check_folds(models: tuple[str, ...], folds: int) -> None:
    """`+rk` and `stack` learn on a training part's out-of-fold predictions: at least 3 folds (and a stack, two
    models to weigh)."""
    derived = [m for m in models if is_derived(m)]
    fitted = [m for m in models if not is_derived(m)]
    if STACK in models and len(fitted) < 2:
        raise InputError(f"stack weighs two or more models against each other; name them with it (got "
                         f"{', '.join(fitted) or 'none'})")
    if derived and folds < 3:
        raise InputError(f"{', '.join(derived)} need at least 3 folds (each held-out fold's training part is "
                         f"cross-validated in turn); got {folds}")


def pairs(folds: np.ndarray) -> list[tuple[int, int]]:
    """The pair runs of a fold assignment: every two folds, smaller first."""
    return [(int(j), int(k)) for j, k in combinations(np.unique(folds), 2)]


def training_part(inner: pd.DataFrame, model: str, repeat: int, fold: int) -> pd.DataFrame:
    """`model`'s out-of-fold predictions on the training part of `fold` (its pair runs with `fold`)."""
    return inner[(inner["model"] == model) & (inner["repeat"] == repeat) & (inner["with_fold"] == fold)]


def derived_predictions(outer: pd.DataFrame, inner: pd.DataFrame, models: tuple[str, ...],
                        seed: int) -> tuple[pd.DataFrame, dict[str, list[dict[str, Any]]]]:
    """The held-out predictions of every `+rk` model and the stack in `models`, per (repeat, fold) of `outer`,
    and what each fold learnt (variograms, weights) per model."""
    frames: list[pd.DataFrame] = []
    learnt: dict[str, list[dict[str, Any]]] = {}
    candidates = tuple(m for m in models if not is_derived(m))
    for model in (m for m in models if is_derived(m)):
        learnt[model] = []
        for (repeat, fold), _ in outer.groupby(["repeat", "fold"], sort=True):
            if model == STACK:
                frame, info = _stacked(outer, inner, candidates, int(repeat), int(fold))
            else:
                base = base_of(model)
                frame, info = _kriged(_held_out(outer, base, repeat, fold),
                                      training_part(inner, base, int(repeat), int(fold)), seed + int(repeat))
            frames.append(frame.assign(model=model))
            learnt[model].append({"repeat": int(repeat), "fold": int(fold), **info})
    return (pd.concat(frames, ignore_index=True) if frames else outer.iloc[:0]), learnt


def _held_out(outer: pd.DataFrame, model: str, repeat: int, fold: int) -> pd.DataFrame:
    part = outer[(outer["model"] == model) & (outer["repeat"] == repeat) & (outer["fold"] == fold)]
    return part.sort_values("sample_id", kind="stable").reset_index(drop=True)


def _log(values: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(values, np.float64), 0.0))


def _columns(held: pd.DataFrame) -> pd.DataFrame:
    return held[["repeat", "fold", "sample_id", "x", "y", "observed"]].reset_index(drop=True)


def _calibrated(held: pd.DataFrame, bounds: tuple[np.ndarray, np.ndarray, np.ndarray], offset: float) -> pd.DataFrame:
    lower, median, upper = bounds
    lower, upper = widen(lower, upper, median, offset)
    return _columns(held).assign(q05=np.expm1(lower), q50=np.expm1(median), q95=np.expm1(upper))


def _kriged(held: pd.DataFrame, train: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A model's held-out predictions plus its training part's residuals kriged to them (module docstring)."""
    xy = train[["x", "y"]].to_numpy(np.float64)
    observed = train["observed"].to_numpy(np.float64)
    low, middle, high = (train[c].to_numpy(np.float64) for c in ("q05", "q50", "q95"))
    residual = residuals(observed, middle)
    variogram = fit_variogram(xy, residual, seed)
    offset = kriged_offset(low, middle, high, observed,
                           cross_validated(xy, residual, train["fold"].to_numpy(), variogram))
    kriged = krige(xy, residual, held[["x", "y"]].to_numpy(np.float64), variogram)[0]
    lower, median, upper = with_kriged(held["q05"].to_numpy(np.float64), held["q50"].to_numpy(np.float64),
                                       held["q95"].to_numpy(np.float64), kriged, offset)
    frame = _columns(held).assign(q05=lower, q50=median, q95=upper)
    return frame, {"variogram": {k: v for k, v in variogram.to_dict().items() if k not in ("bins", "semivariance")},
                   "offset": float(offset), "residual_sd": float(np.std(residual))}


def _stacked(outer: pd.DataFrame, inner: pd.DataFrame, candidates: tuple[str, ...], repeat: int,
             fold: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The stack's held-out predictions on one fold, with weights from its training part (module docstring)."""
    from scipy.optimize import nnls

    train = {m: training_part(inner, m, repeat, fold).sort_values("sample_id", kind="stable") for m in candidates}
    held = {m: _held_out(outer, m, repeat, fold) for m in candidates}
    ids = train[candidates[0]]["sample_id"].to_numpy()
    if any(not np.array_equal(part["sample_id"].to_numpy(), ids) for part in train.values()):
        raise ValueError(f"the stack's candidates predicted other samples of fold {fold}'s training part")
    observed = train[candidates[0]]["observed"].to_numpy(np.float64)
    medians = np.stack([part["q50"].to_numpy(np.float64) for part in train.values()], axis=1)
    weights = nnls(medians, observed)[0]
    bounds = _weighted(train, weights)
    offset = conformal_offset(bounds[0], bounds[2], _log(observed), LEVEL)
    frame = _calibrated(held[candidates[0]], _weighted(held, weights), offset)
    return frame, {"weights": {m: float(w) for m, w in zip(candidates, weights, strict=True)},
                   "offset": float(offset)}


def _weighted(parts: dict[str, pd.DataFrame], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log1p of the weighted candidates' (lower, median, upper); a candidate without an interval lends its median."""
    total = [np.zeros(len(next(iter(parts.values())))) for _ in range(3)]
    for weight, part in zip(weights, parts.values(), strict=True):
        median = part["q50"].to_numpy(np.float64)
        for i, column in enumerate(("q05", "q50", "q95")):
            values = part[column].to_numpy(np.float64)
            total[i] += weight * np.where(np.isfinite(values), values, median)
    lower, median, upper = (_log(t) for t in total)
    return np.minimum(lower, median), median, np.maximum(upper, median)
