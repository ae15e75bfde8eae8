"""Patches and climate series at points -> SampleSets (the Zarr that training and evaluation read).

Extraction groups points by the cube chunk that holds them; each group's window (the points' extent plus the
halo a patch needs) is read once, and patches are gathered from it with one vectorised fancy index. Groups run
as Dask tasks in bounded batches and the driver appends their patches to the output, so memory stays near
(batch x window) whatever the number of points. A SampleSet is written to a temporary path and moved into
place when complete: an interrupted run leaves no half-written SampleSet (re-running redoes it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from scipy.spatial import cKDTree

from geosoc.catalog import EMBEDDING_BANDS
from geosoc.data.cube import axis_coordinate, cube_parts, embeddings_part, with_axis_names
from geosoc.data.points import Points, lonlat
from geosoc.data.window_sources import (
    CubeWindows,
    Extracted,
    around,
    cells_at,
    chunk_groups,
    cube_array,
    patches_at,
)
from geosoc.data.window_sources import cut_patches as cut_patches  # where the maps' tree features cut theirs
from geosoc.errors import InputError
from geosoc.grid import Grid
from geosoc.io.bars import progress_bar
from geosoc.io.locks import exclusive
from geosoc.io.storage import (
    beside,
    check_writable,
    consolidate,
    filesystem,
    join,
    open_store,
    parent_url,
    publish_tree,
    read_group_attrs,
    tidy_beside,
    zarr_store,
)
from geosoc.threads import available_cores

MAX_NODATA_FRACTION = 1.0  # default: a patch is kept whatever part of it has no data, if its centre pixel has
OLD_MAX_NODATA = 0.5  # the default before: patches with more than half their pixels without data were dropped
ROUND_CAP = 2048  # random candidates extracted per round (bounds memory for unlabelled sampling)
TARGET_CHUNK_BYTES = 8 * 2**20
STAGING_ATTR = "geosoc_staging"  # what a resumable temporary SampleSet is the work of
EMBEDDING_PATCH = 5  # cells of the embeddings grid around a sample kept in its SampleSet (the trees' window)


def read_imagery(url: str, shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """(band, r1 - r0, c1 - c0) pixels of the cube's imagery, NaN beyond the grid (patches at the edge)."""
    return read_block(url, "imagery", shape, r0, r1, c0, c1)


