"""What a map's windows read from the cube, in which order, and what that costs: one model for the engine (which
orders its windows and sizes its chunk cache with it) and for `--dry-run` (which prices the reads with it).

Zarr decodes whole chunks, and a window's block (its cells' pixels plus the patches' halo) touches several, most
of them shared with its neighbours. Each process keeps the chunks it decoded (`maps.chunks.ChunkCache`), so a
chunk costs one decode per process as long as the windows that share it run on that process before it is evicted.
The windows are therefore run in strips: `strip` window columns at a time, top to bottom, row by row, the strip
as wide as the cache (`CACHE_BYTES`) holds the chunks of two rows of it; a chunk is decoded again only where two
strips, or two actors' runs, meet. Actors take contiguous runs of that order (`split`), cut where the two sides
share the fewest chunks.

`decoded_bytes` replays the cache on an order (least recently used out, as the engine's), and `needed_bytes` is the
floor: every stored pixel under some cell's patch, once. Their ratio is the read amplification.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from geosoc.grid import Grid, Window

CACHE_BYTES = 4 * 2**30  # decoded chunks a map process keeps, unless one strip a window wide needs more
Key = tuple[str, int, int]  # (group, chunk row, chunk column)


@dataclass(frozen=True)
class GroupReads:
    """One cube group as a map reads it: `size` pixels a side around each cell's own pixel (the patch; 1: the
    cell's pixel alone, read only where it is inside the group's grid)."""

    name: str
    grid: Grid
    size: int
    tile_bytes: int  # decoded for one (y, x) chunk position: every chunk of the leading axes there
    leading_bytes: int  # one pixel of every leading axis
    stored: np.ndarray | None = None  # (chunk rows, chunk cols): chunks written (None: all); the others read as NaN

    @classmethod
    def of_array(cls, name: str, grid: Grid, size: int, shape: Sequence[int], chunks: Sequence[int], itemsize: int = 4,
                 stored: np.ndarray | None = None) -> GroupReads:
        """From a (*leading, y, x) array's shape and chunk shape."""
        leading = [math.ceil(n / c) * c for n, c in zip(shape[:-2], chunks[:-2])]
        return cls(name, grid, size, int(np.prod(leading, dtype=np.int64)) * chunks[-2] * chunks[-1] * itemsize,
                   int(np.prod(shape[:-2], dtype=np.int64)) * itemsize, stored)

    def is_stored(self, iy: int, ix: int) -> bool:
        return self.stored is None or bool(self.stored[iy, ix])


