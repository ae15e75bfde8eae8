"""Ordinary kriging of residuals (geosoc.stats.kriging): a case solved by hand, GSTools' own kriging, a variogram
fitted to a field of known structure, local neighbourhoods and samples at one place."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geosoc.stats.kriging import Variogram, cross_validated, fit_variogram, krige


def exponential(nugget: float = 0.0, variance: float = 1.0, length_scale: float = 1.0) -> Variogram:
    return Variogram("Exponential", nugget, variance, length_scale, 1.0, 2, [], [])


@pytest.mark.parametrize("nugget", [0.0, 0.5])
def test_two_samples_by_hand(nugget: float) -> None:
    """Samples 1 at (0, 0) and 3 at (1, 0), covariance exp(-h) plus a nugget on the diagonal; target (0.25, 0).
    From the system w1 + w2 = 1 and (w1 - w2)(1 + nugget - C12) = c1 - c2, with C12 = e^-1, c1 = e^-0.25,
    c2 = e^-0.75; the variance is the sill - w1 c1 - w2 c2 - mu, mu = c1 - (1 + nugget) w1 - C12 w2."""
    c12, c1, c2 = math.exp(-1), math.exp(-0.25), math.exp(-0.75)
    w1 = (1 + (c1 - c2) / (1 + nugget - c12)) / 2
    w2 = 1 - w1
    mu = c1 - (1 + nugget) * w1 - c12 * w2
    estimate, variance = krige(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([1.0, 3.0]), np.array([[0.25, 0.0]]),
                               exponential(nugget))
    assert estimate[0] == pytest.approx(w1 * 1 + w2 * 3, abs=1e-8)  # a nugget of 1e-9 x the sill at least
    assert variance[0] == pytest.approx(1 + nugget - w1 * c1 - w2 * c2 - mu, abs=1e-8)
    assert 1 < estimate[0] < 2  # nearer the first sample


def test_same_as_gstools_ordinary_kriging() -> None:
    """With every sample in the neighbourhood, the estimate and variance are GSTools' `krige.Ordinary`'s."""
    import gstools

    rng = np.random.default_rng(3)
    xy, values, targets = rng.uniform(0, 100, (40, 2)), rng.normal(size=40), rng.uniform(0, 100, (60, 2))
    for variogram in (Variogram("Spherical", 0.2, 1.5, 30.0, 1, 40, [], []),
                      Variogram("Gaussian", 0.05, 0.8, 12.0, 1, 40, [], [])):
        ours, ours_var = krige(xy, values, targets, variogram, neighbours=40)
        theirs, theirs_var = gstools.krige.Ordinary(variogram.covariance_model(), (xy[:, 0], xy[:, 1]), values)(
            (targets[:, 0], targets[:, 1]))
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
        np.testing.assert_allclose(ours_var, theirs_var, atol=1e-9)


def test_local_neighbourhood_is_the_kriging_of_the_nearest() -> None:
    """A target kriged from its k nearest samples equals global kriging of those k alone; far from every sample
    the estimate is the local mean, not the data's."""
    rng = np.random.default_rng(4)
    xy, values = rng.uniform(0, 100, (200, 2)), rng.normal(size=200)
    variogram = exponential(0.1, 1.0, 10.0)
    target = np.array([[50.0, 50.0]])
    nearest = np.argsort(np.hypot(*(xy - target).T))[:8]
    local = krige(xy, values, target, variogram, neighbours=8)
    alone = krige(xy[nearest], values[nearest], target, variogram, neighbours=8)
    np.testing.assert_allclose(local, alone, atol=1e-12)
    assert not np.allclose(local[0], krige(xy, values, target, variogram, neighbours=200)[0])


def test_samples_at_one_place_are_merged() -> None:
    """Two samples at one place act as one with their mean value (and no singular system, even without nugget)."""
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    estimate = krige(xy, np.array([1.0, 3.0, 10.0]), np.array([[1.0, 0.0]]), exponential(0.0, 1.0, 3.0))[0]
    merged = krige(xy[1:], np.array([2.0, 10.0]), np.array([[1.0, 0.0]]), exponential(0.0, 1.0, 3.0))[0]
    assert estimate == pytest.approx(merged)


def test_fitted_variogram_finds_the_structure() -> None:
    """A Gaussian field simulated exactly (Cholesky) from a Spherical model of sill 1 and range 30, plus noise of
    variance 0.25: the fit finds the Spherical model, a nugget near 0.25, a range near 30 and a sill near the
    data's variance; kriging it cross-validated by blocks then recovers part of the field. Values without
    spread give a pure nugget of 0."""
    import gstools

    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 200, (1500, 2))
    covariance = gstools.Spherical(dim=2, var=1.0, len_scale=30.0).covariance(
        np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1]))
    field = np.linalg.cholesky(covariance + 1e-8 * np.eye(len(xy))) @ rng.normal(size=len(xy))
    values = field + rng.normal(0, 0.5, len(xy))
    variogram = fit_variogram(xy, values, seed=0)
    assert variogram.model == "Spherical" and variogram.samples == len(xy) and variogram.r2 > 0.9
    assert 0.15 < variogram.nugget < 0.4 and 20 < variogram.length_scale < 45
    assert variogram.sill == pytest.approx(np.var(values), rel=0.3)
    blocks = (xy[:, 0] // 20 * 10 + xy[:, 1] // 20).astype(int)  # 20 x 20 blocks (the range is 30)
    kriged = cross_validated(xy, values, blocks, variogram)
    assert np.corrcoef(kriged, field)[0, 1] > 0.5
    noise = fit_variogram(xy, rng.normal(size=len(xy)), seed=0)  # no structure at all: a pure nugget
    assert noise.variance == 0 and noise.nugget == pytest.approx(1, rel=0.15)
    flat = fit_variogram(xy, np.full(len(xy), 2.0))
    assert flat.variance == 0 and flat.nugget == 0
    np.testing.assert_allclose(krige(xy, np.full(len(xy), 2.0), xy[:5], flat)[0], 2.0)


def test_variogram_round_trip_and_refusals() -> None:
    variogram = Variogram("Spherical", 0.1, 1.0, 5.0, 0.9, 100, [1.0, 2.0], [0.3, 0.6])
    assert Variogram.from_dict(variogram.to_dict()) == variogram
    with pytest.raises(ValueError, match="length scale"):
        Variogram.from_dict({**variogram.to_dict(), "length_scale": 0})
    with pytest.raises(ValueError, match="not a variogram"):
        Variogram.from_dict({"model": "Spherical"})


def test_a_pure_nugget_gives_the_mean_of_all_samples() -> None:
    """Without spatial structure the kriged value is the mean of every sample (global ordinary kriging), not of
    a neighbourhood: a residual's neighbours carry no information about it."""
    rng = np.random.default_rng(6)
    xy, values = rng.uniform(0, 100, (300, 2)), rng.normal(size=300)
    nugget = Variogram("Exponential", 1.0, 0.0, 1.0, float("nan"), 300, [], [])
    estimate, variance = krige(xy, values, rng.uniform(0, 100, (7, 2)), nugget, neighbours=8)
    np.testing.assert_allclose(estimate, values.mean())
    np.testing.assert_allclose(variance, 1 + 1 / 300)
