"""A map process's decoded cube chunks: each decoded once while the windows that share it run (`maps.reads` orders
them so that they run close together), and counted, so that a map says what it read.

Zarr decodes whole chunks, and a window's block (its cells plus the patches' halo) reaches into its neighbours'
chunks; read window by window, a chunk is decoded again for every window that touches it. `ChunkCache` keeps up to
`capacity` bytes of decoded chunks, least recently used out; a chunk asked for by several threads at once is
decoded by one while the others wait for it. A chunk never written (outside the region's mask) reads as NaN and
counts as nothing decoded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.core.sync import sync

from geosoc.data.window_sources import cube_array, from_chunks, padded
from geosoc.grid import Grid
from geosoc.maps.reads import GroupReads, Key


@dataclass
class ReadCount:
    """What a process decoded: chunks and their bytes (every leading chunk of a (y, x) position)."""

    chunks: int = 0
    bytes: int = 0

    def add(self, other: ReadCount) -> None:
        self.chunks += other.chunks
        self.bytes += other.bytes


class ChunkCache:
    """Windows of a cube's groups (a `WindowSource`), cut from decoded chunks kept in memory."""

    def __init__(self, url: str, grids: dict[str, Grid], capacity: int) -> None:
        self.url, self.grids, self.capacity = url, grids, capacity
        self.count = ReadCount()
        self._arrays: dict[str, zarr.Array] = {}
        self._held: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._size = 0
        self._decoding: dict[Key, threading.Event] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {"url": self.url, "grids": self.grids, "capacity": self.capacity}  # sent empty to another process

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["url"], state["grids"], state["capacity"])  # type: ignore[misc]

    def grid(self, group: str) -> Grid:
        return self.grids[group]

    def splits(self, group: str) -> bool:
        return False  # a window is read whole, from whole chunks

    def cost(self, group: str, height: int, width: int) -> float:
        return float(height * width)

    def reads(self, group: str, size: int) -> GroupReads:
        """The group as `maps.reads` prices it (every chunk counted as stored)."""
        array = self._array(group)
        return GroupReads.of_array(group, self.grids[group], size, array.shape, array.chunks,
                                   array.dtype.itemsize)

    def read(self, group: str, rows: slice, cols: slice) -> np.ndarray:
        """(*leading, rows, cols) of the group, NaN beyond its grid."""
        array = self._array(group)
        leading = tuple(array.shape[:-2])
        return padded(lambda r, c: from_chunks(lambda iy, ix: self._chunk(group, iy, ix), leading, array.chunks, r, c,
                                               array.dtype),
                      leading, array.shape[-2:], rows, cols)

    def _array(self, group: str) -> zarr.Array:
        with self._lock:
            if group not in self._arrays:
                self._arrays[group] = cube_array(self.url, group)
            return self._arrays[group]

    def _chunk(self, group: str, iy: int, ix: int) -> np.ndarray:
        key = (group, iy, ix)
        while True:
            with self._lock:
                if key in self._held:
                    self._held.move_to_end(key)
                    return self._held[key]
                waiting = self._decoding.get(key)
                if waiting is None:
                    self._decoding[key] = threading.Event()
                    break
            waiting.wait()  # another thread decodes it; then it is held (or, if that failed, decoded here)
        try:
            block, decoded = self._decode(group, iy, ix)
        except BaseException:
            with self._lock:
                self._decoding.pop(key).set()
            raise
        with self._lock:
            if decoded:
                self.count.add(ReadCount(1, decoded))
            self._held[key] = block
            self._size += block.nbytes
            while self._size > self.capacity and len(self._held) > 1:
                self._size -= self._held.popitem(last=False)[1].nbytes
            self._decoding.pop(key).set()  # held before the waiters look again
        return block

    def _decode(self, group: str, iy: int, ix: int) -> tuple[np.ndarray, int]:
        """The chunk's pixels inside the grid and the bytes decoded for them (0: never written, read as NaN)."""
        array = self._array(group)
        cy, cx = array.chunks[-2:]
        block = np.asarray(array[..., iy * cy : (iy + 1) * cy, ix * cx : (ix + 1) * cx])
        if _all_fill(block, array.fill_value) and not any(
                _written(array, (*lead, iy, ix)) for lead in np.ndindex(*array.cdata_shape[:-2])):
            return block, 0
        return block, self.reads(group, 1).tile_bytes


def _all_fill(block: np.ndarray, fill: object) -> bool:
    """Whether every value is the NaN fill value (checked from the first value on: most chunks stop there)."""
    return isinstance(fill, float | np.floating) and bool(np.isnan(fill)) and bool(np.isnan(block.flat[0])) and bool(
        np.isnan(block).all())


def _written(array: zarr.Array, chunk: tuple[int, ...]) -> bool:
    """Whether the chunk is in the store (Zarr fills one that is not)."""
    return bool(sync((array.store_path / array.metadata.encode_chunk_key(chunk)).exists()))
