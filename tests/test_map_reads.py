"""What a map reads from its cube: the chunk cache each map process keeps (`maps.chunks`), the order and runs its
windows go in (`maps.reads`, `ray_engine.Runs`), and the bytes that costs against what the patches need."""

from __future__ import annotations

import pickle
import threading
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import zarr

from geosoc.grid import Grid
from geosoc.maps.chunks import ChunkCache
from geosoc.maps.reads import GroupReads, MapReads

BANDS, SIDE, CHUNK = 3, 40, 16  # a (3, 40, 40) group in 16 px chunks: 3 x 3 chunk positions, the last ones partial
TILE = BANDS * CHUNK * CHUNK * 4


def _cube(folder: Path, skip: set[tuple[int, int]] = frozenset()) -> tuple[str, np.ndarray]:
    """A cube with one `imagery` group of known values; the chunks in `skip` never written (read as NaN)."""
    url = str(folder / "cube.zarr")
    values = np.random.default_rng(0).normal(size=(BANDS, SIDE, SIDE)).astype(np.float32)
    array = zarr.create_array(url, name="imagery/data", shape=values.shape, chunks=(BANDS, CHUNK, CHUNK),
                              dtype="float32", fill_value=np.nan, zarr_format=3)
    for iy, ix in product(range(3), range(3)):
        if (iy, ix) not in skip:
            rows, cols = slice(iy * CHUNK, (iy + 1) * CHUNK), slice(ix * CHUNK, (ix + 1) * CHUNK)
            array[:, rows, cols] = values[:, rows, cols]
    expected = values.copy()
    for iy, ix in skip:
        expected[:, iy * CHUNK : (iy + 1) * CHUNK, ix * CHUNK : (ix + 1) * CHUNK] = np.nan
    return url, expected


def _grid(resolution: float = 30.0, chunk: int = CHUNK) -> Grid:
    return Grid("EPSG:3035", 4_000_020.0, 2_800_020.0, resolution, (round(SIDE * 30 / resolution),) * 2, (chunk, chunk))


