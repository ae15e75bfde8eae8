"""Accuracy of SOC predictions, always in the original units: RMSE, MAE, R², Lin's CCC, RPIQ, bias, and the
coverage (PICP) and mean width of the prediction interval."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

METRICS = ("rmse", "mae", "r2", "ccc", "rpiq", "bias", "picp", "width")


def concordance(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Lin's concordance correlation coefficient; NaN when both sides are constant and equal means undefined."""
    covariance = np.mean((observed - observed.mean()) * (predicted - predicted.mean()))
    denominator = observed.var() + predicted.var() + (observed.mean() - predicted.mean()) ** 2
    return float(2 * covariance / denominator) if denominator > 0 else float("nan")


def regression_metrics(observed: np.ndarray, predicted: np.ndarray, lower: np.ndarray | None = None,
                       upper: np.ndarray | None = None) -> dict[str, float]:
    """Metrics on the original scale; `lower`/`upper` bound a prediction interval (PICP and mean width).

    RPIQ is the interquartile range of the observations over the RMSE; bias is mean(predicted - observed).
    R² is NaN for fewer than two samples (undefined), as is CCC when it has no variance to compare.
    """
    observed, predicted = np.asarray(observed, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(observed) == 0:
        return {name: float("nan") for name in METRICS}
    rmse = float(np.sqrt(mean_squared_error(observed, predicted)))
    q1, q3 = np.percentile(observed, [25, 75])
    out = {
        "rmse": rmse,
        "mae": float(mean_absolute_error(observed, predicted)),
        "r2": float(r2_score(observed, predicted)) if len(observed) > 1 else float("nan"),
        "ccc": concordance(observed, predicted),
        "rpiq": float((q3 - q1) / rmse) if rmse > 0 else float("inf"),
        "bias": float(np.mean(predicted - observed)),
    }
    if lower is not None and upper is not None:
        lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        has = np.isfinite(lower) & np.isfinite(upper)  # models without an interval give NaN bounds
        inside = (observed[has] >= lower[has]) & (observed[has] <= upper[has])
        out["picp"] = float(np.mean(inside)) if has.any() else float("nan")
        out["width"] = float(np.mean(upper[has] - lower[has])) if has.any() else float("nan")
    return out
