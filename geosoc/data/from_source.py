"""A SampleSet straight from the catalog's sources, without a cube (`geosoc sample --from-source`).

Training needs patches at points; only a map needs the whole cube. Europe's cube is terabytes from hundreds of
thousands of Earth Engine requests, while its 120,000 training patches are tens of GiB. So the patches, climate
series and embedding windows of a SampleSet are read here from the layers a cube would be built from, and the
SampleSet is the one cutting the same points from a built cube gives, cell for cell: the windows come through
`window_sources.LayerWindows` and are cut by the very code that cuts them from a cube.

- Windows: points are grouped by the chunk that holds them; within a chunk, points whose windows are cheaper to
  read together than apart share one (`window_sources.units`: an Earth Engine request costs as much as a
  512 x 512 px window, so points a few hundred pixels apart share a request, sparse ones get one each). Earth
  Engine imagery is read with every band in one request (`earthengine_imagery(stacked=True)`). Climate series:
  the points of a climate chunk in one window, one request per variable for all of them.
- Resumable like a cube build: the SampleSet is written beside its place (`SampleSetWriter(resume=...)`), the
  windows in a fixed order, and after each flush a record says how many windows of which step are in it. A run
  that was killed or failed (Earth Engine gave up) resumes where the record says; what was appended after it is
  cut off and read again. A run for other points, another catalog or other settings starts over.
- Random locations (`--random N`): drawn in rounds inside `region.mask`, at pixel centres, `min_spacing` apart
  (from each other and from those kept before); a round's windows are read in a seeded random order until N have
  data, so its surplus is never requested and the locations kept are not biased in space. Each round is a
  function of the seed, its number and what earlier rounds kept: a resumed run draws the same.
- Earth Engine is throttled and retried by the layers' own fetchers (one limit for the run); local sources run
  in one process per core (the synthetic landscape and GDAL's warps hold the GIL on small windows).
"""

from __future__ import annotations

import math
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zarr

from geosoc.catalog import LoadedCatalog
from geosoc.data.points import Points, lonlat
from geosoc.data.sampling import (
    EMBEDDING_PATCH,
    OLD_MAX_NODATA,
    SampleReport,
    SampleSetWriter,
    Spacing,
    sample_chunk_rows,
    sampleset_dataset,
    spatial_folds,
)
from geosoc.data.window_sources import LayerWindows, around, cells_at, patches_at, units
from geosoc.errors import InputError
from geosoc.fingerprints import fingerprint
from geosoc.io.bars import progress_bar
from geosoc.io.storage import check_writable, parent_url
from geosoc.sources.from_catalog import open_layers
from geosoc.sources.layers import Layer
from geosoc.threads import available_cores

RECORD = "geosoc_from_source"  # the staged SampleSet's progress record (root attribute)
FLUSH_BYTES = 8 * 2**20  # windows' results held before they are appended and recorded
RATE_GUESS = 0.9  # share of random locations inside the mask with data, before a round has measured it
MAX_ROUNDS = 50
PROCESS_MIN_POINTS = 512  # fewer points than this are read on threads (starting processes costs seconds)
KEPT_ATTRS = ("source", "year", "attribution", "license", "seed")  # of the embedding layer, as the cube route


def point_layers(catalog: LoadedCatalog, root: str | None = None) -> dict[str, Layer]:
    """The catalog's layers as sampling at points reads them (Earth Engine imagery: every band in one request)."""
    return {layer.group: layer for layer in open_layers(catalog, root, stacked=True)}


# --- planning: what a run reads, without reading it ---------------------------------------------------------


@dataclass(frozen=True)
class GroupReads:
    """What one group costs: windows read, their values (float32), and, from Earth Engine, the requests."""

    group: str
    windows: int
    nbytes: int
    requests: int | None = None
    concurrency: int | None = None
    seconds_per_request: float | None = None

    @property
    def estimated_seconds(self) -> float | None:
        if self.requests is None or not self.concurrency or not self.seconds_per_request:
            return None
        return self.requests * self.seconds_per_request / self.concurrency


