"""The synthetic landscape: deterministic by position, lazy, landscape-like, with a LUCAS-like hidden SOC."""

from __future__ import annotations

import datetime as dt
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geosoc.catalog import CLIMATE_VARIABLES, IMAGERY_BANDS
from geosoc.grid import Grid
from geosoc.sources import noise, synthetic
from geosoc.sources.synthetic import Landscape, synthetic_climate, synthetic_imagery, true_soc_layer

GRID = Grid.from_bounds("EPSG:3035", (4419990, 2809980, 4419990 + 160 * 30, 2809980 + 160 * 30), 30, 64)
COARSE = Grid.from_bounds("EPSG:3035", (4_000_000, 2_800_000, 4_100_000, 2_900_000), 4000, 8)
MONTHS = [dt.date(2014, m, 1) for m in range(1, 13)]
LAND = Landscape(seed=3)


@pytest.fixture(scope="module")
def full_image() -> np.ndarray:
    return LAND.imagery(GRID, slice(0, 160), slice(0, 160), IMAGERY_BANDS)


@settings(max_examples=25, deadline=None)
@given(r0=st.integers(0, 150), c0=st.integers(0, 150), h=st.integers(1, 40), w=st.integers(1, 40))
def test_imagery_does_not_depend_on_window(full_image: np.ndarray, r0: int, c0: int, h: int, w: int) -> None:
    rows, cols = slice(r0, min(r0 + h, 160)), slice(c0, min(c0 + w, 160))
    window = LAND.imagery(GRID, rows, cols, IMAGERY_BANDS)
    assert np.array_equal(window, full_image[:, rows, cols], equal_nan=True)


def test_climate_does_not_depend_on_window() -> None:
    full = LAND.climate(COARSE, slice(0, 25), slice(0, 25), MONTHS, CLIMATE_VARIABLES)
    part = LAND.climate(COARSE, slice(3, 11), slice(17, 24), MONTHS, CLIMATE_VARIABLES)
    assert np.array_equal(part, full[:, :, 3:11, 17:24])


def test_climate_at_points_is_the_cells_series() -> None:
    full = LAND.climate(COARSE, slice(0, 25), slice(0, 25), MONTHS, CLIMATE_VARIABLES)
    rows, cols = np.array([0, 7, 24]), np.array([3, 24, 11])
    at = LAND.climate_at(COARSE.x_of(cols), COARSE.y_of(rows), COARSE.crs, MONTHS, CLIMATE_VARIABLES)
    assert at.shape == (3, len(MONTHS), len(CLIMATE_VARIABLES))
    assert np.array_equal(at, np.moveaxis(full[:, :, rows, cols], -1, 0))


def test_point_and_grid_evaluation_agree() -> None:
    soc_grid = LAND.true_soc(GRID, slice(0, 160), slice(0, 160))
    rows, cols = np.array([0, 17, 99, 159]), np.array([5, 80, 3, 159])
    soc_points = LAND.soc_at(GRID.x_of(cols), GRID.y_of(rows), GRID.crs)
    assert np.array_equal(soc_points.astype(np.float32), soc_grid[rows, cols], equal_nan=True)


def test_seed_changes_the_landscape(full_image: np.ndarray) -> None:
    other = Landscape(seed=4).imagery(GRID, slice(0, 160), slice(0, 160), IMAGERY_BANDS)
    assert not np.allclose(np.nan_to_num(other), np.nan_to_num(full_image))


def test_bands_are_physical(full_image: np.ndarray) -> None:
    names = list(IMAGERY_BANDS)
    valid = ~np.isnan(full_image[0])
    reflectance = full_image[:7][:, valid]
    assert reflectance.min() > 0 and reflectance.max() < 1
    for index in ("clay", "ferrous", "carbonate", "rock_outcrop", "ndvi"):
        values = full_image[names.index(index)][valid]
        assert -1 <= values.min() and values.max() <= 1
    ndvi = full_image[names.index("ndvi")]
    b5, b4 = full_image[names.index("SR_B5")], full_image[names.index("SR_B4")]
    assert np.allclose(ndvi[valid], ((b5 - b4) / (b5 + b4))[valid], atol=1e-6)
    assert full_image[names.index("slope")][valid].min() >= 0