def read_block(url: str, group: str, shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """(band, r1 - r0, c1 - c0) pixels of a (band, y, x) cube group, NaN beyond the grid (`shape`, the group's
    (y, x) size, is the array's own: callers need not know it, and it is not read)."""
    return CubeWindows(url).read(group, slice(r0, r1), slice(c0, c1))


def _extract_group(url: str, shape: tuple[int, int], indices: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                   patch: int) -> Extracted:
    """Read the group's window once (padded with NaN beyond the grid, whose `shape` the array knows) and gather
    every patch from it (the same code cuts them from the catalog's sources: `data.from_source`)."""
    return patches_at(CubeWindows(url), indices, rows, cols, patch)


def extract_patches(
    url: str, grid: Grid, x: np.ndarray, y: np.ndarray, patch: int, *, client: Any = None,
    workers: int | None = None, progress: bool = False,
) -> Iterator[Extracted]:
    """Patches centred on points (grid CRS), one chunk group at a time, in chunk order."""
    rows, cols = grid.rowcol(x, y)
    groups = chunk_groups(grid, rows, cols)
    batch = 2 * (workers or available_cores())

    def task(indices: np.ndarray) -> Any:
        return dask.delayed(_extract_group, pure=False)(url, grid.shape, indices, rows[indices], cols[indices], patch)

    with progress_bar(total=len(x), desc="extract", unit="point", disable=not progress) as bar:
        if client is not None:
            from distributed import as_completed

            pending = iter(groups)
            futures = as_completed([client.compute(task(g)) for g in _take(pending, batch)])
            for future in futures:
                result = future.result()
                bar.update(len(result.indices))
                yield result
                for g in _take(pending, 1):
                    futures.add(client.compute(task(g)))
            return
        for start in range(0, len(groups), batch):
            results = dask.compute(*[task(g) for g in groups[start : start + batch]], scheduler="threads",
                                   num_workers=workers or available_cores())
            for result in results:
                bar.update(len(result.indices))
                yield result


def _take(iterator: Iterator[np.ndarray], n: int) -> list[np.ndarray]:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == n:
            break
    return out


def climate_at(url: str, grid: Grid, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, time, variable) series of the climate cell under each point; each climate chunk read once."""
    source = CubeWindows(url, {"climate": grid})
    rows, cols = grid.rowcol(x, y)
    inside = np.flatnonzero(grid.contains(rows, cols))
    out = np.full((len(x), *cube_array(url, "climate").shape[:2]), np.nan, dtype=np.float32)
    for members in chunk_groups(grid, rows[inside], cols[inside]):
        out[inside[members]] = cells_at(source, "climate", rows[inside[members]], cols[inside[members]])
    return out


def embeddings_at(url: str, grid: Grid, x: np.ndarray, y: np.ndarray, size: int = EMBEDDING_PATCH) -> np.ndarray:
    """(n, 64, size, size) embedding vectors of the `size` x `size` cells of the cube's embeddings grid centred on
    each point's cell (NaN beyond the grid or without data); each group of points read once per chunk."""
    rows, cols = grid.rowcol(x, y)
    out = np.full((len(x), len(EMBEDDING_BANDS), size, size), np.nan, dtype=np.float32)
    for members in chunk_groups(grid, rows, cols):
        out[members] = around(CubeWindows(url), "embeddings", rows[members], cols[members], size)
    return out


def spatial_folds(x: np.ndarray, y: np.ndarray, block_size: float, folds: int, seed: int = 0) -> np.ndarray:
    """Fold per point from square blocks of `block_size`: whole blocks go to the fold with fewest points so
    far (largest blocks first), so no block is split across folds and folds are balanced in count.

    Not sklearn's GroupKFold: it balances the same way but breaks ties between equal blocks by their order
    (no seed), and its shuffle drops the balancing; here ties are broken by `seed`."""
    bx, by = np.floor(x / block_size).astype(np.int64), np.floor(y / block_size).astype(np.int64)
    blocks, inverse, counts = np.unique(np.stack([bx, by], axis=1), axis=0, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(blocks)), -counts))
    sizes = np.zeros(folds, dtype=np.int64)
    fold_of_block = np.empty(len(blocks), dtype=np.int64)
    for block in order:
        fold = int(np.argmin(sizes))
        fold_of_block[block] = fold
        sizes[fold] += counts[block]
    return fold_of_block[inverse.ravel()].astype(np.int8)