@dataclass(frozen=True)
class PointsPlan:
    url: str
    points: int
    reads: tuple[GroupReads, ...]
    sampleset_bytes: int  # what the SampleSet holds (uncompressed): patches, climate series, embedding windows

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)


def plan_points(catalog: LoadedCatalog, out_url: str, points: Points | None = None, n_random: int | None = None, *,
                seed: int = 0, min_spacing: float | None = None, root: str | None = None,
                layers: dict[str, Layer] | None = None) -> PointsPlan:
    """The windows, bytes and Earth Engine requests a run would read for `points` (or `n_random` locations, if
    each has data: the run's rounds of draws, each round's windows in the run's order up to N), from the catalog
    alone."""
    layers = layers if layers is not None else point_layers(catalog, root)
    source = LayerWindows(layers)
    patch = catalog.config.sampling.patch_size
    grid = layers["imagery"].grid
    if points is not None:
        x, y = points.x, points.y
        rows, cols = grid.rowcol(x, y)
        reads = [_group_reads(source, "imagery", rows, cols, patch, units(source, "imagery", rows, cols, patch))]
    else:
        assert n_random is not None
        x, y, imagery = _planned_rounds(source, grid, _inside(layers), Spacing(_spacing(catalog, min_spacing)),
                                        n_random, seed, patch)
        reads = [imagery]
    per_sample = window_bytes(source, "imagery", patch, patch)
    for group, size in (("climate", 1), ("embeddings", EMBEDDING_PATCH)):
        if group in layers:
            r, c = layers[group].grid.rowcol(x, y)
            reads.append(_group_reads(source, group, r, c, size, units(source, group, r, c, size)))
            per_sample += window_bytes(source, group, size, size)
    return PointsPlan(out_url, len(x), tuple(reads), len(x) * per_sample)


