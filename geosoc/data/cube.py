"""Assemble a region's sources into a Zarr v3 cube, chunk by chunk, resumably; open cubes lazily.

Layout (docs/architecture.md): groups `imagery` (band, y, x), `climate` (time, variable, y, x) and `embeddings`
(band, y, x), each with one `data` variable on the region's CRS. The build follows the xarray-beam pattern: a
metadata-only template is written first, then every chunk is computed and written by exactly one task into its
own Zarr chunk, so parallel writers never share a chunk. After a chunk is written, a marker object is put beside
the cube (`cube.zarr.progress/<build id>/<group>/<iy>.<ix>`); a re-run skips chunks with a marker and so never
rewrites finished work, whatever moment the previous run was killed at. Markers live outside the Zarr hierarchy
(zarr warns about foreign objects inside it); when every chunk is marked, the root attrs record the status and a
per-group count of chunks, and the markers are removed.

A layer masked by `region.mask` says which chunks may hold a pixel inside it (`MaskedReader.chunks_inside`): the
others (a chunk wholly at sea) are never requested nor written, and read as the fill value, NaN. The plan counts
only what is sent and says what the mask saves; the completion record counts the chunks left outside.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dask
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
import zarr

from geosoc.catalog import LoadedCatalog, load_catalog
from geosoc.errors import IncompleteError
from geosoc.fingerprints import fingerprint
from geosoc.grid import Grid, Window
from geosoc.io.bars import progress_bar
from geosoc.io.locks import Lease, exclusive
from geosoc.io.progress import Markers, complete, new_build, resumable, run_tasks, template_written
from geosoc.io.storage import check_writable, default_root, join, open_store, zarr_store
from geosoc.sources.from_catalog import open_layers
from geosoc.sources.layers import Layer, WindowReader

log = logging.getLogger(__name__)

CUBE_NAME = "cube.zarr"
_NAMES_ATTR = "names"


@dataclass(frozen=True)
class LayerPlan:
    group: str
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    chunks: int
    nbytes: int
    resolution: float
    requests: int | None = None  # remote requests (Earth Engine), None for local sources
    request_bytes: int | None = None  # largest request, mask bytes included
    concurrency: int | None = None
    seconds_per_request: float | None = None
    outside_chunks: int = 0  # wholly outside `region.mask`: neither requested nor written (not in `chunks`)
    requests_saved: int | None = None  # the requests those chunks would have cost

    @property
    def estimated_seconds(self) -> float | None:
        if self.requests is None or not self.concurrency or not self.seconds_per_request:
            return None
        return self.requests * self.seconds_per_request / self.concurrency


@dataclass(frozen=True)
class CubePlan:
    url: str
    crs: str
    layers: tuple[LayerPlan, ...]

    @property
    def chunks(self) -> int:
        return sum(layer.chunks for layer in self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def cube_url(catalog: LoadedCatalog, root: str | None = None) -> str:
    return join(root or default_root(catalog.config.region.name), CUBE_NAME)


def plan_cube(catalog: LoadedCatalog, root: str | None = None) -> CubePlan:
    """What a build would write (sizes and chunk counts), computed without reading or writing anything."""
    plans = tuple(_plan_layer(layer) for layer in open_layers(catalog, root))
    return CubePlan(cube_url(catalog, root), catalog.config.region.crs, plans)


def _plan_layer(layer: Layer) -> LayerPlan:
    """The chunks a build writes and the requests it sends: those inside the region's mask, if it has one."""
    grid = layer.grid
    outside = _outside(layer)
    if not outside:
        remote = layer.reader.plan() if hasattr(layer.reader, "plan") else {}
        return LayerPlan(layer.group, layer.shape, layer.chunk_shape, grid.n_chunks, layer.nbytes, grid.resolution,
                         **remote)
    windows = [window for window in grid.windows() if window.key not in outside]
    leading = int(np.prod(layer.chunk_shape[:-2], dtype=np.int64))
    nbytes = sum(leading * window.shape[0] * window.shape[1] * 4 for window in windows)
    remote = {}
    if hasattr(layer.reader, "plan"):
        remote = layer.reader.plan(windows)
        remote["requests_saved"] = layer.reader.plan()["requests"] - remote["requests"]
    return LayerPlan(layer.group, layer.shape, layer.chunk_shape, len(windows), nbytes, grid.resolution,
                     outside_chunks=len(outside), **remote)


def _outside(layer: Layer) -> set[str]:
    """Keys of the layer's chunks wholly outside `region.mask` (none without a mask)."""
    if not hasattr(layer.reader, "chunks_inside"):
        return set()
    inside = layer.reader.chunks_inside()
    return {window.key for window in layer.grid.windows() if not inside[window.index]}