def _padded(values: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    out = np.full((BANDS, rows.stop - rows.start, cols.stop - cols.start), np.nan, dtype=np.float32)
    for r, c in product(range(rows.start, rows.stop), range(cols.start, cols.stop)):
        if 0 <= r < SIDE and 0 <= c < SIDE:
            out[:, r - rows.start, c - cols.start] = values[:, r, c]
    return out


def test_windows_come_from_chunks_decoded_once_and_counted(tmp_path: Path) -> None:
    url, values = _cube(tmp_path)
    cache = ChunkCache(url, {"imagery": _grid()}, capacity=9 * TILE)
    for rows, cols in [(slice(-5, 20), slice(10, 45)), (slice(0, 40), slice(0, 40)), (slice(30, 41), slice(-3, 2))]:
        np.testing.assert_array_equal(cache.read("imagery", rows, cols), _padded(values, rows, cols))
    assert (cache.count.chunks, cache.count.bytes) == (9, 9 * TILE)  # every chunk once, however often read
    sent = pickle.loads(pickle.dumps(cache))  # to a Ray actor: empty, with the same capacity
    assert (sent.count.chunks, len(sent._held), sent.capacity) == (0, 0, 9 * TILE)
    np.testing.assert_array_equal(sent.read("imagery", slice(0, 40), slice(0, 40)), values)
    small = ChunkCache(url, {"imagery": _grid()}, capacity=TILE)  # one chunk held: each window decodes again
    for _ in range(2):
        small.read("imagery", slice(10, 20), slice(10, 20))  # 2 x 2 chunks
    assert small.count.chunks == 8


def test_a_chunk_never_written_reads_as_nan_and_counts_nothing(tmp_path: Path) -> None:
    url, values = _cube(tmp_path, skip={(1, 1), (2, 0)})
    cache = ChunkCache(url, {"imagery": _grid()}, capacity=9 * TILE)
    np.testing.assert_array_equal(cache.read("imagery", slice(0, 40), slice(0, 40)), values)
    assert (cache.count.chunks, cache.count.bytes) == (7, 7 * TILE)


def test_threads_asking_for_one_chunk_at_once_decode_it_once(tmp_path: Path) -> None:
    url, values = _cube(tmp_path)
    cache = ChunkCache(url, {"imagery": _grid()}, capacity=9 * TILE)
    start, results = threading.Barrier(8), []

    def read() -> None:
        start.wait()
        results.append(cache.read("imagery", slice(0, 40), slice(0, 40)))

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(np.array_equal(r, values) for r in results)
    assert cache.count.chunks == 9


@pytest.mark.parametrize("resolution,window,size", [(30, 4, 5), (60, 3, 8), (90, 2, 1), (30, 7, 12)])
def test_each_windows_chunks_and_the_needed_bytes_are_those_its_cells_read(tmp_path: Path, resolution: float,
                                                                            window: int, size: int) -> None:
    """`MapReads` against a count by hand: the chunks under each window's block (its cells' pixels plus the halo of
    `size`, clipped to the grid), and the pixels under some cell's block, once."""
    cube = _grid()
    grid = Grid.from_bounds(cube.crs, cube.bounds, resolution, window)
    reads = MapReads(grid, (GroupReads.of_array("imagery", cube, size, (BANDS, SIDE, SIDE), (BANDS, CHUNK, CHUNK)),))
    covered = np.zeros((SIDE, SIDE), dtype=bool)
    half = size // 2
    for w in grid.windows():
        x, y = np.meshgrid(grid.x_of(np.arange(w.cols.start, w.cols.stop)), grid.y_of(np.arange(w.rows.start,
                                                                                              w.rows.stop)))
        rows, cols = cube.rowcol(x.ravel(), y.ravel())
        r0, r1 = max(rows.min() - half, 0), min(rows.max() - half + size, SIDE)
        c0, c1 = max(cols.min() - half, 0), min(cols.max() - half + size, SIDE)
        expected = {("imagery", iy, ix) for iy in range(r0 // CHUNK, (r1 - 1) // CHUNK + 1)
                    for ix in range(c0 // CHUNK, (c1 - 1) // CHUNK + 1)}
        assert set(reads.chunks(w)) == expected, w
        for r, c in zip(rows, cols):
            covered[max(r - half, 0) : r - half + size, max(c - half, 0) : c - half + size] = True
    assert reads.needed_bytes() == {"imagery": int(covered.sum()) * BANDS * 4}


def test_strips_fit_the_cache_and_read_each_chunk_once_a_strip(tmp_path: Path) -> None:
    cube = _grid()
    grid = Grid.from_bounds(cube.crs, cube.bounds, 30, 4)  # 10 x 10 windows of 4 px
    group = GroupReads.of_array("imagery", cube, 5, (BANDS, SIDE, SIDE), (BANDS, CHUNK, CHUNK))
    reads = MapReads(grid, (group,))
    windows = list(grid.windows())
    wide, strip, capacity = reads.order(windows, 3)  # the whole width fits: row by row
    assert strip == 10 and wide == windows
    assert reads.decoded_bytes([wide], capacity) == {"imagery": 9 * TILE}  # each chunk once
    narrow, strip, capacity = reads.order(windows, 3, budget=5 * TILE)  # 2 rows of 3 chunks do not fit...
    assert 1 < strip < 10 and capacity <= 5 * TILE and sorted(narrow, key=lambda w: w.index) == windows
    assert narrow == sorted(windows, key=lambda w: (w.index[1] // strip, w.index))  # ...strip by strip
    strips = [[w for w in narrow if w.index[1] // strip == s] for s in range(-(-10 // strip))]
    chunks = [len({k for w in part for k in reads.chunks(w)}) for part in strips]
    for part, count in zip(strips, chunks):  # a strip alone: each of its chunks decoded once
        assert reads.decoded_bytes([part], capacity) == {"imagery": count * TILE}
    assert 9 * TILE <= reads.decoded_bytes([narrow], capacity)["imagery"] <= sum(chunks) * TILE
    runs = reads.split(wide, 2, 13)
    assert [w for w in runs[0]] + runs[1][::-1] == wide  # the second run walked backwards, toward the first
    assert abs(len(runs[0]) - len(runs[1])) <= 26


def test_runs_hand_every_window_out_once_and_take_from_the_longest(tmp_path: Path) -> None:
    from geosoc.maps.ray_engine import Runs

    cube = _grid()
    grid = Grid.from_bounds(cube.crs, cube.bounds, 30, 4)
    reads = MapReads(grid, (GroupReads.of_array("imagery", cube, 5, (BANDS, SIDE, SIDE), (BANDS, CHUNK, CHUNK)),))
    ordered, strip, _ = reads.order(list(grid.windows()), 3)
    runs = Runs(reads, ordered, 3, strip + 3)
    taken: dict[str, list] = {"a": [], "b": [], "c": []}
    for _ in range(20):  # a runs alone for a while; then all three, c fastest
        taken["a"].append(runs.next("a"))
    lost = runs.next("b")
    runs.give_back("b", lost)  # b dies with a window in hand: it goes to whoever comes next
    while len(runs):
        for actor, speed in (("a", 1), ("c", 3)):
            for _ in range(speed):
                window = runs.next(actor)
                if window is not None:
                    taken[actor].append(window)
    handed = taken["a"] + taken["c"]
    assert sorted(w.index for w in handed) == sorted(w.index for w in ordered)  # each once, the lost one too
    assert runs.next("a") is None and runs.next("c") is None