def _planned_rounds(source: LayerWindows, grid: Any, inside: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
                    spacing: Spacing, n: int, seed: int, patch: int) -> tuple[np.ndarray, np.ndarray, GroupReads]:
    """`_random`'s rounds with every location kept (the plan cannot know which have data): a round draws what is
    still missing, at the minimum spacing from the rounds before, until N are found (a continent's spacing may
    leave the first round short). The locations and the imagery windows of all rounds."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    reads: list[GroupReads] = []
    have = 0
    for number in range(MAX_ROUNDS):
        if have >= n:
            break
        x, y = _draw(seed, number, _round_size(n - have, 1.0 if number else RATE_GUESS), grid, inside, spacing)
        rows, cols = grid.rowcol(x, y)
        parts, covered = [], 0
        for part in _shuffled(units(source, "imagery", rows, cols, patch), seed, number):
            parts.append(part)
            covered += len(part)
            if have + covered >= n:
                break
        if not parts:
            break
        reads.append(_group_reads(source, "imagery", rows, cols, patch, parts))
        chosen = np.concatenate(parts)[: n - have]
        xs.append(x[chosen])
        ys.append(y[chosen])
        have += len(chosen)
    total = replace(reads[0] if reads else GroupReads("imagery", 0, 0), windows=sum(r.windows for r in reads),
                    nbytes=sum(r.nbytes for r in reads),
                    requests=None if not reads or reads[0].requests is None else sum(r.requests or 0 for r in reads))
    return (np.concatenate(xs) if xs else np.array([]), np.concatenate(ys) if ys else np.array([]), total)


def _group_reads(source: LayerWindows, group: str, rows: np.ndarray, cols: np.ndarray, size: int,
                 parts: list[np.ndarray]) -> GroupReads:
    nbytes, requests = 0, 0
    for part in parts:
        height, width = _window_shape(rows[part], cols[part], size)
        nbytes += window_bytes(source, group, height, width)
        requests += source.requests(group, height, width) or 0
    reader: Any = source.layers[group].reader
    if not hasattr(reader, "window_requests"):
        return GroupReads(group, len(parts), nbytes)
    remote = reader.plan([])
    return GroupReads(group, len(parts), nbytes, requests, remote["concurrency"], remote["seconds_per_request"])


def _window_shape(rows: np.ndarray, cols: np.ndarray, size: int) -> tuple[int, int]:
    """(height, width) of the window that holds the `size` px windows around (rows, cols)."""
    return int(rows.max() - rows.min()) + size, int(cols.max() - cols.min()) + size


def window_bytes(source: LayerWindows, group: str, height: int, width: int) -> int:
    """The float32 values of a (height, width) window of `group`, every band or month and variable."""
    return math.prod(source.leading(group)) * height * width * 4


# --- the run ---------------------------------------------------------------------------------------------------


def sample_from_source(
    catalog: LoadedCatalog, out_url: str, points: Points | None = None, n_random: int | None = None, *,
    seed: int = 0, min_spacing: float | None = None, root: str | None = None, kind: str = "labelled",
    workers: int | None = None, progress: bool = False, layers: dict[str, Layer] | None = None,
) -> SampleReport:
    """Write the SampleSet of `points` (or of `n_random` random locations with data) from the catalog's sources:
    what `sample_points` writes from a built cube, resumably. `layers` replaces the catalog's (e.g. Earth
    Engine layers with an injected pixel fetcher)."""
    if (points is None) == (n_random is None):
        raise InputError("give either points or a number of random locations")
    check_writable(parent_url(out_url))  # first: a place that cannot take the SampleSet is one line, before any work
    config = catalog.config
    layers = layers if layers is not None else point_layers(catalog, root)
    for layer in layers.values():  # credentials, file lists, the synthetic embedding's COGs: before any read
        if hasattr(layer.reader, "prepare"):
            layer.reader.prepare()
    source = LayerWindows(layers)
    patch = config.sampling.patch_size
    bands = [str(b) for b in layers["imagery"].axes["band"]]
    spacing = _spacing(catalog, min_spacing)
    what = (_points_fingerprint(points) if points is not None else f"random {n_random} seed {seed} spacing {spacing}")
    identity = fingerprint(config.model_dump_json(include={"region", "imagery", "climate", "embeddings",
                                                           "sampling"}), kind, what)
    count = len(points) if points is not None else int(n_random or 0)
    with SampleSetWriter(out_url, bands, patch, resume=identity) as writer, \
            _Pool(source, workers, processes=count >= PROCESS_MIN_POINTS) as pool:
        staged = _Staged(writer.group, _specs(layers))
        if points is not None:
            _labelled(staged, pool, source, points, patch, config.sampling.max_nodata, progress)
            chosen = points.subset(staged.read("index"))
        else:
            assert n_random is not None
            chosen = _random(staged, pool, source, int(n_random), seed, spacing, patch, config.sampling.max_nodata,
                             progress, _inside(layers))
        if not len(chosen):
            raise InputError(f"{chosen.source}: no point has a patch with data in the catalog's sources")
        series = months = variables = None
        if "climate" in layers:
            series = _gathered(staged, pool, source, "climate", chosen, 1, progress)
            months, variables = layers["climate"].axes["time"], [str(v) for v in layers["climate"].axes["variable"]]
        attrs: dict[str, Any] = {"route": "source", "region": config.region.name, "patch_size": patch,
                                 "crs": config.region.crs, "kind": kind, "source": chosen.source,
                                 "fold_block_size": config.sampling.fold_block_size,
                                 "reads": pool.reads}  # of the run that finished it (a resumed one: its part)
        vectors = None
        if "embeddings" in layers:
            vectors = _gathered(staged, pool, source, "embeddings", chosen, EMBEDDING_PATCH, progress)
            layer = layers["embeddings"]
            attrs["embeddings"] = {**{k: v for k, v in layer.attrs.items() if k in KEPT_ATTRS},
                                   "resolution": layer.grid.resolution}
        nodata = staged.read("nodata")
        dropped = _dropped(staged, points, config.sampling.max_nodata) if points is not None else []
        fold = spatial_folds(chosen.x, chosen.y, config.sampling.fold_block_size, config.sampling.folds, seed)
        dataset = sampleset_dataset(chosen, fold, series, months, variables, bands, attrs, vectors)
        staged.clear()
        url = writer.finish(dataset)
    return SampleReport(url, len(chosen), dropped, series is not None, int((nodata > OLD_MAX_NODATA).sum()))


def _spacing(catalog: LoadedCatalog, min_spacing: float | None) -> float:
    return float(catalog.config.sampling.min_spacing if min_spacing is None else min_spacing)


def _points_fingerprint(points: Points) -> str:
    ids = "\n".join(str(i) for i in points.ids)
    return fingerprint(ids, points.x.tobytes(), points.y.tobytes(), points.target.tobytes(), points.source)


def _specs(layers: dict[str, Layer]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The staged arrays beside the patches: per kept point, per dropped point, per gathered climate or
    embedding row (with the kept point it belongs to)."""
    specs: dict[str, tuple[tuple[int, ...], str]] = {
        "index": ((), "int64"), "x": ((), "float64"), "y": ((), "float64"), "nodata": ((), "float32"),
        "dropped": ((), "int64"), "dropped_nodata": ((), "float32")}
    if "climate" in layers:
        specs["climate"] = (tuple(len(v) for v in layers["climate"].axes.values()), "float32")
        specs["climate_at"] = ((), "int64")
    if "embeddings" in layers:
        specs["embeddings"] = ((len(layers["embeddings"].axes["band"]), EMBEDDING_PATCH, EMBEDDING_PATCH), "float32")
        specs["embeddings_at"] = ((), "int64")
    return specs


