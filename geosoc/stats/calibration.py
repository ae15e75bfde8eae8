"""Conformalized quantile regression (Romano et al. 2019): intervals whose coverage holds on new data.

A quantile network's 90 % interval is often too narrow (it is fitted on data it has seen). CQR scores each
held-out sample by how far it falls outside its interval, E = max(lower - y, y - upper), and widens (or, when
E is mostly negative, narrows) every interval by the ceil((n + 1)(1 - alpha))-th smallest score. The offset is
fitted on the validation part the training loop already holds out, in the model's own output space, and
stored in the checkpoint so that every later prediction applies it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def conformal_offset(lower: np.ndarray, upper: np.ndarray, observed: np.ndarray, level: float) -> float:
    """The CQR offset for intervals meant to cover `level` (e.g. 0.9) of observations."""
    lower, upper, observed = (np.asarray(a, dtype=np.float64) for a in (lower, upper, observed))
    return conformal_quantile(np.maximum(lower - observed, observed - upper), level)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n + 1) level)-th smallest of n conformity scores (the largest when n is too small); 0 for none."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    if n == 0:
        return 0.0
    rank = math.ceil((n + 1) * level)
    return float(scores[min(rank, n) - 1])


def covering_scores(bounds: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], observed: np.ndarray,
                    steps: int = 60) -> np.ndarray:
    """Conformity scores of an interval that is not its members' offset-shifted bounds but a function of them
    (an ensemble's mean of its members' widened, decoded bounds): each sample's least offset whose interval
    covers it, found by bisection. `bounds(offsets)` gives the (lower, upper) of each sample with its own offset,
    and must widen as the offset grows. Their `conformal_quantile` is the CQR offset (`conformal_offset`'s, when
    `bounds` is the shifted bounds themselves); scores of several calibration parts, each with its own `bounds`,
    pool into one quantile."""
    observed = np.asarray(observed, dtype=np.float64)
    if len(observed) == 0:
        return np.zeros(0)

    def covers(offsets: np.ndarray) -> np.ndarray:
        lower, upper = bounds(offsets)
        return (lower <= observed) & (observed <= upper)

    low, high = np.full(len(observed), -1.0), np.full(len(observed), 1.0)
    for _ in range(steps):  # brackets: `high` covers every sample, `low` none (unless it must: y at the median)
        short = ~covers(high)
        if not short.any():
            break
        high = np.where(short, high * 2, high)
    for _ in range(steps):
        over = covers(low)
        if not over.any():
            break
        low = np.where(over, low * 2, low)
    for _ in range(steps):
        middle = (low + high) / 2
        covered = covers(middle)
        high, low = np.where(covered, middle, high), np.where(covered, low, middle)
    return high


def widen(lower: Any, upper: Any, median: Any, offset: float | np.ndarray) -> tuple[Any, Any]:
    """Apply an offset to NumPy arrays or torch tensors; a narrowing never moves a bound past the median."""
    if isinstance(lower, np.ndarray):
        return np.minimum(lower - offset, median), np.maximum(upper + offset, median)
    import torch

    return torch.minimum(lower - offset, median), torch.maximum(upper + offset, median)


def interval(z: Any, quantiles: list[float], offset: float | np.ndarray) -> tuple[Any, Any, Any]:
    """(lower, median, upper) from (n, quantiles) predictions (NumPy or torch), the CQR `offset` (one, or one per
    sample) applied.

    The median is the 0.5 quantile, or the mean of the quantiles when the model has none."""
    median = z[:, quantiles.index(0.5)] if 0.5 in quantiles else z.mean(1)
    lower, upper = widen(z[:, 0], z[:, -1], median, offset)
    return lower, median, upper