def test_band_subset_and_order() -> None:
    image = LAND.imagery(GRID, slice(0, 8), slice(0, 8), ["ndvi", "SR_B1"])
    full = LAND.imagery(GRID, slice(0, 8), slice(0, 8), IMAGERY_BANDS)
    assert np.array_equal(image[0], full[IMAGERY_BANDS.index("ndvi")], equal_nan=True)
    assert np.array_equal(image[1], full[0], equal_nan=True)


def test_soc_is_right_skewed_like_lucas() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(2.6e6, 6.5e6, 50_000), rng.uniform(1.5e6, 5.0e6, 50_000)
    soc = LAND.soc_at(x, y, "EPSG:3035")
    soc = soc[np.isfinite(soc)]
    assert 14 < np.median(soc) < 28
    assert np.percentile(soc, 99.9) > 150  # tail to several hundred g/kg (peat, wetlands)
    assert soc.mean() > np.median(soc)  # right-skewed
    assert soc.min() > 0


def test_soc_depends_on_texture_only_a_patch_reveals() -> None:
    """Stripe contrast (mosaic) drives SOC; one pixel's stripe value says little, a patch's spread says much."""
    rng = np.random.default_rng(1)
    cx, cy = rng.uniform(3.0e6, 5.0e6, 300), rng.uniform(2.0e6, 4.0e6, 300)
    offsets = (np.arange(16) - 7.5) * 30.0
    px = (cx[:, None, None] + offsets[None, None, :]).reshape(300, -1)
    py = (cy[:, None, None] + offsets[None, :, None]).reshape(300, -1)
    f = LAND.fields(px, py, "EPSG:3035")
    farmed = np.isin(f["land_cover"][:, 0], [synthetic.CROPLAND, synthetic.GRASSLAND])
    mosaic = f["mosaic"][farmed, 0]
    patch_spread = f["texture"][farmed].std(axis=1)
    centre_value = f["texture"][farmed, 0]
    assert np.corrcoef(patch_spread, mosaic)[0, 1] > 0.8
    assert abs(np.corrcoef(centre_value, mosaic)[0, 1]) < 0.3


def test_drainage_raises_soc_and_shows_in_climate_and_in_hollows_only_a_patch_counts() -> None:
    """The latent for self-supervision: climate cells carry it in soil moisture; the imagery in the density of
    darker wet hollows across a 32 px patch, which one pixel or a 5 x 5 window gives poorly."""
    cells = LAND.normals(COARSE.x_of(np.arange(25))[None, :], COARSE.y_of(np.arange(25))[:, None], COARSE.crs)
    soil = LAND.climate(COARSE, slice(0, 25), slice(0, 25), MONTHS, ["soil"])[:, 0].mean(axis=0)
    assert np.corrcoef(soil.ravel(), cells["drainage"].ravel())[0, 1] > 0.5

    rng = np.random.default_rng(2)
    cx, cy = rng.uniform(4.0e6, 4.1e6, 200), rng.uniform(2.8e6, 2.9e6, 200)
    offsets = (np.arange(32) - 15.5) * 30.0
    px = np.broadcast_to(cx[:, None, None] + offsets[None, None, :], (200, 32, 32))
    py = np.broadcast_to(cy[:, None, None] + offsets[None, :, None], (200, 32, 32))
    f = LAND.fields(px, py, "EPSG:3035")
    drainage = f["drainage"][:, 16, 16]
    density = f["hollow"].mean(axis=(1, 2))
    window = f["hollow"][:, 14:19, 14:19].mean(axis=(1, 2))
    assert np.corrcoef(density, drainage)[0, 1] > 0.8
    assert np.corrcoef(window, drainage)[0, 1] < np.corrcoef(density, drainage)[0, 1] - 0.2
    land = np.isfinite(f["soc"][:, 16, 16])
    assert np.corrcoef(np.log(f["soc"][land, 16, 16]), drainage[land])[0, 1] > 0.3

    grid = Grid.from_bounds("EPSG:3035", (4_000_000, 2_800_000, 4_000_000 + 64 * 30, 2_800_000 + 64 * 30), 30, 64)
    red = LAND.imagery(grid, slice(0, 64), slice(0, 64), ["SR_B4"])[0]
    hollow = LAND.fields(grid.x_of(np.arange(64))[None, :], grid.y_of(np.arange(64))[:, None], grid.crs)["hollow"]
    assert np.nanmean(red[hollow]) < np.nanmean(red[~hollow])  # darker: wet soil, more plants