class _Staged:
    """Arrays appended in a fixed order beside the patches of the SampleSet being written, and the record of how
    far they got: rows per array, windows done per step, and values a step needs to resume (a round's start)."""

    def __init__(self, group: zarr.Group, specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
        self.group = group
        self.arrays: dict[str, zarr.Array] = {"patch": group["patch"]}  # type: ignore[dict-item]  # made by the writer
        for name, (tail, dtype) in specs.items():
            key = f"staged_{name}"
            if key not in group:
                rows = sample_chunk_rows(max(1, math.prod(tail)) * np.dtype(dtype).itemsize)
                group.create_array(key, shape=(0, *tail), chunks=(rows, *tail), dtype=dtype,
                                   fill_value=np.nan if dtype.startswith("float") else -1)
            self.arrays[name] = group[key]  # type: ignore[assignment]
        record = group.attrs.get(RECORD)
        self.record: dict[str, Any] = dict(record) if isinstance(record, dict) else {"rows": {}, "steps": {},
                                                                                       "values": {}}
        for name, array in self.arrays.items():  # what was appended after the last record is read again
            rows = int(self.record["rows"].get(name, 0))
            if array.shape[0] != rows:
                array.resize((rows, *array.shape[1:]))
        self.buffer: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self.buffered = 0

    def rows(self, name: str) -> int:
        return int(self.arrays[name].shape[0]) + sum(len(part) for part in self.buffer[name])

    def done(self, step: str) -> int:
        """Windows of `step` already in the SampleSet (recorded)."""
        return int(self.record["steps"].get(step, 0))

    def value(self, key: str, default: Any) -> Any:
        return self.record["values"].get(key, default)

    def add(self, step: str, windows_done: int, **parts: np.ndarray) -> None:
        for name, values in parts.items():
            self.buffer[name].append(values)
            self.buffered += values.nbytes
        self.record["steps"][step] = windows_done
        if self.buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self, **values: Any) -> None:
        """Append what is buffered, then record it (and `values`): a kill between the two loses only the buffer."""
        for name, parts in self.buffer.items():
            if parts:
                self.arrays[name].append(np.concatenate(parts), axis=0)
                parts.clear()
        self.buffered = 0
        self.record["rows"] = {name: int(array.shape[0]) for name, array in self.arrays.items()}
        self.record["values"].update(values)
        self.group.attrs[RECORD] = self.record

    def read(self, name: str, stop: int | None = None) -> np.ndarray:
        self.flush()
        return np.asarray(self.arrays[name][:stop])

    def clear(self) -> None:
        """Remove the staged arrays and the record: what stays is a SampleSet's patches."""
        self.flush()
        for name in self.arrays:
            if name != "patch":
                del self.group[f"staged_{name}"]
        del self.group.attrs[RECORD]


