"""Conformalized quantile regression (Romano et al. 2019): intervals whose coverage holds on new data.

A quantile network's 90 % interval is often too narrow (it is fitted on data it has seen). CQR scores each
held-out sample by how far it falls outside its interval, E = max(lower - y, y - upper), and widens (or, when
E is mostly negative, narrows) every interval by the ceil((n + 1)(1 - alpha))-th smallest score. The offset is
fitted on the validation part the training loop already holds out, in the model's own output space, and
stored in the checkpoint so that every later prediction applies it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def conformal_offset(lower: np.ndarray, upper: np.ndarray, observed: np.ndarray, level: float) -> float:
    """The CQR offset for intervals meant to cover `level` (e.g. 0.9) of observations."""
    lower, upper, observed = (np.asarray(a, dtype=np.float64) for a in (lower, upper, observed))
    scores = np.sort(np.maximum(lower - observed, observed - upper))
    n = len(scores)
    if n == 0:
        return 0.0
    rank = math.ceil((n + 1) * level)
    return float(scores[min(rank, n) - 1])


def widen(lower: Any, upper: Any, median: Any, offset: float) -> tuple[Any, Any]:
    """Apply an offset to NumPy arrays or torch tensors; a narrowing never moves a bound past the median."""
    if isinstance(lower, np.ndarray):
        return np.minimum(lower - offset, median), np.maximum(upper + offset, median)
    import torch

    return torch.minimum(lower - offset, median), torch.maximum(upper + offset, median)


def interval(z: Any, quantiles: list[float], offset: float) -> tuple[Any, Any, Any]:
    """(lower, median, upper) from (n, quantiles) predictions (NumPy or torch), the CQR `offset` applied.

    The median is the 0.5 quantile, or the mean of the quantiles when the model has none."""
    median = z[:, quantiles.index(0.5)] if 0.5 in quantiles else z.mean(1)
    lower, upper = widen(z[:, 0], z[:, -1], median, offset)
    return lower, median, upper
