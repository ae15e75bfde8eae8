"""Accuracy of SOC predictions: RMSE, MAE, R², Lin's CCC, RPIQ, bias, and PICP of prediction intervals."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score


def regression_metrics(observed: np.ndarray, predicted: np.ndarray, lower: np.ndarray | None = None,
                       upper: np.ndarray | None = None) -> dict[str, float]:
    """Metrics on the original scale; `lower`/`upper` bound a prediction interval (for PICP)."""
    observed, predicted = np.asarray(observed, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    rmse = float(np.sqrt(mean_squared_error(observed, predicted)))
    q1, q3 = np.percentile(observed, [25, 75])
    covariance = np.mean((observed - observed.mean()) * (predicted - predicted.mean()))
    ccc = 2 * covariance / (observed.var() + predicted.var() + (observed.mean() - predicted.mean()) ** 2)
    out = {
        "rmse": rmse,
        "mae": float(mean_absolute_error(observed, predicted)),
        "r2": float(r2_score(observed, predicted)) if len(observed) > 1 else float("nan"),
        "ccc": float(ccc),
        "rpiq": float((q3 - q1) / rmse) if rmse > 0 else float("inf"),
        "bias": float(np.mean(predicted - observed)),
    }
    if lower is not None and upper is not None:
        out["picp"] = float(np.mean((observed >= lower) & (observed <= upper)))
    return out