def _labelled(staged: _Staged, pool: _Pool, source: LayerWindows, points: Points, patch: int, max_nodata: float,
              progress: bool) -> None:
    """The patches of `points`, in the order cutting them from a cube gives (by chunk, then as given): each
    chunk's windows are appended together, sorted."""
    grid = source.grid("imagery")
    rows, cols = grid.rowcol(points.x, points.y)
    parts = units(source, "imagery", rows, cols, patch)
    chunk = grid.chunk_index(np.clip(rows, 0, grid.height - 1), np.clip(cols, 0, grid.width - 1))
    done = staged.done("patches")
    tasks = (("patches", "imagery", part, rows[part], cols[part], patch) for part in parts[done:])
    pending: list[Any] = []
    with progress_bar(total=len(points), initial=sum(len(p) for p in parts[:done]), desc="sample", unit="point",
                      disable=not progress) as bar:
        for number, part in enumerate(pool.map_in_order(tasks), start=done + 1):
            pending.append(part)
            bar.update(len(part.indices))
            if number == len(parts) or chunk[parts[number][0]] != chunk[parts[number - 1][0]]:
                _keep(staged, "patches", number, _merged(pending), points.x, points.y, max_nodata)
                pending = []
    staged.flush()


def _merged(parts: list[Any]) -> Any:
    """One chunk's windows as one extraction, its points in their given order."""
    if len(parts) == 1:
        return parts[0]
    order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
    return type(parts[0])(*(np.concatenate([getattr(p, f) for p in parts])[order]
                            for f in ("indices", "patches", "nodata", "centre_valid")))


def _keep(staged: _Staged, step: str, windows_done: int, part: Any, x: np.ndarray, y: np.ndarray,
          max_nodata: float, limit: int | None = None, index: bool = True) -> int:
    """Append the patches of `part` that have data (at most `limit`); the dropped ones are recorded."""
    valid = part.valid(max_nodata)
    kept = np.flatnonzero(valid)[:limit]
    lost = np.flatnonzero(~valid)
    staged.add(step, windows_done, patch=part.patches[kept], index=part.indices[kept] if index else
               np.full(len(kept), -1), x=x[part.indices[kept]], y=y[part.indices[kept]],
               nodata=part.nodata[kept].astype(np.float32), dropped=part.indices[lost] if index else lost[:0],
               dropped_nodata=np.where(part.centre_valid[lost], part.nodata[lost], np.nan).astype(np.float32)
               if index else np.zeros(0, np.float32))
    return len(kept)


