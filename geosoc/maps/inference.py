"""Maps: the fine-tuned model applied to every cell of an output grid, window by window, on any device.

An output cell is predicted from the cube patch centred on it (the pixel under its centre, exactly as a soil
sample at that place is cut by `sampling`) and the climate series of its climate cell. Work is split into
windows aligned with the output store's chunks. Each window reads its cube block once, plus the halo its
patches need, moves it to the device, normalises it there, and cuts every patch as a view of it
(`Tensor.unfold`: no per-cell Python, no per-cell reads); patches go through the network in large batches.

The output store is written like the cube (`geosoc.io.progress`): a metadata-only template, one writer per
window, a marker per finished window, so a run killed at any moment resumes without redoing finished
windows, and a retried window is rewritten whole with the same numbers.

The model side is `maps.predictor`, a window's reads and its read-predict-write pipeline `maps.windows`, the Ray
engine `maps.ray_engine`, the dry-run plan `maps.plan`; this module is the map store and the API.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
from tqdm.auto import tqdm

from geosoc.catalog import Catalog, PredictConfig, parse_catalog
from geosoc.data.cube import group_grid, open_cube
from geosoc.errors import IncompleteError, InputError, NotFoundError, UnwritableError
from geosoc.grid import Grid, Window
from geosoc.io.bars import progress_bar
from geosoc.io.locks import Lease, exclusive
from geosoc.io.progress import Markers, complete, new_build, resumable, template_written
from geosoc.io.storage import filesystem, join, open_store, read_group_attrs, zarr_store
from geosoc.learn import checkpoint
from geosoc.learn.device import gpu_share_problem, host_memory_bytes, resolve_device
from geosoc.learn.models import NetworkConfig
from geosoc.maps.chunks import ReadCount
from geosoc.maps.outputs import KRIGED_RESIDUAL, long_name, model_outputs, output_names
from geosoc.maps.predictor import DEFAULT_BATCH, load_predictor, require_map_model
from geosoc.maps.windows import (
    IN_FLIGHT,
    CubeAccess,
    MapSpec,
    RaySizing,
    WindowPipeline,
    check_compatible,
    predict_window,
    read_window,
)

log = logging.getLogger(__name__)

MAP_NAME = "soc.zarr"
WINDOW_BYTES = 256 * 2**20  # imagery read per window (sets the default output chunk); memory ~ this x workers
# Of this machine's memory, what a map's windows in flight (or one batch of cells) may fill: the model, the rest of
# the process and the system keep the other half. A --chunk or --batch-size beyond it is refused before any work.
MEMORY_SHARE = 0.5

Engine = Literal["local", "ray"]


# ------------------------------------------------------------------------------------------------ the store


def _catalog_of(tree: xr.DataTree) -> Catalog | None:
    text = tree.attrs.get("catalog")
    return parse_catalog(text) if text else None


def output_grid(cube_grid: Grid, resolution: float, bands: int, patch: int,
                bounds: tuple[float, float, float, float] | None = None, chunk: int | None = None,
                outputs: int = len(output_names(NetworkConfig().quantiles))) -> Grid:
    """The map's grid: `resolution` cells over the cube (or `bounds`), chunked so a window reads ~WINDOW_BYTES
    (or `chunk` cells a side, within what this machine's memory holds for a map of `outputs` variables)."""
    if not (_finite(resolution) and resolution > 0):
        raise InputError(f"--resolution must be a finite number > 0 (the output cell size, in the units of the "
                         f"region's CRS), got {resolution}")
    if resolution < cube_grid.resolution:
        raise InputError(f"output resolution {resolution:g} is finer than the cube's {cube_grid.resolution:g}; "
                         "choose a resolution at least as coarse as the cube's")
    area = cube_grid.bounds
    if bounds is not None:
        xmin, ymin, xmax, ymax = bounds
        area = (max(xmin, area[0]), max(ymin, area[1]), min(xmax, area[2]), min(ymax, area[3]))
        if not (area[0] < area[2] and area[1] < area[3]):
            raise InputError(f"bounds {list(bounds)} do not overlap the cube ({list(cube_grid.bounds)})")
    if chunk is None:
        side_px = math.sqrt(WINDOW_BYTES / (4 * max(bands, 1))) - patch
        chunk = max(16, int(side_px * cube_grid.resolution / resolution))
        return Grid.from_bounds(cube_grid.crs, area, resolution, chunk)
    if not _whole(chunk) or chunk < 1:
        raise InputError(f"--chunk must be a whole number of output cells of at least 1, got {chunk!r}")
    grid = Grid.from_bounds(cube_grid.crs, area, resolution, 1)
    sizing = WindowMemory(grid.shape, resolution / cube_grid.resolution, bands, patch, outputs)
    memory = map_memory()
    if IN_FLIGHT * sizing.bytes(chunk) > memory:
        raise InputError(f"--chunk {chunk}: at most {sizing.largest(memory // IN_FLIGHT):,} cells a side on this "
                         f"machine ({IN_FLIGHT} windows at once, each holding its imagery block with the patches' halo "
                         f"and a whole Zarr chunk of each of the {outputs} map variables, in {_gib(memory)}: "
                         f"{MEMORY_SHARE:.0%} of its memory)")
    return Grid.from_bounds(cube_grid.crs, area, resolution, chunk)


@dataclass(frozen=True)
class WindowMemory:
    """What one window of a map holds in memory, by its side in output cells: the imagery block its cells' patches
    read (`ratio` cube pixels per output cell, plus the halo of a patch), and one Zarr chunk of every output
    variable (Zarr builds a whole chunk in memory to write one, even at the map's edge)."""

    shape: tuple[int, int]  # the map's cells: a window is never larger
    ratio: float
    bands: int
    patch: int
    outputs: int

    def bytes(self, side: int) -> int:
        rows, cols = (min(side, n) * self.ratio + self.patch for n in self.shape)
        return int(4 * (rows * cols * self.bands + side * side * self.outputs))

    def largest(self, budget: int) -> int:
        """The largest side whose window fits `budget` bytes (at least 1)."""
        low, high = 1, 2
        while self.bytes(high) <= budget:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.bytes(middle) <= budget else (low, middle)
        return low


def map_memory() -> int:
    return int(host_memory_bytes() * MEMORY_SHARE)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def check_batch_size(batch_size: int, bands: int, patch: int) -> None:
    """A batch's patches alone (`bands` x `patch` x `patch` float32 per cell) must fit this machine's memory."""
    if not _whole(batch_size) or batch_size < 1:
        raise InputError(f"--batch-size must be a whole number of cells of at least 1, got {batch_size!r}")
    per_cell = 4 * max(bands, 1) * patch * patch
    memory = map_memory()
    if batch_size * per_cell > memory:
        raise InputError(f"--batch-size {batch_size}: at most {memory // per_cell:,} cells on this machine (their "
                         f"patches alone, {max(bands, 1)} bands of {patch} x {patch} px in float32, in {_gib(memory)}: "
                         f"{MEMORY_SHARE:.0%} of its memory)")



def _template(spec: MapSpec, outputs: list[str], units: str, attrs: dict[str, Any]) -> xr.Dataset:
    """The map's variables, lazily, with CF attributes: x/y as projection coordinates, and `spatial_ref` (the
    CRS) named by every variable's `grid_mapping`, so xarray (`decode_coords="all"`), rioxarray and GDAL read
    the CRS."""
    grid = spec.grid
    coords = {"y": ("y", grid.y), "x": ("x", grid.x)}
    data = {}
    for name in outputs:
        lazy = da.zeros(grid.shape, chunks=grid.chunks, dtype=np.float32)
        meta = {"long_name": long_name(name)}
        if name.startswith("soc_"):
            meta["units"] = "1" if name == KRIGED_RESIDUAL else units  # a log1p difference: a log of a ratio
        data[name] = (("y", "x"), lazy, meta)
    ds = xr.Dataset(data, coords=coords).rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    ds = ds.rio.write_coordinate_system()
    ds.attrs.update(attrs)
    return ds


def open_map(url: str) -> xr.Dataset:
    """A written map, lazily (dask), with its CRS."""
    ds = open_store(url, lambda store: xr.open_zarr(store, consolidated=False, zarr_format=3),
                    "no map here; make one with `geosoc predict`")
    if ds.attrs.get("geosoc_status") != "complete":
        log.warning("%s is not complete: windows not yet written read as NaN; run predict again", url)
    return ds.set_coords("spatial_ref") if "spatial_ref" in ds.data_vars else ds


def _run_local(pipeline: WindowPipeline, windows: list[Window], bar: tqdm) -> None:
    """IN_FLIGHT windows at once on threads of this process (memory: IN_FLIGHT windows)."""
    with ThreadPoolExecutor(max_workers=IN_FLIGHT) as pool:
        running: set[Future[str]] = set()
        try:
            for window in [*windows, None]:
                while running and (window is None or len(running) >= IN_FLIGHT):
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        future.result()
                        bar.update(1)
                if window is not None:
                    running.add(pool.submit(pipeline.run, window))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


# ------------------------------------------------------------------------------------------------ the API


def _resolve(cube: str | xr.DataTree, model: str | None) -> tuple[str, xr.DataTree, str]:
    """The cube's URL and tree, and the model's URL: `model` as given (a URL or path), a name under the region's
    models/ (`finetune`, `qrf`, ...), or by default the catalog's `predict.model` (`finetune`)."""
    tree = open_cube(cube) if isinstance(cube, str) else cube
    url = cube if isinstance(cube, str) else tree.encoding.get("source")
    if url is None:
        raise InputError("this cube was not opened with geosoc.open_cube: pass its URL instead")
    root = url.rstrip("/").rsplit("/", 1)[0]
    catalog = _catalog_of(tree)
    model = model_url(root, model or (catalog.predict.model if catalog is not None else "finetune"))
    if not checkpoint.is_checkpoint(model):
        raise NotFoundError(f"{model}: no model here; make it with {how_to_make(model)} or pass a model URL")
    return url, tree, model


def model_url(root: str, model: str) -> str:
    """`model` itself when it is a URL or a path, else the model of that name under the region's models/."""
    return model if "/" in model or ":" in model else join(root, "models", model)


def how_to_make(model: str) -> str:
    name = model.rstrip("/").rsplit("/", 1)[-1]
    from geosoc.maps.tabular import fits

    return f"`geosoc fit-tabular --model {name}`" if fits(name) else "`geosoc finetune`"


def map_spec(cube: str | xr.DataTree, model: str | None = None, *, resolution: float | None = None,
             bounds: tuple[float, float, float, float] | None = None, chunk: int | None = None,
             batch_size: int = DEFAULT_BATCH) -> MapSpec:
    """The output grid and windows of a map, from the cube and the model's config; reads no pixels."""
    url, tree, model = _resolve(cube, model)
    catalog = _catalog_of(tree)
    predict_config = catalog.predict if catalog is not None else PredictConfig()
    resolution = resolution if resolution is not None else predict_config.resolution
    config, meta = checkpoint.load_config(model)
    imagery = tree["imagery"].to_dataset()
    cube_grid = group_grid(imagery)
    patch = config.patch_size if config.bands else 1
    bands = imagery.sizes["band"]
    outputs = len(model_outputs(config.quantiles, meta))
    grid = output_grid(cube_grid, resolution, bands, patch, bounds, chunk, outputs)
    check_batch_size(batch_size, bands, patch)
    region = catalog.region.name if catalog is not None else ""
    period = (str(catalog.imagery.period[0]), str(catalog.imagery.period[1])) if catalog is not None else None
    depth = (catalog.sampling.depth or "") if catalog is not None else ""
    return MapSpec(url, model, grid, batch_size, region, period, depth)


def predict(cube: str | xr.DataTree, model: str | None = None, *, resolution: float | None = None,
            bounds: tuple[float, float, float, float] | None = None, out: str | None = None,
            engine: Engine = "local", batch_size: int = DEFAULT_BATCH, chunk: int | None = None,
            device: str | None = None, max_actors: int | None = None, gpus_per_actor: float | None = None,
            cpus_per_actor: float | None = None, max_retries: int = 3, fresh: bool = False,
            progress: bool = True) -> xr.Dataset:
    """SOC map of a cube: `soc_median` (the median), `soc_qXX` (calibrated interval bounds), `aoa` and `di`.

    `cube` is a URL or a tree from `geosoc.open_cube`; `model=None` uses `<root>/models/finetune` beside the
    cube. Without `out` the result is lazy (dask: each window is computed when asked for). With `out` the
    map is written there as Zarr, by this process (`engine="local"`) or by up to `max_actors` Ray actors
    (`engine="ray"`; actors the cluster cannot hold yet join as it grows), resumably; the opened store is returned.
    """
    sizing = RaySizing(max_actors, gpus_per_actor, cpus_per_actor)
    spec = _checked_spec(cube, model, resolution, bounds, chunk, batch_size, engine, device, sizing, max_retries)
    if out is None:
        if engine != "local":
            raise InputError("engine='ray' writes the map from several processes: give out=URL")
        return _lazy(spec, device)
    build(spec, out, engine=engine, device=device, sizing=sizing, max_retries=max_retries, fresh=fresh,
          progress=progress)
    return open_map(out)


def _checked_spec(cube: str | xr.DataTree, model: str | None, resolution: float | None,
                  bounds: tuple[float, float, float, float] | None, chunk: int | None, batch_size: int,
                  engine: str, device: str | None, sizing: RaySizing, max_retries: int) -> MapSpec:
    """The map's spec, after every argument of `predict` is checked: a bad one is one error naming it, before
    anything is written."""
    check_engine(engine)
    if device is not None:
        resolve_device(device)  # a device this machine does not have: one error naming those it has
    check_ray_sizing(sizing, max_retries)
    return map_spec(cube, model, resolution=resolution, bounds=bounds, chunk=chunk, batch_size=batch_size)


ENGINES = ("local", "ray")
MAX_RETRIES = 1000  # restarts of a dead actor and retries of a window: beyond this a map has a problem to fix


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise InputError(f"--engine must be 'local' or 'ray', got {engine!r}")


def check_ray_sizing(sizing: RaySizing, max_retries: int) -> None:
    """What a Ray map asks of the cluster, in the ranges Ray accepts."""
    if sizing.max_actors is not None and (not _whole(sizing.max_actors) or sizing.max_actors < 1):
        raise InputError(f"--max-actors must be a whole number of at least 1, got {sizing.max_actors!r}")
    gpus = sizing.gpus_per_actor
    if gpus is not None:
        problem = gpu_share_problem(gpus) if _finite(gpus) else f"must be a finite number, got {gpus!r}"
        if problem is not None:
            raise InputError(f"--gpus-per-actor {problem}")
    cpus = sizing.cpus_per_actor
    if cpus is not None and not (_finite(cpus) and cpus > 0):
        raise InputError(f"--cpus-per-actor must be a finite number > 0, got {cpus}")
    if not _whole(max_retries) or not 0 <= max_retries <= MAX_RETRIES:
        raise InputError(f"--max-retries must be a whole number from 0 to {MAX_RETRIES}, got {max_retries!r}")


def _lazy(spec: MapSpec, device: str | None) -> xr.Dataset:
    predictor = load_predictor(spec.model, device, spec.batch_size)
    cube = CubeAccess.open(spec.cube)
    check_compatible(predictor.config, cube, spec.model, predictor.meta)
    # dask runs the windows about row by row: a cache the size `maps.reads` gives that order, not the default's
    cube = cube.with_capacity(cube.reads(spec.grid, predictor).order(list(spec.grid.windows()), IN_FLIGHT)[2])

    def compute(window: Window) -> dict[str, np.ndarray]:
        return predict_window(predictor, read_window(cube, spec.grid, window, predictor))

    token = uuid.uuid4().hex
    rows: dict[int, list[tuple[Window, Any]]] = {}
    for w in spec.grid.windows():  # row-major: one delayed task per window, shared by every variable
        rows.setdefault(w.index[0], []).append((w, dask.delayed(compute, pure=True)(
            w, dask_key_name=f"geosoc-predict-{token}-{w.key}")))
    arrays = {
        name: da.block([[da.from_delayed(task[name], w.shape, dtype=np.float32) for w, task in row]
                        for row in rows.values()])
        for name in predictor.outputs
    }
    template = _template(spec, predictor.outputs, predictor.meta.get("units", ""), {"region": spec.region})
    return template.copy(data={name: arrays[name] for name in predictor.outputs})


def build(spec: MapSpec, out: str, *, engine: Engine = "local", device: str | None = None,
          sizing: RaySizing | None = None, max_retries: int = 3, fresh: bool = False, progress: bool = True) -> str:
    """Write (or finish writing) the map of `spec` at `out`; windows already written are not redone."""
    with exclusive(out, "predict") as lease:  # also the check, before any work, that the output's folder takes writes
        return _build(spec, out, engine, device, sizing or RaySizing(), max_retries, fresh, progress, lease)


def _build(spec: MapSpec, out: str, engine: Engine, device: str | None, sizing: RaySizing, max_retries: int,
           fresh: bool, progress: bool, lease: Lease) -> str:
    cube_attrs = read_group_attrs(spec.cube) or {}
    fingerprint = spec.fingerprint(checkpoint.config_bytes(spec.model), str(cube_attrs.get("geosoc_build_id", "")))
    attrs = resumable(out, fingerprint, "holds a map of another model, cube, grid or map layout; pass --fresh "
                                        "(fresh=True) to replace it, or choose another output", fresh)
    if attrs is not None and attrs.get("geosoc_status") == "complete":
        log.info("%s is already complete", out)
        return out
    # Loaded once, before anything is written (a damaged checkpoint fails here): on the device of the local
    # engine, which then uses it; on the CPU, only as that check, for the Ray actors.
    predictor = load_predictor(spec.model, device if engine == "local" else "cpu", spec.batch_size)
    if attrs is None:
        attrs = _write_store_template(spec, out, fingerprint)
    markers = Markers(out, attrs["geosoc_build_id"])
    done = markers.completed()
    todo = [w for w in spec.grid.windows() if w.key not in done]
    cube = CubeAccess.open(spec.cube)
    reads = cube.reads(spec.grid, predictor)
    ordered, strip, capacity = reads.order(todo, IN_FLIGHT)  # strips whose chunks a process's cache holds
    cube = cube.with_capacity(capacity)
    decoded = ReadCount()
    with progress_bar(total=spec.grid.n_chunks, initial=spec.grid.n_chunks - len(todo), desc="predict", unit="window",
              disable=not progress) as bar:
        if todo and engine == "ray":
            from geosoc.maps.ray_engine import run_on_ray

            decoded = run_on_ray(spec, ordered, out, attrs["geosoc_build_id"], bar, sizing, max_retries, cube,
                                 reads, strip + IN_FLIGHT)
        elif todo:
            pipeline = WindowPipeline(spec, out, attrs["geosoc_build_id"], predictor, cube)
            _run_local(pipeline, ordered, bar)
            decoded = pipeline.decoded
    done = markers.completed()
    missing = [w.key for w in spec.grid.windows() if w.key not in done]
    if missing:
        raise IncompleteError(f"{out}: windows still missing after the run: {missing[:10]}; run predict again")
    lease.check()  # a run that lost its lock meanwhile must not mark another's writes complete
    complete(out, {"geosoc_windows": spec.grid.n_chunks, "geosoc_reads": _reads_record(decoded, todo, strip,
                                                                                         capacity)})
    return out


def _reads_record(decoded: ReadCount, windows: list[Window], strip: int, capacity: int) -> dict[str, int]:
    """What this run decoded from the cube (the map's `geosoc_reads` attr), said in the log too."""
    cells = sum(w.shape[0] * w.shape[1] for w in windows)
    log.info("read %s of decoded cube chunks (%d chunks) for %d windows, %s a cell; windows in strips %d wide, "
             "each process keeping up to %s of chunks", _mib(decoded.bytes), decoded.chunks, len(windows),
             _kib(decoded.bytes / max(cells, 1)), strip, _mib(capacity))
    return {"decoded_bytes": decoded.bytes, "decoded_chunks": decoded.chunks, "windows": len(windows), "cells": cells,
            "strip": strip, "cache_bytes": capacity}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _kib(n: float) -> str:
    return f"{n / 2**10:,.1f} KiB"


def _write_store_template(spec: MapSpec, out: str, fingerprint: str) -> dict[str, Any]:
    """Metadata only, from the checkpoint's config (the weights are not loaded here); the root's
    `geosoc_template_complete` flag is written last."""
    config, meta = checkpoint.load_config(spec.model)
    require_map_model(spec.model, meta)
    check_compatible(config, CubeAccess.open(spec.cube), spec.model, meta)
    reference = checkpoint.load_aoa(spec.model)
    attrs = new_build(out, fingerprint, "writing", region=spec.region, cube=spec.cube, model=spec.model,
                      period=list(spec.period or []), depth=spec.depth, **source_attribution(spec.cube),
                      calibration=json.dumps(checkpoint.calibration_of(meta)),
                      aoa_threshold=reference.threshold if reference is not None else None)
    outputs = model_outputs(config.quantiles, meta)
    _template(spec, outputs, meta.get("units", ""), attrs).to_zarr(
        zarr_store(out), mode="w", compute=False, zarr_format=3, consolidated=False,
        encoding={name: {"chunks": spec.grid.chunks, "grid_mapping": "spatial_ref"} for name in outputs})
    return template_written(out, attrs)


def source_attribution(cube: str) -> dict[str, Any]:
    """The attribution texts the licences of the cube's sources require (e.g. the AlphaEarth embeddings'),
    carried into the map's attributes, and from there into its COGs and STAC item."""
    texts = (read_group_attrs(cube) or {}).get("attribution")
    return {"attribution": [str(text) for text in texts]} if texts else {}


def map_region(catalog: Catalog, root: str, *, model: str | None = None, resolution: float | None = None,
               bounds: tuple[float, float, float, float] | None = None, engine: Engine = "local",
               batch_size: int = DEFAULT_BATCH, chunk: int | None = None, device: str | None = None,
               max_actors: int | None = None, gpus_per_actor: float | None = None,
               cpus_per_actor: float | None = None, max_retries: int = 3, fresh: bool = False, export: bool = True,
               progress: bool = True) -> dict[str, str]:
    """`geosoc predict` and `jobs/predict.py`: the region's map under `<root>/maps/` and its exports."""
    from geosoc.maps.export import export_maps, exported_files

    folder = join(root, "maps")
    out = join(folder, MAP_NAME)
    sizing = RaySizing(max_actors or catalog.predict.max_actors, gpus_per_actor, cpus_per_actor)
    spec = _checked_spec(join(root, "cube.zarr"), model or catalog.predict.model,
                         resolution if resolution is not None else catalog.predict.resolution, bounds, chunk,
                         batch_size, engine, device, sizing, max_retries)
    if export:  # the exports' places are checked before the map is made, not after
        config, meta = checkpoint.load_config(spec.model)
        _refuse_folders_in_the_way(folder, exported_files(model_outputs(config.quantiles, meta)))
    build(spec, out, engine=engine, device=device, sizing=sizing, max_retries=max_retries, fresh=fresh,
          progress=progress)
    if not export:
        return {"zarr": out}
    return export_maps(open_map(out), folder, MAP_NAME)


def _refuse_folders_in_the_way(folder: str, files: list[str]) -> None:
    """A folder where one of `files` is to be written in `folder` is one error naming it."""
    fs, path = filesystem(folder)
    for name in files:
        if fs.isdir(f"{path.rstrip('/')}/{name}"):
            raise UnwritableError(f"{join(folder, name)}: a folder is in the way of the file geosoc predict writes "
                                  "there; move or remove it, or pass --no-export")