def sample_chunk_rows(bytes_per_sample: int) -> int:
    """Samples per Zarr chunk of a SampleSet's per-sample arrays: ~8 MiB of the largest one.

    Training streams a SampleSet by whole chunks (`streaming.SampleStream`): a chunk of a few MiB is one
    object-store request whose latency is small beside its transfer, yet small enough that a shuffle window of
    several chunks (a batch mixes many places) stays a few hundred MiB at the paper's 64 px x 14 bands
    (~36 samples a chunk). Patches and climate series share the rows of a chunk, so that reading a window
    touches the same chunks of both and nothing more."""
    return max(1, TARGET_CHUNK_BYTES // max(1, bytes_per_sample))


class SampleSetWriter:
    """Writes a SampleSet to a temporary path beside `url`, appending patches as they come; `finish` moves it
    into place. A context manager: it holds the SampleSet's lock, and an error deletes what it wrote.

    `resume` (what identifies the work, e.g. a fingerprint of the points and settings): the temporary SampleSet
    is `<url>.staging`, kept when the run fails or is killed, for a later run with the same `resume` to carry on
    (`data.from_source`); one left by other work is removed first."""

    def __init__(self, url: str, bands: list[str] | None, patch: int | None, resume: str | None = None) -> None:
        self.url, self.bands, self.patch_size, self.resume = url, bands, patch, resume
        self.exit = ExitStack()

    def __enter__(self) -> SampleSetWriter:
        with self.exit as on_error:
            self.lease = self.exit.enter_context(exclusive(self.url, "sample"))  # also: the folder takes writes
            tidy_beside(self.url)
            if self.resume is None:
                self.tmp = beside(self.url, "partial")
                self.exit.callback(self._remove_tmp)
            else:
                self.tmp = staging_url(self.url)
                if (read_group_attrs(self.tmp) or {}).get(STAGING_ATTR) != self.resume:
                    self._remove_tmp()
            self.store = zarr_store(self.tmp)
            self.group = zarr.open_group(self.store, mode="w" if self.resume is None else "a", zarr_format=3)
            found = self.group.get("patch")  # resumed: the patches so far
            self.patch: zarr.Array | None = found if isinstance(found, zarr.Array) else None
            bands, patch = self.bands, self.patch_size
            if self.patch is None and bands is not None and patch is not None:
                chunk = sample_chunk_rows(len(bands) * patch * patch * 4)
                self.patch = self.group.create_array(
                    "patch", shape=(0, len(bands), patch, patch), chunks=(chunk, len(bands), patch, patch),
                    dtype="float32", fill_value=np.nan, dimension_names=["sample", "band", "py", "px"],
                )
            if self.resume is not None:
                self.group.attrs[STAGING_ATTR] = self.resume  # last: a staging without it is started afresh
            self.exit = on_error.pop_all()  # set up: kept until __exit__
        return self

    def append(self, patches: np.ndarray) -> None:
        if len(patches):
            assert self.patch is not None, "this SampleSet was made without patches"
            self.patch.append(patches, axis=0)

    def finish(self, dataset: xr.Dataset) -> str:
        encoding = {}
        if "climate" in dataset:
            _, months, variables = dataset["climate"].shape
            rows = self.patch.chunks[0] if self.patch is not None else sample_chunk_rows(months * variables * 4)
            encoding["climate"] = {"chunks": (rows, months, variables)}
        if STAGING_ATTR in self.group.attrs:
            del self.group.attrs[STAGING_ATTR]  # the SampleSet is whole: nothing to resume from
        dataset.to_zarr(self.store, mode="a", zarr_format=3, consolidated=False, encoding=encoding)
        consolidate(self.tmp)
        self.lease.check()  # a run that lost its lock meanwhile must not replace another's SampleSet
        publish_tree(self.tmp, self.url)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.exit.close()

    def _remove_tmp(self) -> None:
        """What is left of the temporary SampleSet: all of it after an error, none after `finish`."""
        fs, tmp = filesystem(self.tmp)
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


def staging_url(url: str) -> str:
    """Where a resumable SampleSet is written before it moves to `url`."""
    return f"{url.rstrip('/')}.staging"


def sampleset_dataset(
    points: Points, fold: np.ndarray, climate: np.ndarray | None, months: list[Any] | None,
    variables: list[str] | None, bands: list[str] | None, attrs: dict[str, Any],
    embeddings: np.ndarray | None = None,
) -> xr.Dataset:
    """Everything but the patches, in SampleSet layout (integer axis coords, names in attrs); `embeddings`:
    (sample, 64, ey, ex) AlphaEarth vectors around each sample, when the cube has them."""
    coords: dict[str, Any] = {
        "sample_id": ("sample", np.asarray(points.ids, dtype=object)),
        "x": ("sample", points.x),
        "y": ("sample", points.y),
        "lon": ("sample", points.lon),
        "lat": ("sample", points.lat),
        "fold": ("sample", fold),
    }
    data: dict[str, Any] = {"target": ("sample", points.target.astype(np.float32),
                                       {"units": points.units, "long_name": points.target_name})}
    if bands is not None:
        coords["band"] = axis_coordinate("band", bands)
    if climate is not None:
        assert months is not None and variables is not None
        data["climate"] = (("sample", "time", "variable"), np.asarray(climate, dtype=np.float32))
        coords["time"] = axis_coordinate("time", months)
        coords["variable"] = axis_coordinate("variable", variables)
    if embeddings is not None:
        data["embedding"] = (("sample", "embedding_band", "ey", "ex"), np.asarray(embeddings, dtype=np.float32))
        coords["embedding_band"] = axis_coordinate("embedding_band", list(EMBEDDING_BANDS))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(
        attrs,
        band_names=list(bands or []),
        variable_names=list(variables or []),
        has_patches=bands is not None,
        has_climate=climate is not None,
        has_embeddings=embeddings is not None,
        units=points.units,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    return ds


@dataclass
class SampleReport:
    url: str
    samples: int
    dropped: list[str]
    has_climate: bool
    mostly_nodata: int = 0  # samples kept with more than half their patch without data (the old rule dropped them)


def sample_points(
    cube_url: str, points: Points, out_url: str, patch: int, *, fold_block_size: float, folds: int,
    seed: int = 0, client: Any = None, workers: int | None = None, progress: bool = False, kind: str = "labelled",
    max_nodata: float = MAX_NODATA_FRACTION,
) -> SampleReport:
    """Write the SampleSet of `points`: patch and climate series at each (and the 5 x 5 cells of embedding vectors
    around it, when the cube has embeddings), dropping patches without data at
    their centre or with more than `max_nodata` of their pixels without data (by default none is dropped for
    that: pixels beyond the rasters stay NaN, the network sees where they are, the trees use the centre pixel and
    the window mean of what there is). The riverbank and coastal points a patch rule drops are often the
    hardest and most telling ones, and every model would be scored without them."""
    check_writable(parent_url(out_url))  # first: a place that cannot take the SampleSet is one line, before any work
    imagery, grid, climate, climate_grid = cube_parts(cube_url)
    bands = [str(b) for b in imagery["band"].values]
    kept: list[np.ndarray] = []
    dropped: list[str] = []
    mostly_nodata = 0
    with SampleSetWriter(out_url, bands, patch) as writer:
        for part in extract_patches(cube_url, grid, points.x, points.y, patch, client=client, workers=workers,
                                    progress=progress):
            valid = part.valid(max_nodata)
            mostly_nodata += int((valid & (part.nodata > OLD_MAX_NODATA)).sum())
            writer.append(part.patches[valid])
            kept.append(part.indices[valid])
            for j in np.flatnonzero(~valid):
                dropped.append(f"point {points.ids[part.indices[j]]}: {part.why_dropped(int(j), max_nodata)}; dropped")
        order = np.concatenate(kept) if kept else np.array([], dtype=np.int64)
        if not len(order):
            raise InputError(f"{points.source}: no point has a patch with data in {cube_url}")
        chosen = points.subset(order)
        series = climate_at(cube_url, climate_grid, chosen.x, chosen.y) if climate_grid is not None else None
        months = list(climate["time"].values) if climate is not None else None
        variables = [str(v) for v in climate["variable"].values] if climate is not None else None
        fold = spatial_folds(chosen.x, chosen.y, fold_block_size, folds, seed)
        attrs = {"cube": cube_url, "patch_size": patch, "crs": grid.crs, "kind": kind, "source": points.source,
                 "fold_block_size": fold_block_size}
        embedding = embeddings_part(cube_url)
        vectors = None
        if embedding is not None:
            vectors = embeddings_at(cube_url, embedding[1], chosen.x, chosen.y)
            kept_attrs = ("source", "year", "attribution", "license", "seed")
            attrs["embeddings"] = {**{k: v for k, v in embedding[0]["data"].attrs.items() if k in kept_attrs},
                                   "resolution": embedding[1].resolution}
        url = writer.finish(sampleset_dataset(chosen, fold, series, months, variables, bands, attrs, vectors))
    return SampleReport(url, len(chosen), dropped, series is not None, mostly_nodata)


def random_points(
    cube_url: str, n: int, patch: int, seed: int, min_spacing: float = 0.0, *, workers: int | None = None,
    progress: bool = False, max_nodata: float = MAX_NODATA_FRACTION,
) -> Points:
    """`n` reproducible random locations whose patch has data (centre valid, mostly valid), `min_spacing`
    apart. Candidates are drawn in rounds, extracted, and the valid ones kept in candidate order."""
    _, grid, _, _ = cube_parts(cube_url)
    rng = np.random.default_rng(seed)
    xmin, ymin, xmax, ymax = grid.bounds
    accepted_x: list[float] = []
    accepted_y: list[float] = []
    spacing = Spacing(min_spacing)
    rate = 0.5
    for _round in range(50):
        need = n - len(accepted_x)
        if need <= 0:
            break
        size = int(min(ROUND_CAP, max(64, need / rate * 1.2)))
        cx, cy = rng.uniform(xmin, xmax, size), rng.uniform(ymin, ymax, size)
        rows, cols = grid.rowcol(cx, cy)
        cx, cy = grid.x_of(cols), grid.y_of(rows)  # pixel centres: a location is a pixel
        candidates = np.flatnonzero(spacing.free(cx, cy))
        valid = np.zeros(size, dtype=bool)
        for part in extract_patches(cube_url, grid, cx[candidates], cy[candidates], patch, workers=workers,
                                    progress=progress):
            valid[candidates[part.indices[part.valid(max_nodata)]]] = True
        rate = max(valid.sum() / size, 0.01)
        chosen = np.flatnonzero(valid)
        chosen = chosen[spacing.accept(cx[chosen], cy[chosen], n - len(accepted_x))]
        accepted_x += cx[chosen].tolist()
        accepted_y += cy[chosen].tolist()
    if len(accepted_x) < n:
        raise InputError(f"found only {len(accepted_x)} of {n} valid locations; lower --min-spacing or N")
    x, y = np.array(accepted_x), np.array(accepted_y)
    ids = np.array([f"random-{seed}-{i}" for i in range(n)], dtype=object)
    return Points(ids, x, y, *lonlat(x, y, grid.crs), np.full(n, np.nan), "", f"random(seed={seed})")


class Spacing:
    """Minimum spacing between accepted points, through scipy's cKDTree over the points accepted so far."""

    def __init__(self, spacing: float) -> None:
        self.spacing = spacing
        self.points = np.empty((0, 2))
        self.tree: cKDTree | None = None

    def free(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each point is at least `spacing` from every accepted one (candidates are pre-filtered with
        it, so points that could never be accepted are not extracted)."""
        if self.spacing <= 0 or self.tree is None:
            return np.ones(len(x), dtype=bool)
        distance, _ = self.tree.query(np.column_stack([x, y]), distance_upper_bound=self.spacing)
        return distance >= self.spacing

    def accept(self, x: np.ndarray, y: np.ndarray, limit: int) -> np.ndarray:
        """Accept points in order while each is `spacing` from every accepted one, up to `limit`; their indices."""
        points = np.column_stack([x, y])
        free = self.free(x, y)
        close: list[list[int]] = [[] for _ in range(len(points))]
        if self.spacing > 0 and len(points):  # pairs closer than spacing (a ball's radius is inclusive)
            close = cKDTree(points).query_ball_point(points, r=np.nextafter(self.spacing, 0)).tolist()
        taken = np.zeros(len(points), dtype=bool)
        count = 0
        for i in np.flatnonzero(free):
            if count == limit:
                break
            taken[i] = not taken[close[i]].any()
            count += int(taken[i])
        self.points = np.concatenate([self.points, points[taken]])
        if self.spacing > 0 and len(self.points):
            self.tree = cKDTree(self.points)
        return np.flatnonzero(taken)


def open_sampleset(url: str) -> xr.Dataset:
    """Open a SampleSet lazily, with band and variable names as coordinates."""
    ds = open_store(url, lambda store: xr.open_zarr(store, consolidated=False, zarr_format=3),
                    "no SampleSet here; create one with `geosoc sample`")
    return with_axis_names(ds)


def samples_url(root: str, kind: str) -> str:
    return join(root, "samples", f"{kind}.zarr")
