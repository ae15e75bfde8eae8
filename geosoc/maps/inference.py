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
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr
from tqdm.auto import tqdm

from geosoc.catalog import Catalog, PredictConfig, parse_catalog
from geosoc.data.cube import group_grid, open_cube
from geosoc.errors import IncompleteError, InputError, NotFoundError
from geosoc.grid import Grid, Window
from geosoc.io.locks import Lease, exclusive
from geosoc.io.progress import Markers, complete, new_build, resumable, template_written
from geosoc.io.bars import progress_bar
from geosoc.io.storage import join, open_store, read_group_attrs, zarr_store
from geosoc.learn import checkpoint
from geosoc.maps.outputs import long_name, output_names
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

Engine = Literal["local", "ray"]


# ------------------------------------------------------------------------------------------------ the store


def _catalog_of(tree: xr.DataTree) -> Catalog | None:
    text = tree.attrs.get("catalog")
    return parse_catalog(text) if text else None


def output_grid(cube_grid: Grid, resolution: float, bands: int, patch: int,
                bounds: tuple[float, float, float, float] | None = None, chunk: int | None = None) -> Grid:
    """The map's grid: `resolution` cells over the cube (or `bounds`), chunked so a window reads ~WINDOW_BYTES."""
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
            meta["units"] = units
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
    from geosoc.maps.tabular import MAP_MODELS

    return f"`geosoc fit-tabular --model {name}`" if name in MAP_MODELS else "`geosoc finetune`"


def map_spec(cube: str | xr.DataTree, model: str | None = None, *, resolution: float | None = None,
             bounds: tuple[float, float, float, float] | None = None, chunk: int | None = None,
             batch_size: int = DEFAULT_BATCH) -> MapSpec:
    """The output grid and windows of a map, from the cube and the model's config; reads no pixels."""
    url, tree, model = _resolve(cube, model)
    catalog = _catalog_of(tree)
    predict_config = catalog.predict if catalog is not None else PredictConfig()
    resolution = resolution or predict_config.resolution
    config = checkpoint.load_config(model)[0]
    imagery = tree["imagery"].to_dataset()
    cube_grid = group_grid(imagery)
    patch = config.patch_size if config.bands else 1
    bands = imagery.sizes["band"]
    grid = output_grid(cube_grid, resolution, bands, patch, bounds, chunk)
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
    spec = map_spec(cube, model, resolution=resolution, bounds=bounds, chunk=chunk, batch_size=batch_size)
    if out is None:
        if engine != "local":
            raise InputError("engine='ray' writes the map from several processes: give out=URL")
        return _lazy(spec, device)
    build(spec, out, engine=engine, device=device, sizing=RaySizing(max_actors, gpus_per_actor, cpus_per_actor),
          max_retries=max_retries, fresh=fresh, progress=progress)
    return open_map(out)


def _lazy(spec: MapSpec, device: str | None) -> xr.Dataset:
    predictor = load_predictor(spec.model, device, spec.batch_size)
    cube = CubeAccess.open(spec.cube)
    check_compatible(predictor.config, cube, spec.model, predictor.meta)

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
    with progress_bar(total=spec.grid.n_chunks, initial=spec.grid.n_chunks - len(todo), desc="predict", unit="window",
              disable=not progress) as bar:
        if todo and engine == "ray":
            from geosoc.maps.ray_engine import run_on_ray

            run_on_ray(spec, todo, out, attrs["geosoc_build_id"], bar, sizing, max_retries)
        elif todo:
            _run_local(WindowPipeline(spec, out, attrs["geosoc_build_id"], predictor), todo, bar)
    done = markers.completed()
    missing = [w.key for w in spec.grid.windows() if w.key not in done]
    if missing:
        raise IncompleteError(f"{out}: windows still missing after the run: {missing[:10]}; run predict again")
    lease.check()  # a run that lost its lock meanwhile must not mark another's writes complete
    complete(out, {"geosoc_windows": spec.grid.n_chunks})
    return out


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
    outputs = output_names(config.quantiles)
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
    from geosoc.maps.export import export_maps

    cube = join(root, "cube.zarr")
    out = join(root, "maps", MAP_NAME)
    ds = predict(cube, model or catalog.predict.model, resolution=resolution or catalog.predict.resolution,
                 bounds=bounds, out=out,
                 engine=engine, batch_size=batch_size, chunk=chunk, device=device,
                 max_actors=max_actors or catalog.predict.max_actors, gpus_per_actor=gpus_per_actor,
                 cpus_per_actor=cpus_per_actor, max_retries=max_retries, fresh=fresh, progress=progress)
    if not export:
        return {"zarr": out}
    return export_maps(ds, join(root, "maps"), MAP_NAME)
