"""Grid maths: snapping, chunk windows that tile exactly, point <-> pixel."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from geosoc.grid import Grid


def test_from_bounds_snaps_outward_to_resolution() -> None:
    grid = Grid.from_bounds("EPSG:3035", (1005.0, 2010.0, 1995.0, 2980.0), 30.0, 8)
    assert grid.x0 == 990.0 and grid.y0 == 3000.0
    xmin, ymin, xmax, ymax = grid.bounds
    assert xmin <= 1005 and ymin <= 2010 and xmax >= 1995 and ymax >= 2980
    assert grid.shape == (33, 34)
    assert grid.transform.a == 30.0 and grid.transform.e == -30.0


def test_exact_bounds_are_kept() -> None:
    grid = Grid.from_bounds("EPSG:3035", (0.0, 0.0, 300.0, 150.0), 30.0, 4)
    assert grid.shape == (5, 10) and grid.bounds == (0.0, 0.0, 300.0, 150.0)


def test_centres_and_rowcol_round_trip() -> None:
    grid = Grid.from_bounds("EPSG:3035", (0.0, 0.0, 3000.0, 1500.0), 30.0, 16)
    rows, cols = np.array([0, 7, 49]), np.array([0, 33, 99])
    x, y = grid.x_of(cols), grid.y_of(rows)
    assert np.array_equal(grid.rowcol(x, y), (rows, cols))
    assert grid.x[0] == 15.0 and grid.y[0] == 1485.0
    assert grid.contains(np.array([-1, 0, 50]), np.array([0, 0, 0])).tolist() == [False, True, False]


def test_coarse_grid_covers_fine() -> None:
    fine = Grid.from_bounds("EPSG:3035", (0.0, 0.0, 3000.0, 3000.0), 30.0, 64)
    coarse = fine.with_resolution(4000.0, 8)
    assert coarse.crs == fine.crs and coarse.shape == (1, 1)
    cx0, cy0, cx1, cy1 = coarse.bounds
    fx0, fy0, fx1, fy1 = fine.bounds
    assert cx0 <= fx0 and cy0 <= fy0 and cx1 >= fx1 and cy1 >= fy1


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 300), width=st.integers(1, 300), chunk=st.integers(1, 64)
)
def test_windows_tile_grid_exactly(height: int, width: int, chunk: int) -> None:
    grid = Grid("EPSG:3035", 0.0, 0.0, 10.0, (height, width), (chunk, chunk))
    cover = np.zeros(grid.shape, dtype=int)
    windows = list(grid.windows())
    for w in windows:
        assert w.shape[0] <= chunk and w.shape[1] <= chunk
        assert w.rows.start % chunk == 0 and w.cols.start % chunk == 0  # aligned to the Zarr chunk grid
        cover[w.rows, w.cols] += 1
    assert (cover == 1).all()
    assert len(windows) == grid.n_chunks
    ys, xs = grid.dask_chunks()
    assert sum(ys) == height and sum(xs) == width and len(ys) * len(xs) == grid.n_chunks
