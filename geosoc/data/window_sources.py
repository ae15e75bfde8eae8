"""Windows of a cube's groups, read from a built cube or straight from the catalog's layers, and what sampling cuts
from them at points: patches, neighbourhoods of cells, single cells.

One piece of code serves both routes to a SampleSet. `CubeWindows` reads a built cube's Zarr; `LayerWindows` reads
the sources the cube is built from, window by window, and gives the same pixels: a source whose pixel does not
depend on the window asked for (synthetic: a pure function of position; Earth Engine: computed on the grid; rasters
resampled with `nearest`) is read over just the window the points need, and one whose pixel does (GDAL's
bilinear and area-weighted warps scale their kernels by the window: a COG in another CRS) over the very chunk
windows a cube build reads, cropped.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import zarr

from geosoc.grid import Grid
from geosoc.io.storage import zarr_store

if TYPE_CHECKING:  # the cube's windows need none of the sources' stack (xarray, dask): map actors read them
    from geosoc.sources.layers import Layer

REQUEST_COST_VALUES = 2**20  # what one Earth Engine request costs beside the values it carries: its latency
# (~1 s) against computing and sending ~4 MiB a second (the catalogs' 2 s for a 1024 x 1024 px band). Points whose
# windows together hold fewer extra values than that share a request.
CALL_COST_PX = 64 * 64  # what one read of a local source costs beside its pixels (measured on the synthetic
# source, which computes every field of a pixel whatever the bands: a 64 x 64 px window takes ~1.5x a 32 x 32 one)
CACHED_CHUNKS = 8  # chunk windows of a window-dependent source kept per process (neighbouring points share them)


class WindowSource(Protocol):
    """The pixels of a cube group over any window of its grid: (*leading axes, rows, cols) float32, NaN beyond
    the grid and where there is no data."""

    def grid(self, group: str) -> Grid: ...

    def read(self, group: str, rows: slice, cols: slice) -> np.ndarray: ...

    def splits(self, group: str) -> bool:
        """Whether a chunk's points may be read over several smaller windows."""

    def cost(self, group: str, height: int, width: int) -> float:
        """What reading one window of this size costs, in pixels read (from Earth Engine: values sent)."""


