"""Regular raster grids: CRS, transform, shape, chunk windows and point <-> pixel maths.

A grid is snapped to multiples of its resolution so that two builds of overlapping regions share pixel
centres, and a pixel's centre depends only on its global index (never on which window asked for it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from affine import Affine

_SNAP_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Window:
    """A chunk of a grid: its index in the chunk grid and the pixel rows/cols it covers."""

    index: tuple[int, int]
    rows: slice
    cols: slice

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    @property
    def key(self) -> str:
        return f"{self.index[0]}.{self.index[1]}"


@dataclass(frozen=True)
class Grid:
    """North-up grid: top-left corner (x0, y0), square pixels of `resolution` CRS units, chunked (cy, cx)."""

    crs: str
    x0: float
    y0: float
    resolution: float
    shape: tuple[int, int]
    chunks: tuple[int, int]

    @classmethod
    def from_bounds(
        cls, crs: str, bounds: tuple[float, float, float, float], resolution: float, chunk: int
    ) -> Grid:
        """Smallest resolution-aligned grid covering `bounds` (xmin, ymin, xmax, ymax)."""
        xmin, ymin, xmax, ymax = bounds
        if not (xmax > xmin and ymax > ymin):
            raise ValueError(f"bounds must have xmin < xmax and ymin < ymax, got {bounds}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        col0 = math.floor(xmin / resolution + _SNAP_TOLERANCE)
        col1 = math.ceil(xmax / resolution - _SNAP_TOLERANCE)
        row0 = math.floor(ymin / resolution + _SNAP_TOLERANCE)
        row1 = math.ceil(ymax / resolution - _SNAP_TOLERANCE)
        shape = (max(row1 - row0, 1), max(col1 - col0, 1))
        return cls(crs, col0 * resolution, row1 * resolution, float(resolution), shape, (chunk, chunk))

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    @property
    def transform(self) -> Affine:
        return Affine(self.resolution, 0.0, self.x0, 0.0, -self.resolution, self.y0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (
            self.x0,
            self.y0 - self.height * self.resolution,
            self.x0 + self.width * self.resolution,
            self.y0,
        )

    def x_of(self, cols: np.ndarray | int) -> np.ndarray:
        """Centre x of global pixel columns; the one formula every reader uses."""
        return self.x0 + (np.asarray(cols, dtype=np.float64) + 0.5) * self.resolution

    def y_of(self, rows: np.ndarray | int) -> np.ndarray:
        """Centre y of global pixel rows."""
        return self.y0 - (np.asarray(rows, dtype=np.float64) + 0.5) * self.resolution

    @cached_property
    def x(self) -> np.ndarray:
        return self.x_of(np.arange(self.width))

    @cached_property
    def y(self) -> np.ndarray:
        return self.y_of(np.arange(self.height))

    def rowcol(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (row, col) containing each point; may fall outside the grid (check with `contains`)."""
        cols = np.floor((np.asarray(x, dtype=np.float64) - self.x0) / self.resolution).astype(np.int64)
        rows = np.floor((self.y0 - np.asarray(y, dtype=np.float64)) / self.resolution).astype(np.int64)
        return rows, cols

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows, cols = np.asarray(rows), np.asarray(cols)
        return (rows >= 0) & (rows < self.height) & (cols >= 0) & (cols < self.width)

    @property
    def chunk_counts(self) -> tuple[int, int]:
        return (-(-self.height // self.chunks[0]), -(-self.width // self.chunks[1]))

    def chunk_index(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The row-major number of the chunk holding each pixel (the order `windows` walks them in)."""
        return (rows // self.chunks[0]) * self.chunk_counts[1] + cols // self.chunks[1]

    @property
    def n_chunks(self) -> int:
        ny, nx = self.chunk_counts
        return ny * nx

    def dask_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunk sizes along (y, x) in dask's notation, aligned with `windows()`."""
        return tuple(  # type: ignore[return-value]
            tuple(min(c, n - start) for start in range(0, n, c))
            for n, c in zip(self.shape, self.chunks)
        )

    def windows(self) -> Iterator[Window]:
        """Chunk windows in row-major order, aligned to the Zarr chunk grid."""
        cy, cx = self.chunks
        for iy in range(self.chunk_counts[0]):
            for ix in range(self.chunk_counts[1]):
                rows = slice(iy * cy, min((iy + 1) * cy, self.height))
                cols = slice(ix * cx, min((ix + 1) * cx, self.width))
                yield Window((iy, ix), rows, cols)

    def window_transform(self, rows: slice, cols: slice) -> Affine:
        return self.transform @ Affine.translation(cols.start, rows.start)

    def window_bounds(self, rows: slice, cols: slice) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the pixels in a window."""
        r = self.resolution
        return (self.x0 + cols.start * r, self.y0 - rows.stop * r, self.x0 + cols.stop * r, self.y0 - rows.start * r)

    def with_resolution(self, resolution: float, chunk: int) -> Grid:
        """A grid in the same CRS covering the same bounds at another resolution (e.g. coarse climate)."""
        return Grid.from_bounds(self.crs, self.bounds, resolution, chunk)