def test_climate_has_seasons_gradients_and_genuine_zeros() -> None:
    months = [dt.date(2013 + (m // 12), m % 12 + 1, 1) for m in range(24)]
    grid = Grid.from_bounds("EPSG:3035", (2_700_000, 1_500_000, 6_500_000, 5_000_000), 100_000, 64)
    climate = LAND.climate(grid, slice(0, grid.height), slice(0, grid.width), months, CLIMATE_VARIABLES)
    names = list(CLIMATE_VARIABLES)
    tmmx = climate[:, names.index("tmmx")]
    assert tmmx[6].mean() > tmmx[0].mean() + 5  # July warmer than January in the north
    assert tmmx[:, 0].mean() < tmmx[:, -1].mean()  # north (top row) colder than south
    pr, swe = climate[:, names.index("pr")], climate[:, names.index("swe")]
    assert (pr == 0).any() and (pr > 0).any() and (pr >= 0).all()
    assert (swe == 0).any() and (swe > 0).any()
    assert np.isfinite(climate).all()


def test_layers_are_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    europe = Grid.from_bounds("EPSG:3035", (2_500_000, 1_400_000, 7_400_000, 5_500_000), 30, 1024)
    calls: list[tuple[slice, slice]] = []
    real = Landscape.imagery
    monkeypatch.setattr(Landscape, "imagery", lambda self, g, r, c, b: calls.append((r, c)) or real(self, g, r, c, b))
    lazy = synthetic_imagery(europe, seed=0).lazy()
    assert lazy.shape == (14, 136668, 163334) and calls == []
    corner = lazy.isel(y=slice(0, 4), x=slice(0, 4)).compute()
    assert corner.shape == (14, 4, 4) and len(calls) == 1
    assert lazy.rio.crs.to_epsg() == 3035
    assert list(lazy.band.values) == list(IMAGERY_BANDS)


def test_layer_helpers() -> None:
    climate = synthetic_climate(COARSE, 0, MONTHS, ["pr"])
    assert climate.dims == ("time", "variable", "y", "x") and climate.shape == (12, 1, 25, 25)
    soc = true_soc_layer(GRID, 3).lazy()
    assert soc.shape == (1, 160, 160)
    assert np.array_equal(soc.values[0], LAND.true_soc(GRID, slice(0, 160), slice(0, 160)), equal_nan=True)


def _dense_table_interp(x: np.ndarray, y: np.ndarray, scale: float, key: int) -> np.ndarray:
    """value_noise on a grid as it was first written: a table of every lattice node under the window."""
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    sx, sy = noise._smooth(gx - ix), noise._smooth(gy - iy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    x0, y0 = int(ix.min()), int(iy.min())
    table = noise.hash_uniform(np.arange(x0, int(ix.max()) + 2)[None, :], np.arange(y0, int(iy.max()) + 2)[:, None],
                               key) * 2.0 - 1.0
    along_x = noise._lerp(table[:, ix[0] - x0], table[:, ix[0] - x0 + 1], sx)
    return noise._lerp(along_x[iy[:, 0] - y0], along_x[iy[:, 0] - y0 + 1], sy)


@pytest.mark.parametrize("scale", [30.0, 90.0, 700.0, 1000.0, 3750.0, 60e3])
def test_grid_noise_reads_only_the_nodes_pixels_touch_with_the_same_values(scale: float) -> None:
    """On a 1 km grid, 30 m noise once built a table of every node under the window (2 GiB for 512 px); the table of
    the nodes pixels touch gives the same bits, finer or coarser than the pixels."""
    x = (4_400_000.5 + 1000.0 * np.arange(97))[None, :]
    y = (3_300_000.5 - 1000.0 * np.arange(61))[:, None]
    key = noise.key_of(3, "sensor")
    assert np.array_equal(noise.value_noise(x, y, scale, key), _dense_table_interp(x, y, scale, key))


WHOLE = 1 << 40  # block_pixels: every window in one block, as before blocks


@pytest.mark.parametrize("block_pixels", [5, 37, 200, 4096])
def test_blocked_reads_equal_whole_window_reads(block_pixels: int) -> None:
    """Imagery (slope's halo included), true SOC and climate, block by block (pieces of rows, bands of rows, odd
    remainders) are bit for bit the whole window computed at once, on a 30 m grid and on a 1 km one."""
    blocked, whole = Landscape(3, block_pixels), Landscape(3, WHOLE)
    kilometre = Grid.from_bounds("EPSG:3035", (4_400_000, 3_200_000, 4_464_000, 3_264_000), 1000, 64)
    for grid in (GRID, kilometre):
        rows, cols = slice(9, 49), slice(21, 58)
        assert np.array_equal(blocked.imagery(grid, rows, cols, IMAGERY_BANDS),
                              whole.imagery(grid, rows, cols, IMAGERY_BANDS), equal_nan=True)
        assert np.array_equal(blocked.true_soc(grid, rows, cols), whole.true_soc(grid, rows, cols), equal_nan=True)
    rows, cols = slice(2, 25), slice(0, 19)
    assert np.array_equal(blocked.climate(COARSE, rows, cols, MONTHS, CLIMATE_VARIABLES),
                          whole.climate(COARSE, rows, cols, MONTHS, CLIMATE_VARIABLES))


def test_blocks_tile_the_window_once() -> None:
    for rows, cols, pixels in [(slice(3, 50), slice(7, 44), 100), (slice(0, 2), slice(0, 1000), 300),
                               (slice(5, 6), slice(5, 6), 1), (slice(4, 4), slice(0, 9), 10)]:
        hits = np.zeros((rows.stop, cols.stop), int)
        for r, c in synthetic._blocks(rows, cols, pixels):
            assert (r.stop - r.start) * (c.stop - c.start) <= pixels
            hits[r, c] += 1
        assert (hits[rows, cols] == 1).all() and hits.sum() == hits[rows, cols].size


def test_a_chunk_read_takes_little_memory() -> None:
    """A 512 px chunk of a 1 km grid (europe-synthetic's imagery) once peaked at 6.7 GiB; in blocks it holds the
    output and one block's intermediates, a fraction of computing it whole."""
    grid = Grid.from_bounds("EPSG:3035", (4_400_000, 3_000_000, 4_912_000, 3_512_000), 1000, 512)
    window = slice(0, 512)
    peaks = []
    for landscape in (Landscape(0), Landscape(0, WHOLE)):
        tracemalloc.start()
        try:
            landscape.imagery(grid, window, window, IMAGERY_BANDS)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    blocked, whole = peaks
    output = len(IMAGERY_BANDS) * 512 * 512 * 4
    assert whole < 512 * 2**20  # the nodes pixels touch, not every node under the window
    assert blocked < output + 16 * 2**20 and blocked < whole / 4