def build_cube(
    catalog: LoadedCatalog | str,
    root: str | None = None,
    *,
    client: Any = None,
    workers: int | None = None,
    progress: bool = True,
    layers: list[Layer] | None = None,
) -> str:
    """Write (or finish writing) the region's cube under `root` and return its URL.

    `catalog` is a loaded catalog or a region name. Runs on Dask: threads (`workers`, default one per core)
    or the `dask.distributed` `client` given. Safe to interrupt at any moment and run again. `layers`
    replaces the catalog's sources (e.g. Earth Engine layers with an injected pixel fetcher).
    """
    if isinstance(catalog, str):
        catalog = load_catalog(catalog)
    root = root or default_root(catalog.config.region.name)
    check_writable(root)  # first: a root that cannot take writes is one line, before anything is written
    layers = layers if layers is not None else open_layers(catalog, root)
    url = cube_url(catalog, root)
    with exclusive(url, "build-cube") as lease:
        return _build(url, catalog, layers, client, workers, progress, lease)


def _build(url: str, catalog: LoadedCatalog, layers: list[Layer], client: Any, workers: int | None, progress: bool,
           lease: Lease) -> str:
    """The build under its lock: the cube at `url` checked first (another catalog's, damaged: refused before a
    source writes anything, e.g. the synthetic embedding's COGs), then the sources prepared (file lists,
    credentials), then the template and the chunks."""
    fingerprint = _fingerprint(catalog)
    attrs = resumable(url, fingerprint, "exists and was built from a different catalog or bounds; remove it or "
                                        "choose another --root")
    if attrs is not None and attrs.get("geosoc_status") == "complete":
        log.info("%s is already complete", url)
        return url
    for layer in layers:
        if hasattr(layer.reader, "prepare"):
            layer.reader.prepare()
    readers = {layer.group: layer.reader for layer in layers}
    if attrs is None:
        attrs = _write_template(url, catalog, layers, fingerprint)

    markers = Markers(url, attrs["geosoc_build_id"])
    done = markers.completed()
    outside = {layer.group: _outside(layer) for layer in layers}  # never requested nor written: they read as NaN
    todo = [
        (layer.group, window)
        for layer in layers
        for window in layer.grid.windows()
        if f"{layer.group}/{window.key}" not in done and window.key not in outside[layer.group]
    ]
    total = sum(layer.grid.n_chunks - len(outside[layer.group]) for layer in layers)
    tasks = [
        dask.delayed(_write_chunk, pure=False)(url, group, readers[group], window, markers)
        for group, window in todo
    ]
    with progress_bar(total=total, initial=total - len(todo), desc="build-cube", unit="chunk",
                      disable=not progress) as bar:
        run_tasks(tasks, client, workers, bar)
    lease.check()  # a run that lost its lock meanwhile must not mark another's writes complete
    _finish(url, layers, markers, outside)
    return url


def _write_chunk(url: str, group: str, reader: WindowReader, window: Window, markers: Markers) -> None:
    block = reader.read(window.rows, window.cols)
    _open_data_array(url, group, markers.build_id)[..., window.rows, window.cols] = block
    markers.mark(f"{group}/{window.key}")


@lru_cache(maxsize=16)
def _open_data_array(url: str, group: str, build: str) -> zarr.Array:
    """Opened once per process and build (the build id in `build` keeps a rebuilt cube from reusing it)."""
    return zarr.open_array(zarr_store(url), path=f"{group}/data", mode="r+", zarr_format=3)


def _fingerprint(catalog: LoadedCatalog) -> str:
    """What defines a cube's contents: the region and the imagery, climate and embeddings sections (not
    training). A catalog without embeddings keeps the fingerprint it had before the section existed."""
    config = catalog.config
    sections = {"region", "imagery", "climate"} | ({"embeddings"} if config.embeddings is not None else set())
    return fingerprint(config.model_dump_json(include=sections))


def _write_template(url: str, catalog: LoadedCatalog, layers: list[Layer], fingerprint: str) -> dict[str, Any]:
    """Metadata and coordinates only; the root's `geosoc_template_complete` flag is written last."""
    store = zarr_store(url)
    attribution = sorted({str(layer.attrs["attribution"]) for layer in layers if "attribution" in layer.attrs})
    extra = {"attribution": attribution} if attribution else {}  # what the sources' licences require
    attrs = new_build(url, fingerprint, "building", region=catalog.config.region.name, catalog=catalog.text,
                      **extra)
    zarr.open_group(store, mode="w", zarr_format=3, attributes=attrs)
    for layer in layers:
        _template_dataset(layer).to_zarr(
            store,
            group=layer.group,
            mode="a",
            compute=False,
            zarr_format=3,
            consolidated=False,
            encoding={"data": {"chunks": layer.chunk_shape}},
        )
    return template_written(url, attrs)


def axis_coordinate(axis: str, values: list[Any]) -> tuple[Any, ...]:
    """How cubes and SampleSets store a named axis: integer positions with the names in a `names` attribute
    (Zarr v3 has no specified string dtype); `time` stays datetime. `with_axis_names` reverses it."""
    if axis == "time":
        return (axis, np.array(values, dtype="datetime64[ns]"))
    return (axis, np.arange(len(values)), {_NAMES_ATTR: [str(v) for v in values]})


def with_axis_names(ds: xr.Dataset) -> xr.Dataset:
    """Opened cube group or SampleSet with string coordinates for its named axes (in memory only)."""
    named = {axis: ds[axis].attrs[_NAMES_ATTR] for axis in ds.coords if _NAMES_ATTR in ds[axis].attrs}
    return ds.assign_coords(named)