def _random(staged: _Staged, pool: _Pool, source: LayerWindows, n: int, seed: int, min_spacing: float, patch: int,
            max_nodata: float, progress: bool, inside: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
            ) -> Points:
    """`n` random locations with data (module docstring), their patches appended round by round."""
    grid = source.grid("imagery")
    with progress_bar(total=n, initial=staged.rows("x"), desc="sample", unit="point", disable=not progress) as bar:
        while staged.rows("x") < n:
            number = int(staged.value("round", 0))
            if number == MAX_ROUNDS:
                raise InputError(f"found only {staged.rows('x')} of {n} locations with data in {MAX_ROUNDS} rounds; "
                                 "lower --min-spacing or N")
            start, drawn = int(staged.value("round_rows", 0)), int(staged.value("drawn", 0))
            rate = max(start / drawn, 0.01) if drawn else RATE_GUESS
            spacing = Spacing(min_spacing)
            spacing.accept(staged.read("x", start), staged.read("y", start), start)
            x, y = _draw(seed, number, _round_size(n - start, rate), grid, inside, spacing)
            rows, cols = grid.rowcol(x, y)
            parts = _shuffled(units(source, "imagery", rows, cols, patch), seed, number)
            step = f"round {number}"
            done = staged.done(step)
            tasks = (("patches", "imagery", part, rows[part], cols[part], patch) for part in parts[done:])
            for windows, part in enumerate(pool.map_in_order(tasks), start=done + 1):
                need = n - staged.rows("x")
                bar.update(_keep(staged, step, windows, part, x, y, max_nodata, limit=need, index=False))
                if staged.rows("x") >= n:
                    break
            staged.flush(round=number + 1, round_rows=staged.rows("x"), drawn=drawn + len(x))
    x, y = staged.read("x"), staged.read("y")
    ids = np.array([f"random-{seed}-{i}" for i in range(len(x))], dtype=object)
    return Points(ids, x, y, *lonlat(x, y, grid.crs), np.full(len(x), np.nan), "", f"random(seed={seed})")


def _round_size(need: int, rate: float) -> int:
    return int(math.ceil(need / rate * 1.05)) + 16


def _shuffled(parts: list[np.ndarray], seed: int, number: int) -> list[np.ndarray]:
    """A round's windows in a seeded random order: the locations kept when N are reached are a random share."""
    order = np.random.default_rng([seed, number, 1]).permutation(len(parts))
    return [parts[i] for i in order]


def _inside(layers: dict[str, Layer]) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """Whether points are inside `region.mask` (the imagery layer's mask), or None without one."""
    return getattr(layers["imagery"].reader, "inside", None)