def pixels_under(grid: Grid, cube: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The cube row under each output row's cell centres and the cube column under each output column's (a cell's
    pixel is separable: its row depends on y alone, its column on x alone)."""
    rows = cube.rowcol(np.full(grid.height, grid.x_of(0)), grid.y_of(np.arange(grid.height)))[0]
    cols = cube.rowcol(grid.x_of(np.arange(grid.width)), np.full(grid.width, grid.y_of(0)))[1]
    return rows, cols


def _span(pixels: np.ndarray, size: int, n: int) -> tuple[int, int]:
    """[first, stop) of the group's pixels a run of cells reads along one axis, inside the grid (stop <= first:
    none)."""
    if size == 1:  # a cell's own pixel, and only where it is inside the grid: the bounding box of those
        inside = pixels[(pixels >= 0) & (pixels < n)]
        return (int(inside.min()), int(inside.max()) + 1) if len(inside) else (0, 0)
    half = size // 2
    return max(int(pixels.min()) - half, 0), min(int(pixels.max()) - half + size, n)


@dataclass(frozen=True)
class MapReads:
    """The chunks each window of the output `grid` reads from the cube's `groups`."""

    grid: Grid
    groups: tuple[GroupReads, ...]

    @cached_property
    def _spans(self) -> dict[str, tuple[list[range], list[range]]]:
        """Per group: the chunk rows each window row reads, and the chunk columns each window column reads."""
        out = {}
        for group in self.groups:
            rows, cols = pixels_under(self.grid, group.grid)
            cy, cx = self.grid.chunks
            spans = []
            for pixels, step, n, chunk in ((rows, cy, group.grid.height, group.grid.chunks[0]),
                                           (cols, cx, group.grid.width, group.grid.chunks[1])):
                along = []
                for start in range(0, len(pixels), step):
                    first, stop = _span(pixels[start : start + step], group.size, n)
                    along.append(range(first // chunk, (stop - 1) // chunk + 1) if stop > first else range(0))
                spans.append(along)
            out[group.name] = (spans[0], spans[1])
        return out

    def chunks(self, window: Window) -> list[Key]:
        """The chunks `window` reads (stored or not)."""
        found = self._chunks.get(window.index)
        if found is None:
            found = self._chunks[window.index] = [
                (group.name, iy, ix) for group in self.groups
                for iy in self._spans[group.name][0][window.index[0]]
                for ix in self._spans[group.name][1][window.index[1]]]
        return found

    @cached_property
    def _chunks(self) -> dict[tuple[int, int], list[Key]]:
        return {}

    @cached_property
    def _bytes(self) -> dict[str, GroupReads]:
        return {group.name: group for group in self.groups}

    def key_bytes(self, key: Key) -> int:
        """What decoding a chunk costs: 0 for one never written (read as NaN, nothing decoded)."""
        group = self._bytes[key[0]]
        return group.tile_bytes if group.is_stored(key[1], key[2]) else 0

    def wavefront(self, strip: int, lookahead: int) -> int:
        """The cache a process needs to decode each chunk of a strip `strip` windows wide once: the chunks of the
        strip's widest columns over the rows that `strip + lookahead` consecutive windows (windows in flight)
        can reach."""
        height = math.ceil((strip + lookahead) / strip) + 1  # window rows a cache must span at once
        total = 0
        for group in self.groups:
            rows, cols = self._spans[group.name]
            total += group.tile_bytes * _widest(rows, height) * _widest(cols, strip)
        return total

    def order(self, windows: Sequence[Window], lookahead: int,
              budget: int = CACHE_BYTES) -> tuple[list[Window], int, int]:
        """`windows` in strips, the strip width in windows and the cache size in bytes that reads each chunk once
        per strip: the widest strip whose chunks fit `budget` (one window wide at least, with what that needs)."""
        width = self.grid.chunk_counts[1]
        strip = next((s for s in range(width, 0, -1) if self.wavefront(s, lookahead) <= budget), 1)
        ordered = sorted(windows, key=lambda w: (w.index[1] // strip, w.index[0], w.index[1]))
        return ordered, strip, max(self.wavefront(strip, lookahead), 1)

    def shared(self, before: Sequence[Window], after: Sequence[Window]) -> int:
        """Bytes of the chunks that both runs read (decoded twice when two processes run them)."""
        first = {key for window in before for key in self.chunks(window)}
        return sum(self.key_bytes(key) for key in {k for w in after for k in self.chunks(w)} & first)

    def cut(self, run: Sequence[Window], target: int, reach: int) -> int:
        """Where to cut `run` in two near position `target`: within `reach` windows of it (about a strip's row)
        and a quarter of the shorter part (the parts stay about as long as asked), where the `reach` windows either
        side share the fewest chunk bytes (the nearest to `target` among equals)."""
        n = len(run)
        radius = min(reach, min(target, n - target) // 4)
        lo, hi = max(1, target - radius), min(n - 1, target + radius)
        if hi < lo:
            return max(1, min(target, n - 1))
        return min(range(lo, hi + 1),
                   key=lambda i: (self.shared(run[max(0, i - reach) : i], run[i : i + reach]), abs(i - target)))

    def split(self, ordered: Sequence[Window], parts: int, reach: int) -> list[list[Window]]:
        """`ordered` in up to `parts` contiguous runs of about equal length, each cut at a cheap place (`cut`), each
        in the order its actor walks it: every second run backwards, so that two neighbouring actors walk toward
        each other and meet wherever their speeds take them, on chunks they both hold."""
        runs, rest = [], list(ordered)
        for left in range(min(parts, len(rest)), 1, -1):  # runs still to make, this one included
            at = self.cut(rest, round(len(rest) / left), reach)
            runs.append(rest[:at])
            rest = rest[at:]
        runs = [*runs, rest] if rest else runs
        return [run[::-1] if i % 2 else run for i, run in enumerate(runs)]

    def decoded_bytes(self, runs: Sequence[Sequence[Window]], capacity: int) -> dict[str, int]:
        """Bytes of each group a map decodes when each run is read in order by a process keeping `capacity` bytes
        of decoded chunks, least recently used out (what `ChunkCache` does)."""
        total = {group.name: 0 for group in self.groups}
        for run in runs:
            held: OrderedDict[Key, int] = OrderedDict()
            size = 0
            for window in run:
                for key in self.chunks(window):
                    cost = self.key_bytes(key)
                    if not cost:
                        continue
                    if key in held:
                        held.move_to_end(key)
                        continue
                    total[key[0]] += cost
                    held[key] = cost
                    size += cost
                    while size > capacity and len(held) > 1:
                        size -= held.popitem(last=False)[1]
        return total

    def needed_bytes(self) -> dict[str, int]:
        """Per group: every stored pixel that some cell's read covers, once; what any reader of this map must
        decode."""
        total = {}
        for group in self.groups:
            rows, cols = pixels_under(self.grid, group.grid)
            per_row = _covered(rows, group.size, group.grid.height, group.grid.chunks[0])
            per_col = _covered(cols, group.size, group.grid.width, group.grid.chunks[1])
            stored = group.stored if group.stored is not None else np.ones((len(per_row), len(per_col)), bool)
            total[group.name] = int(per_row @ stored.astype(np.int64) @ per_col) * group.leading_bytes
        return total


def _widest(spans: list[range], count: int) -> int:
    """The most chunks `count` consecutive spans reach together."""
    best = 0
    for i in range(len(spans)):
        reached = [s for s in spans[i : i + count] if len(s)]
        if reached:
            best = max(best, max(s.stop for s in reached) - min(s.start for s in reached))
    return best


def _covered(pixels: np.ndarray, size: int, n: int, chunk: int) -> np.ndarray:
    """Per chunk along one axis: how many of its pixels some cell's `size`-wide read covers."""
    hit = np.zeros(n + 1, dtype=np.int64)
    if size == 1:
        inside = pixels[(pixels >= 0) & (pixels < n)]
        hit[inside] = 1
    else:
        starts = np.clip(pixels - size // 2, 0, n)
        stops = np.clip(pixels - size // 2 + size, 0, n)
        np.add.at(hit, starts, 1)
        np.add.at(hit, stops, -1)
        hit = (np.cumsum(hit) > 0).astype(np.int64)
    hit = hit[:n]
    padded = np.zeros(math.ceil(n / chunk) * chunk, dtype=np.int64)
    padded[:n] = hit
    return padded.reshape(-1, chunk).sum(axis=1)
