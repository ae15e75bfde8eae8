"""Ordinary kriging of a model's residuals (regression kriging, as gstat and the RFsp literature do it).

The variogram is estimated and fitted with GSTools (`vario_estimate` on at most VARIOGRAM_POINTS samples, so
that 100,000 samples cost what 2,000 do; each model of CANDIDATES fitted with a nugget, the best fit kept). The
kriging itself is local: every target is kriged from its NEIGHBOURS nearest samples (a k-d tree), in batches,
so that a map of millions of cells costs time in proportion to its cells and memory bounded by one batch.

The system is GSTools' own (covariances, the nugget on the diagonal as a measurement error, `exact=False`):
the estimate at a sample's own place is smoothed, not the sample's value, and two samples at one place do not
make the system singular. With as many neighbours as samples the estimate is GSTools' `krige.Ordinary` (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

SUFFIX = "+rk"  # a model with its residuals kriged: `qrf+rk`
LEVEL = 0.9  # the interval's nominal coverage (q05 to q95)
NEIGHBOURS = 32  # samples each target is kriged from (gstat's nmax is often 20-50)
VARIOGRAM_POINTS = 2000  # samples the empirical variogram is estimated from (pairs: about 2 million)
CANDIDATES = ("Exponential", "Spherical", "Gaussian")  # GSTools models tried; the best fit (R²) is kept
NO_STRUCTURE = 1e-6  # a fitted partial sill below this share of the sill is none: the variogram is a pure nugget
BATCH = 4096  # targets per batched solve: (BATCH, 33, 33) float64 systems, about 36 MB


@dataclass(frozen=True)
class Variogram:
    """A fitted variogram: GSTools' model name and parameters, in the units of the coordinates and values."""

    model: str  # a GSTools covariance model (CANDIDATES)
    nugget: float
    variance: float  # the partial sill (GSTools' `var`)
    length_scale: float  # GSTools' `len_scale`, in coordinate units
    r2: float  # of the model against the binned semivariances it was fitted to
    samples: int  # the samples it was estimated from
    bins: list[float]  # bin centres of the empirical variogram
    semivariance: list[float]  # its value per bin

    @property
    def sill(self) -> float:
        return self.nugget + self.variance

    def covariance_model(self) -> Any:
        """The GSTools model these parameters describe."""
        import gstools

        return getattr(gstools, self.model)(dim=2, var=self.variance, len_scale=self.length_scale,
                                            nugget=self.nugget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Variogram:
        """What `to_dict` wrote; ValueError naming what is missing or wrong."""
        try:
            variogram = cls(model=str(values["model"]), nugget=float(values["nugget"]),
                            variance=float(values["variance"]), length_scale=float(values["length_scale"]),
                            r2=float(values["r2"]), samples=int(values["samples"]),
                            bins=[float(b) for b in values["bins"]],
                            semivariance=[float(g) for g in values["semivariance"]])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a variogram ({type(err).__name__}: {err})") from err
        if variogram.model not in CANDIDATES or not (variogram.nugget >= 0 and variogram.variance >= 0
                                                      and variogram.length_scale > 0):
            raise ValueError(f"a variogram needs a model of {', '.join(CANDIDATES)}, nugget and variance >= 0 "
                             f"and a length scale > 0; got {values}")
        return variogram


def fit_variogram(xy: np.ndarray, values: np.ndarray, seed: int = 0) -> Variogram:
    """The variogram of `values` at `xy` (n, 2): binned by GSTools' standard bins (a third of the samples'
    bounding-box diagonal), on at most VARIOGRAM_POINTS samples drawn with `seed`, each model of CANDIDATES
    fitted with a nugget (soft-L1 loss), the best by R². A fit that explains nothing (R² <= 0, or a partial sill
    of almost none) is a pure nugget; values without spread give a pure nugget of 0."""
    import gstools

    xy, values = _merged(np.asarray(xy, np.float64), np.asarray(values, np.float64))
    spread = float(np.var(values)) if len(values) else 0.0
    if len(values) < 3 or spread <= 0 or np.ptp(xy, axis=0).max() <= 0:
        return Variogram(CANDIDATES[0], spread, 0.0, 1.0, float("nan"), len(values), [], [])
    size = min(len(values), VARIOGRAM_POINTS)
    bins, gamma = gstools.vario_estimate((xy[:, 0], xy[:, 1]), values, sampling_size=size if size < len(values)
                                         else None, sampling_seed=seed)
    keep = np.isfinite(gamma)
    bins, gamma = bins[keep], gamma[keep]
    best: Variogram | None = None
    for name in CANDIDATES:
        model = getattr(gstools, name)(dim=2)
        try:
            _, _, r2 = model.fit_variogram(bins, gamma, nugget=True, return_r2=True)
        except (RuntimeError, ValueError):  # no convergence for this model: the others may fit
            continue
        candidate = Variogram(name, float(model.nugget), float(model.var), float(model.len_scale), float(r2),
                              len(values), bins.tolist(), gamma.tolist())
        if best is None or candidate.r2 > best.r2:
            best = candidate
    if best is None:  # no model fitted: a pure nugget at the values' variance
        return Variogram(CANDIDATES[0], spread, 0.0, 1.0, float("nan"), len(values), bins.tolist(), gamma.tolist())
    if best.r2 <= 0 or best.variance <= NO_STRUCTURE * best.sill:  # flat: the fit found no spatial structure
        return replace(best, nugget=best.sill, variance=0.0)
    return best


def krige(xy: np.ndarray, values: np.ndarray, targets: np.ndarray, variogram: Variogram,
          neighbours: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Ordinary kriging at `targets` (m, 2) from `values` at `xy` (n, 2), each target from its `neighbours`
    nearest samples: (estimate, kriging variance), both (m,). The variance is GSTools' `krige_var`: of the
    error against a new measurement there (the nugget included). Samples at one place are merged (their mean)
    first. A pure-nugget variogram (no spatial structure) gives every target the mean of all samples."""
    from scipy.spatial import cKDTree

    xy, values = _merged(np.asarray(xy, np.float64), np.asarray(values, np.float64))
    targets = np.asarray(targets, np.float64).reshape(-1, 2)
    estimate, variance = np.empty(len(targets)), np.empty(len(targets))
    if len(values) == 0:
        raise ValueError("kriging needs at least one sample")
    if variogram.variance <= 0:  # a pure nugget, no spatial structure: every target gets the mean of all samples,
        # as global ordinary kriging gives (a neighbourhood's mean would add nothing but its neighbours' noise)
        return np.full(len(targets), values.mean()), np.full(len(targets), variogram.nugget * (1 + 1 / len(values)))
    model = variogram.covariance_model()
    k = min(neighbours, len(values))
    tree = cKDTree(xy)
    nugget = max(variogram.nugget, 1e-9 * variogram.sill)  # a floor keeps merged-but-close samples solvable
    for start in range(0, len(targets), BATCH):
        part = targets[start : start + BATCH]
        distance, index = tree.query(part, k=k)
        distance, index = distance.reshape(len(part), k), index.reshape(len(part), k)
        east, north = xy[index, 0], xy[index, 1]  # (b, k) each
        between = np.hypot(east[:, :, None] - east[:, None, :], north[:, :, None] - north[:, None, :])
        system = np.zeros((len(part), k + 1, k + 1))
        system[:, :k, :k] = model.covariance(between)
        system[:, np.arange(k), np.arange(k)] += nugget
        system[:, :k, k] = system[:, k, :k] = 1.0
        rhs = np.ones((len(part), k + 1))
        rhs[:, :k] = model.covariance(distance)
        solution = np.linalg.solve(system, rhs[:, :, None])[:, :, 0]
        weights, lagrange = solution[:, :k], solution[:, k]
        estimate[start : start + len(part)] = (weights * values[index]).sum(axis=1)
        variance[start : start + len(part)] = variogram.sill - (weights * rhs[:, :k]).sum(axis=1) - lagrange
    return estimate, np.maximum(variance, 0.0)


def cross_validated(xy: np.ndarray, values: np.ndarray, groups: np.ndarray, variogram: Variogram,
                    neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Each sample's kriged value from the samples of the other groups only (whole groups left out in turn,
    as a held-out fold is): what kriging adds where it has no sample of the same block. NaN where a group is
    all there is."""
    out = np.full(len(values), np.nan)
    for group in np.unique(groups):
        held = groups == group
        if held.all():
            continue
        out[held] = krige(xy[~held], values[~held], xy[held], variogram, neighbours)[0]
    return out


def _merged(xy: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples at the same place as one, with their mean value."""
    unique, inverse = np.unique(xy, axis=0, return_inverse=True)
    if len(unique) == len(xy):
        return xy, values
    inverse = inverse.reshape(-1)
    return unique, np.bincount(inverse, weights=values) / np.bincount(inverse)


def log_bounds(lower: np.ndarray, median: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model's (q05, median, q95) in SOC units as log1p values, the space its residuals are kriged in; a model
    without an interval (NaN bounds) has its median for both bounds."""
    def log(values: np.ndarray) -> np.ndarray:
        return np.log1p(np.maximum(np.asarray(values, np.float64), 0.0))

    missing = ~(np.isfinite(lower) & np.isfinite(upper))
    z = log(median)
    return np.where(missing, z, log(lower)), z, np.where(missing, z, log(upper))


def residuals(observed: np.ndarray, median: np.ndarray) -> np.ndarray:
    """log1p(observed) - log1p(median): what kriging adds back to a model's median."""
    return log_bounds(observed, median, observed)[0] - log_bounds(median, median, median)[1]


def kriged_offset(lower: np.ndarray, median: np.ndarray, upper: np.ndarray, observed: np.ndarray,
                  kriged: np.ndarray) -> float:
    """The CQR offset (log1p space) of a model's interval moved by kriged residuals, from out-of-fold predictions
    and residuals kriged without the sample's own block."""
    from geosoc.stats.calibration import conformal_offset

    low, _, high = log_bounds(lower, median, upper)
    return conformal_offset(low + kriged, high + kriged, log_bounds(observed, observed, observed)[1], LEVEL)


def with_kriged(lower: np.ndarray, median: np.ndarray, upper: np.ndarray, kriged: np.ndarray,
                offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q05, median, q95) in SOC units of a model plus its kriged residuals, the interval calibrated by `offset`."""
    from geosoc.stats.calibration import widen

    low, z, high = log_bounds(lower, median, upper)
    low, high = widen(low + kriged, high + kriged, z + kriged, offset)
    return np.expm1(low), np.expm1(z + kriged), np.expm1(high)