def _draw(seed: int, number: int, size: int, grid: Any, inside: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
          spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Round `number`'s candidates: `size` pixel centres drawn uniformly inside the mask (or the grid), then those
    at least the spacing from each other and from `spacing`'s points, in order."""
    rng = np.random.default_rng([seed, number])
    xmin, ymin, xmax, ymax = grid.bounds
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    found, share = 0, 1.0
    for _ in range(100):
        if found >= size:
            break
        draws = int(min(4 * size + 64, (size - found) / max(share, 0.01) * 1.2 + 64))
        rows, cols = grid.rowcol(rng.uniform(xmin, xmax, draws), rng.uniform(ymin, ymax, draws))
        cx, cy = grid.x_of(cols), grid.y_of(rows)  # pixel centres: a location is a pixel
        keep = inside(cx, cy) if inside is not None else np.ones(draws, dtype=bool)
        share = max(keep.mean(), 0.001)
        xs.append(cx[keep])
        ys.append(cy[keep])
        found += int(keep.sum())
    x, y = np.concatenate(xs)[:size], np.concatenate(ys)[:size]
    taken = spacing.accept(x, y, size)
    return x[taken], y[taken]


def _gathered(staged: _Staged, pool: _Pool, source: LayerWindows, group: str, chosen: Points, size: int,
              progress: bool) -> np.ndarray:
    """(kept point, ...) climate cells (`size` 1) or embedding windows of the kept points: read by window, staged
    in window order with the point each row belongs to, then put in the points' order."""
    grid = source.grid(group)
    rows, cols = grid.rowcol(chosen.x, chosen.y)
    parts = units(source, group, rows, cols, size)
    done = staged.done(group)
    kind = "cells" if size == 1 else "around"
    tasks = ((kind, group, part, rows[part], cols[part], size) for part in parts[done:])
    with progress_bar(total=len(parts), initial=done, desc=group, unit="window", disable=not progress) as bar:
        for number, (at, values) in enumerate(pool.map_in_order(tasks), start=done + 1):
            staged.add(group, number, **{group: values, f"{group}_at": at})
            bar.update(1)
    staged.flush()
    at, values = staged.read(f"{group}_at"), staged.arrays[group]
    out = np.full((len(chosen), *values.shape[1:]), np.nan, dtype=np.float32)
    step = values.chunks[0]
    for start in range(0, len(at), step):  # a staged chunk at a time: the points' order held once, not twice
        out[at[start : start + step]] = values[start : start + step]
    return out


def _dropped(staged: _Staged, points: Points, max_nodata: float) -> list[str]:
    """The cube route's messages for the points whose patch had no data."""
    out = []
    for i, nodata in zip(staged.read("dropped"), staged.read("dropped_nodata"), strict=True):
        why = ("its centre pixel has no data" if np.isnan(nodata) else
               f"{nodata:.0%} of its patch has no data (more than sampling.max_nodata, {max_nodata:.0%})")
        out.append(f"point {points.ids[i]}: {why}; dropped")
    return out


# --- reading windows in parallel, results in order -------------------------------------------------------------

Task = tuple[str, str, np.ndarray, np.ndarray, np.ndarray, int]  # kind, group, positions, rows, cols, size
_process_source: LayerWindows | None = None  # a worker process's layers, set once when it starts


def read_task(source: LayerWindows, task: Task) -> Any:
    """One window's share of a step: patches (an `Extracted`), or (positions, values) of cells or windows."""
    kind, group, positions, rows, cols, size = task
    if kind == "patches":
        return patches_at(source, positions, rows, cols, size, group)
    if kind == "cells":
        return positions, cells_at(source, group, rows, cols)
    return positions, around(source, group, rows, cols, size)


def _set_process_source(source: LayerWindows) -> None:
    global _process_source
    _process_source = source


def _read_in_process(task: Task) -> Any:
    assert _process_source is not None
    return read_task(_process_source, task)


class _Pool:
    """Reads windows in parallel and gives the results in the tasks' order, with a bounded number in flight:
    threads for Earth Engine (as many as its requests in flight), else a process per core."""

    def __init__(self, source: LayerWindows, workers: int | None, processes: bool) -> None:
        readers: list[Any] = [layer.reader for layer in source.layers.values()]
        limits = [int(reader.plan()["concurrency"]) for reader in readers if hasattr(reader, "window_requests")]
        self.remote = bool(limits)
        self.workers = max(limits) if limits else (workers or available_cores())
        self.source = source
        self.reads: dict[str, dict[str, int]] = {}  # per group: windows and bytes this run read
        self.executor: Executor
        if not self.remote and processes and self.workers > 1:
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_set_process_source, initargs=(source,))
            self.call: Callable[[Task], Any] = _read_in_process
        else:
            self.executor = ThreadPoolExecutor(self.workers)
            self.call = lambda task: read_task(source, task)

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def map_in_order(self, tasks: Iterable[Task]) -> Iterator[Any]:
        """The tasks' results in order, at most twice as many in flight as workers. A caller that stops early (a
        random round that reached N) leaves those in flight to finish: what a run reads does not depend on timing."""
        pending: deque[Future[Any]] = deque()
        limit = 2 * self.workers
        for task in tasks:
            pending.append(self.executor.submit(self.call, task))
            self._count(task)
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def _count(self, task: Task) -> None:
        _, group, _, rows, cols, size = task
        count = self.reads.setdefault(group, {"windows": 0, "bytes": 0})
        count["windows"] += 1
        count["bytes"] += window_bytes(self.source, group, *_window_shape(rows, cols, size))