def _template_dataset(layer: Layer) -> xr.Dataset:
    """The layer as a Dataset of its coordinates and a lazy `data` variable that is never computed."""
    data = dask.array.zeros(layer.shape, chunks=layer.chunk_shape, dtype=np.float32)
    coords: dict[str, Any] = {"y": ("y", layer.grid.y), "x": ("x", layer.grid.x)}
    coords.update({axis: axis_coordinate(axis, values) for axis, values in layer.axes.items()})
    ds = xr.Dataset({"data": (layer.dims, data, dict(layer.attrs))}, coords=coords)
    ds = ds.rio.write_crs(layer.grid.crs).rio.write_transform(layer.grid.transform)
    ds["data"].attrs["grid_mapping"] = "spatial_ref"
    ds.attrs.update(group=layer.group, resolution=layer.grid.resolution)
    return ds


def _finish(url: str, layers: list[Layer], markers: Markers, outside: dict[str, set[str]]) -> None:
    """The completion record: per group, its chunks, those written and those outside the mask (never written)."""
    done = markers.completed()
    record = {
        layer.group: {
            "chunks": layer.grid.n_chunks,
            "complete": sum(1 for w in layer.grid.windows() if f"{layer.group}/{w.key}" in done),
            "outside_mask": len(outside[layer.group]),
        }
        for layer in layers
    }
    missing = {g: r for g, r in record.items() if r["complete"] + r["outside_mask"] != r["chunks"]}
    if missing:
        raise IncompleteError(f"{url}: chunks still missing after the build: {missing}; run the build again")
    complete(url, {"geosoc_chunks": record})


def open_cube(url: str) -> xr.DataTree:
    """Open a cube lazily: groups `imagery` and `climate`, dask-backed, axis names as coordinates."""
    tree = open_store(url, lambda store: xr.open_datatree(store,  # type: ignore[arg-type]  # the zarr engine
                                                          engine="zarr", consolidated=False, chunks={}),  # takes stores
                      "no cube here; build one with `geosoc build-cube`")
    status = tree.attrs.get("geosoc_status")
    if status != "complete":
        log.warning("%s is not complete (status %r): missing chunks read as NaN; re-run build-cube", url, status)
    for name, node in tree.children.items():
        ds = node.to_dataset()
        if "spatial_ref" in ds.data_vars:
            ds = ds.set_coords("spatial_ref")
        tree[name] = xr.DataTree(with_axis_names(ds))
    tree.encoding["source"] = url  # so that later steps (predict) can find the cube's store and region root
    return tree


def group_grid(ds: xr.Dataset) -> Grid:
    """The grid of an opened cube group (from its coordinates, resolution attr, CRS and dask chunks)."""
    resolution = float(ds.attrs["resolution"])
    chunks = ds["data"].data.chunksize[-2:]
    return Grid(
        ds["data"].rio.crs.to_string(),
        float(ds.x.values[0]) - resolution / 2,
        float(ds.y.values[0]) + resolution / 2,
        resolution,
        (ds.sizes["y"], ds.sizes["x"]),
        (int(chunks[0]), int(chunks[1])),
    )


def describe(tree: xr.DataTree) -> str:
    """A short human summary of an opened cube."""
    lines = [f"region {tree.attrs.get('region')}, status {tree.attrs.get('geosoc_status')}"]
    for name, node in tree.children.items():
        data = node.to_dataset()["data"]
        dims = ", ".join(f"{d}={n}" for d, n in data.sizes.items())
        lines.append(f"{name}: data({dims}) {data.nbytes / 2**20:,.1f} MiB, chunks {data.data.chunksize}")
    return "\n".join(lines)


def cube_summary(tree: xr.DataTree) -> dict[str, Any]:
    """Per-band min/mean/max and NaN share of the imagery (computed), for printing after a build."""
    ds = tree["imagery"].to_dataset()
    data = ds["data"]
    stats = xr.Dataset(
        {
            "min": data.min(("y", "x")),
            "mean": data.mean(("y", "x")),
            "max": data.max(("y", "x")),
            "nodata": data.isnull().mean(("y", "x")),
        }
    ).compute()
    return json.loads(stats.to_dataframe().to_json(orient="index"))


def cube_parts(cube_url: str) -> tuple[xr.Dataset, Grid, xr.Dataset | None, Grid | None]:
    """A cube's imagery and (if any) climate groups, each with its grid."""
    tree = open_cube(cube_url)
    imagery = tree["imagery"].to_dataset()
    climate = tree["climate"].to_dataset() if "climate" in tree.children else None
    return imagery, group_grid(imagery), climate, group_grid(climate) if climate is not None else None


def embeddings_part(cube_url: str) -> tuple[xr.Dataset, Grid] | None:
    """A cube's embeddings group and its grid, or None when the cube has none."""
    tree = open_cube(cube_url)
    if "embeddings" not in tree.children:
        return None
    ds = tree["embeddings"].to_dataset()
    return ds, group_grid(ds)