def padded(read: Callable[[slice, slice], np.ndarray], leading: tuple[int, ...], shape: tuple[int, ...], rows: slice,
           cols: slice) -> np.ndarray:
    """`read` (of windows inside a (y, x) extent of `shape`) over a window that may reach beyond it, NaN there."""
    out = np.full((*leading, rows.stop - rows.start, cols.stop - cols.start), np.nan, dtype=np.float32)
    r0, c0 = max(rows.start, 0), max(cols.start, 0)
    r1, c1 = min(rows.stop, shape[0]), min(cols.stop, shape[1])
    if r1 > r0 and c1 > c0:
        out[..., r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = read(slice(r0, r1),
                                                                                              slice(c0, c1))
    return out


def from_chunks(chunk: Callable[[int, int], np.ndarray], leading: tuple[int, ...], chunks: tuple[int, ...],
                rows: slice, cols: slice, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A window inside a grid of (y, x) `chunks`, cut from the chunks under it (`chunk(iy, ix)`: that chunk's
    pixels inside the grid), for readers that keep whole chunks."""
    cy, cx = chunks[-2:]
    out = np.empty((*leading, rows.stop - rows.start, cols.stop - cols.start), dtype=dtype)
    for iy in range(rows.start // cy, (rows.stop - 1) // cy + 1):
        for ix in range(cols.start // cx, (cols.stop - 1) // cx + 1):
            block = chunk(iy, ix)
            r0, r1 = max(rows.start, iy * cy), min(rows.stop, (iy + 1) * cy)
            c0, c1 = max(cols.start, ix * cx), min(cols.stop, (ix + 1) * cx)
            out[..., r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = (
                block[..., r0 - iy * cy : r1 - iy * cy, c0 - ix * cx : c1 - ix * cx])
    return out


def cube_array(url: str, group: str) -> zarr.Array:
    """The cube's `group` array, its metadata read afresh (one small read): a process that outlives a rebuild of
    the cube at the same URL must not read the new chunks with the old shape or chunking."""
    return zarr.open_array(zarr_store(url, read_only=True), path=f"{group}/data", mode="r", zarr_format=3)


@dataclass(frozen=True)
class CubeWindows:
    """Windows of a built cube; `grids`: the groups' grids, for grouping points by chunk (reads need none)."""

    url: str
    grids: dict[str, Grid] = field(default_factory=dict)

    def grid(self, group: str) -> Grid:
        return self.grids[group]

    def read(self, group: str, rows: slice, cols: slice) -> np.ndarray:
        array = cube_array(self.url, group)
        return padded(lambda r, c: np.asarray(array[..., r, c]), tuple(array.shape[:-2]), array.shape[-2:], rows,
                      cols)

    def splits(self, group: str) -> bool:
        """A cube is read by whole chunks whatever the window: a chunk's points are read as one window."""
        return False

    def cost(self, group: str, height: int, width: int) -> float:
        return float(height * width)


@dataclass
class LayerWindows:
    """Windows of the catalog's layers, read from their sources; `cost` says what a window costs to read (the
    split of points into windows weighs it), `splits` whether a group may be read over windows smaller than a
    chunk's points (only where a pixel does not depend on the window)."""

    layers: dict[str, Layer]
    _cache: OrderedDict[tuple[str, int, int], np.ndarray] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def grid(self, group: str) -> Grid:
        return self.layers[group].grid

    def leading(self, group: str) -> tuple[int, ...]:
        return tuple(len(values) for values in self.layers[group].axes.values())

    def splits(self, group: str) -> bool:
        return window_invariant(self.layers[group].reader)

    def requests(self, group: str, height: int, width: int) -> int | None:
        """Earth Engine requests that read a window of this size (None: a local source)."""
        reader = self.layers[group].reader
        return reader.window_requests(height, width) if hasattr(reader, "window_requests") else None

    def cost(self, group: str, height: int, width: int) -> float:
        """Earth Engine: its requests and the values they carry; a local source: one call and its pixels."""
        requests = self.requests(group, height, width)
        if requests is None:
            return float(CALL_COST_PX + height * width)
        return float(requests * REQUEST_COST_VALUES + math.prod(self.leading(group)) * height * width)

    def read(self, group: str, rows: slice, cols: slice) -> np.ndarray:
        layer = self.layers[group]
        if self.splits(group):
            return padded(layer.reader.read, self.leading(group), layer.grid.shape, rows, cols)
        return padded(lambda r, c: from_chunks(lambda iy, ix: self._chunk(group, iy, ix), self.leading(group),
                                               layer.grid.chunks, r, c),
                      self.leading(group), layer.grid.shape, rows, cols)  # the chunk windows a cube build reads

    def _chunk(self, group: str, iy: int, ix: int) -> np.ndarray:
        key = (group, iy, ix)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grid = self.layers[group].grid
        cy, cx = grid.chunks
        block = self.layers[group].reader.read(slice(iy * cy, min((iy + 1) * cy, grid.height)),
                                               slice(ix * cx, min((ix + 1) * cx, grid.width)))
        with self._lock:
            self._cache[key] = block
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return block

    def __getstate__(self) -> dict[str, object]:
        return {"layers": self.layers}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["layers"])  # type: ignore[misc]


def window_invariant(reader: object) -> bool:
    """Whether a reader's pixel is the same whatever window asks for it (readers say so with `window_invariant`;
    one that does not is read by chunk windows, as the cube is built)."""
    return bool(getattr(reader, "window_invariant", False))


# --- what sampling cuts from windows -------------------------------------------------------------------------


def cut_patches(window: np.ndarray, top: np.ndarray, left: np.ndarray, patch: int) -> np.ndarray:
    """The `patch` x `patch` patches of `window` (*leading, h, w) whose top-left pixels are (top, left):
    (n, *leading, p, p). One gather on the host; the map's network predictor cuts its patches as views on the
    device instead."""
    offsets = np.arange(patch)
    rows = top[:, None, None] + offsets[None, :, None]
    cols = left[:, None, None] + offsets[None, None, :]
    return np.moveaxis(window[..., rows, cols], -3, 0)


def around(source: WindowSource, group: str, rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """(n, *leading, size, size): the `size` x `size` pixels centred on each (row, col), from one window read
    (the points' extent plus the halo), NaN beyond the grid."""
    half = size // 2
    r0, c0 = int(rows.min()) - half, int(cols.min()) - half
    window = source.read(group, slice(r0, int(rows.max()) - half + size), slice(c0, int(cols.max()) - half + size))
    return cut_patches(window, rows - half - r0, cols - half - c0, size)


@dataclass(frozen=True)
class Extracted:
    """Patches of one group of points (in the order of `indices`) and how much of each has data."""

    indices: np.ndarray
    patches: np.ndarray  # (n, band, py, px) float32
    nodata: np.ndarray  # fraction of patch pixels without data
    centre_valid: np.ndarray

    def valid(self, max_nodata: float) -> np.ndarray:
        """Patches kept: data at the centre pixel, and at most `max_nodata` of the pixels without data."""
        return self.centre_valid & (self.nodata <= max_nodata)

    def why_dropped(self, i: int, max_nodata: float) -> str:
        if not self.centre_valid[i]:
            return "its centre pixel has no data"
        return f"{self.nodata[i]:.0%} of its patch has no data (more than sampling.max_nodata, {max_nodata:.0%})"


def patches_at(source: WindowSource, indices: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch: int,
               group: str = "imagery") -> Extracted:
    """The patches centred on a group of pixels (one window read) and how much of each has data."""
    patches = around(source, group, rows, cols, patch)  # (n, band, py, px)
    missing = np.isnan(patches).any(axis=1)
    half = patch // 2
    return Extracted(indices, patches, missing.mean(axis=(1, 2)), ~missing[:, half, half])


def cells_at(source: WindowSource, group: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n, *leading) values of the cells (row, col), from one window over those inside the grid (NaN outside)."""
    inside = source.grid(group).contains(rows, cols)
    if not inside.any():
        leading = source.read(group, slice(0, 0), slice(0, 0)).shape[:-2]
        return np.full((len(rows), *leading), np.nan, dtype=np.float32)
    r, c = rows[inside], cols[inside]
    values = around(source, group, r, c, 1)[..., 0, 0]
    out = np.full((len(rows), *values.shape[1:]), np.nan, dtype=np.float32)
    out[inside] = values
    return out


# --- which points share a window -----------------------------------------------------------------------------


def chunk_groups(grid: Grid, rows: np.ndarray, cols: np.ndarray) -> list[np.ndarray]:
    """Indices of the points in each chunk of `grid` (points beyond the grid go with the nearest chunk), chunks in
    row-major order and points in their given order within each."""
    keys = grid.chunk_index(np.clip(rows, 0, grid.height - 1), np.clip(cols, 0, grid.width - 1))
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    return np.split(order, bounds) if len(order) else []


def split_group(rows: np.ndarray, cols: np.ndarray, size: int, cost: Callable[[int, int], float]) -> list[np.ndarray]:
    """Positions (into `rows`, `cols`) of the points that share a window, for points whose `size` px windows are
    read together when that costs less than reading them apart: two parts, cut at the widest gap along the longer
    side within its middle half (so a cut never peels off a point at a time), kept apart where their costs add up
    to less than the window over both. Points a patch apart share a window; points far apart (sparse random
    locations) get one each."""

    def window(members: np.ndarray) -> tuple[int, int]:
        return (int(rows[members].max() - rows[members].min()) + size,
                int(cols[members].max() - cols[members].min()) + size)

    def best(members: np.ndarray) -> tuple[float, list[np.ndarray]]:
        whole = cost(*window(members))
        if len(members) == 1:
            return whole, [members]
        height, width = window(members)
        along = rows if height >= width else cols
        ordered = members[np.argsort(along[members], kind="stable")]
        gaps = np.diff(along[ordered])
        low, high = (len(gaps) - 1) // 4, len(gaps) - (len(gaps) - 1) // 4
        cut = low + int(np.argmax(gaps[low:high])) + 1
        left, left_parts = best(ordered[:cut])
        right, right_parts = best(ordered[cut:])
        if left + right < whole:
            return left + right, left_parts + right_parts
        return whole, [members]

    if not len(rows):
        return []
    return [np.sort(part) for part in best(np.arange(len(rows)))[1]]


def units(source: WindowSource, group: str, rows: np.ndarray, cols: np.ndarray, size: int) -> list[np.ndarray]:
    """The points read together (indices into `rows`, `cols`), in chunk order: a chunk's points in one window
    from a cube or a window-dependent source, else split where that costs less (`split_group`)."""
    grid = source.grid(group)
    out: list[np.ndarray] = []
    splits = source.splits(group)
    for members in chunk_groups(grid, rows, cols):
        if not splits or len(members) == 1:
            out.append(members)
            continue
        parts = split_group(rows[members], cols[members], size, lambda h, w: source.cost(group, h, w))
        out += [members[part] for part in parts]
    return out
