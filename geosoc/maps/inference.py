"""Maps: the fine-tuned model applied to every cell of an output grid, window by window, on any device.

An output cell is predicted from the cube patch centred on it (the pixel under its centre, exactly as a soil
sample at that place is cut by `sampling`) and the climate series of its climate cell. Work is split into
windows aligned with the output store's chunks. Each window reads its cube block once, plus the halo its
patches need, moves it to the device, normalises it there, and cuts every patch as a view of it
(`Tensor.unfold`: no per-cell Python, no per-cell reads); patches go through the network in large batches.

The output store is written like the cube (`geosoc.io.progress`): a metadata-only template, one writer per
window, a marker per finished window, so a run killed at any moment resumes without redoing finished
windows, and a retried window is rewritten whole with the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm

from geosoc.catalog import Catalog, PredictConfig, parse_catalog
from geosoc.data.cube import cube_parts, group_grid, open_cube
from geosoc.data.sampling import climate_at, read_imagery
from geosoc.errors import IncompatibleError, IncompleteError, InputError, NotFoundError
from geosoc.fingerprints import fingerprint
from geosoc.grid import Grid, Window
from geosoc.io.locks import exclusive
from geosoc.io.progress import Markers, complete, new_build, resumable, template_written
from geosoc.io.storage import join, open_store, read_group_attrs, zarr_store
from geosoc.learn import checkpoint
from geosoc.learn.device import precision, resolve_device
from geosoc.learn.models import NetworkConfig
from geosoc.maps.outputs import long_name, output_names, quantile_name
from geosoc.maps.tabular import TabularPredictor, is_tabular
from geosoc.stats import aoa
from geosoc.stats.calibration import interval

log = logging.getLogger(__name__)

MAP_NAME = "soc.zarr"
MAP_LAYOUT = 2  # in the resume fingerprint: a map written with other variables (1: soc_mean) is not continued
WINDOW_BYTES = 256 * 2**20  # imagery read per window (sets the default output chunk); memory ~ this x workers
DEFAULT_BATCH = 1024
IN_FLIGHT = 3  # windows a process holds at once: one read ahead, one on the device, one being written
# geosoc.predict end to end, paper-size model, bf16, one H200 (measured 2026-11): the --dry-run default
GPU_CELLS_PER_S = 12_500

Engine = Literal["local", "ray"]


def load_predictor(model_url: str, device: torch.device | str | None = None,
                   batch_size: int = DEFAULT_BATCH) -> Predictor | TabularPredictor:
    """The predictor of a checkpoint: the network's, or a tree model's (`geosoc fit-tabular`)."""
    if is_tabular(checkpoint.load_config(model_url)[1]):
        return TabularPredictor(model_url, device)
    return Predictor(model_url, device, batch_size)


def _require_map_model(url: str, meta: dict[str, Any]) -> None:
    """A map needs a fine-tuned network or a tree model (whose checkpoints before 0.1 said "finetune" too)."""
    if meta.get("stage") != "finetune" and not is_tabular(meta):
        raise IncompatibleError(f"{url}: a {meta.get('stage')!r} checkpoint has no regression head; "
                                "predict needs a fine-tuned model (`geosoc finetune`)")


@dataclass(frozen=True)
class MapSpec:
    """What a map is: the cube and model it comes from and its output grid (picklable, for Ray actors)."""

    cube: str
    model: str
    grid: Grid
    batch_size: int = DEFAULT_BATCH
    region: str = ""
    period: tuple[str, str] | None = None  # the imagery's dates, for the STAC item

    def fingerprint(self, model_config: bytes, cube_build: str) -> str:
        text = json.dumps([MAP_LAYOUT, self.cube, cube_build, self.model, model_config.decode(), self.grid.crs,
                           self.grid.x0, self.grid.y0, self.grid.resolution, self.grid.shape, self.grid.chunks])
        return fingerprint(text)


@dataclass(frozen=True)
class RaySizing:
    """What a Ray map asks the cluster for: up to `max_actors` actors of `gpus_per_actor` GPUs and
    `cpus_per_actor` CPUs (None: see `geosoc.maps.ray_engine.actor_shape`)."""

    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None


@dataclass(frozen=True)
class MapPlan:
    spec: MapSpec
    cube_grid: Grid
    bands: int
    patch: int

    @property
    def cells(self) -> int:
        return self.spec.grid.height * self.spec.grid.width

    @property
    def windows(self) -> int:
        return self.spec.grid.n_chunks

    @property
    def window_bytes(self) -> int:
        """Imagery read for one full window, halo included."""
        cy, cx = self.spec.grid.chunks
        ratio = self.spec.grid.resolution / self.cube_grid.resolution
        return int((cy * ratio + self.patch) * (cx * ratio + self.patch) * self.bands * 4)

    def seconds(self, cells_per_s: float) -> float:
        return self.cells / cells_per_s


# ------------------------------------------------------------------------------------------------ the predictor


class Predictor:
    """A fine-tuned checkpoint loaded once on a device: normalisation, calibration and AOA reference with it."""

    def __init__(self, model_url: str, device: torch.device | str | None = None,
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.device = resolve_device(device)
        self.model, meta = checkpoint.load_model(model_url, self.device)
        _require_map_model(model_url, meta)
        self.meta = meta
        self.norm = checkpoint.normalisation(model_url, meta)
        self.config = self.model.config
        self.batch_size = batch_size
        self.offset = checkpoint.offset_of(meta)
        reference = checkpoint.load_aoa(model_url)
        if reference is None:
            log.warning("%s has no area-of-applicability reference (fine-tuned before geosoc had one): aoa and di "
                        "are NaN; fine-tune again to get them", model_url)
        self.scorer = aoa.Scorer(reference, self.device) if reference is not None else None
        self.uses_patches = bool(self.config.bands)
        self.uses_climate = bool(self.config.variables)
        self.patch = self.config.patch_size if self.uses_patches else 1
        self.outputs = output_names(self.config.quantiles)
        self._autocast = precision(self.device)

    def predict(self, block: np.ndarray, top: np.ndarray, left: np.ndarray,
                climate: np.ndarray | None) -> dict[str, np.ndarray]:
        """Outputs for cells whose patches start at (top, left) of the imagery `block` (band, h, w).

        Cells whose centre pixel has no data get NaN. `climate` is (cells, time, variable) when the model uses it.
        """
        n = len(top)
        out = {name: np.full(n, np.nan, dtype=np.float32) for name in self.outputs}
        if n == 0:
            return out
        half = self.patch // 2
        window = torch.from_numpy(block).to(self.device)
        has_data = ~torch.isnan(window).any(dim=0)
        top_t = torch.from_numpy(top).to(self.device)
        left_t = torch.from_numpy(left).to(self.device)
        valid = has_data[top_t + half, left_t + half]
        cells = torch.nonzero(valid).flatten()
        if len(cells) == 0:
            return out
        raw = {"patch": window} if self.uses_patches else {}
        if self.uses_climate and climate is not None:
            raw["climate"] = torch.from_numpy(climate).to(self.device)
        normalised = self.norm.apply(raw)  # the whole window at once, on the device
        if self.uses_patches:  # every cell's patch as a view of the window: (band, rows, cols, p, p)
            patches = normalised["patch"].unfold(1, self.patch, 1).unfold(2, self.patch, 1)
        series = normalised.get("climate")
        results: dict[str, list[torch.Tensor]] = {name: [] for name in self.outputs}
        with torch.no_grad(), self._autocast:
            for start in range(0, len(cells), self.batch_size):
                chosen = cells[start : start + self.batch_size]
                inputs = {}
                if self.uses_patches:
                    inputs["patch"] = patches[:, top_t[chosen], left_t[chosen]].permute(1, 0, 2, 3)
                if series is not None:
                    inputs["climate"] = series[chosen]
                features = self.model.features(inputs).float()
                self._collect(results, self.model.quantiles_of(features).float(), features)
        for name, parts in results.items():
            out[name][valid.cpu().numpy()] = torch.cat(parts).cpu().numpy()
        return out

    def _collect(self, results: dict[str, list[torch.Tensor]], z: torch.Tensor, features: torch.Tensor) -> None:
        quantiles = self.config.quantiles
        lower, median, upper = interval(z, quantiles, self.offset)
        z = torch.cat([lower[:, None], z[:, 1:-1], upper[:, None]], dim=1) if z.shape[1] > 1 else z
        decoded = self.norm.decode_target(z)
        results["soc_median"].append(self.norm.decode_target(median))
        for i, q in enumerate(quantiles):
            if q != 0.5:
                results[quantile_name(q)].append(decoded[:, i])
        if self.scorer is not None:
            di = self.scorer.di(features)
            results["di"].append(di)
            results["aoa"].append(self.scorer.inside(di).float())
        else:
            nan = torch.full((len(z),), float("nan"), device=z.device)
            results["di"].append(nan)
            results["aoa"].append(nan)


# ------------------------------------------------------------------------------------------------ windows


@dataclass
class WindowInput:
    """What one window needs from the cube, read on the host (so the next can be read while one computes)."""

    window: Window
    block: np.ndarray
    top: np.ndarray
    left: np.ndarray
    climate: np.ndarray | None


@dataclass
class CubeAccess:
    """The cube's grids, opened once per process; reads go straight to its Zarr arrays."""

    url: str
    imagery: Grid
    climate: Grid | None
    bands: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, url: str) -> CubeAccess:
        imagery, grid, climate, climate_grid = cube_parts(url)
        variables = [str(v) for v in climate["variable"].values] if climate is not None else []
        return cls(url, grid, climate_grid, [str(b) for b in imagery["band"].values], variables)


def read_window(cube: CubeAccess, grid: Grid, window: Window, predictor: Predictor | TabularPredictor) -> WindowInput:
    """The imagery block under a window's cells plus the halo of their patches (the predictor's patch size),
    and their climate series when the predictor uses climate."""
    xs, ys = grid.x_of(np.arange(window.cols.start, window.cols.stop)), grid.y_of(np.arange(window.rows.start,
                                                                                          window.rows.stop))
    x, y = np.meshgrid(xs, ys)
    rows, cols = cube.imagery.rowcol(x.ravel(), y.ravel())
    patch = predictor.patch
    half = patch // 2
    r0, c0 = int(rows.min()) - half, int(cols.min()) - half
    block = read_imagery(cube.url, cube.imagery.shape, r0, int(rows.max()) - half + patch, c0,
                         int(cols.max()) - half + patch)
    series = None
    if predictor.uses_climate and cube.climate is not None:
        series = climate_at(cube.url, cube.climate, x.ravel(), y.ravel())
    return WindowInput(window, block, rows - half - r0, cols - half - c0, series)


def predict_window(predictor: Predictor | TabularPredictor, data: WindowInput) -> dict[str, np.ndarray]:
    """(h, w) arrays of every output of one window."""
    flat = predictor.predict(data.block, data.top, data.left, data.climate)
    return {name: values.reshape(data.window.shape) for name, values in flat.items()}


def _check_compatible(config: NetworkConfig, cube: CubeAccess, model_url: str) -> None:
    if config.bands and config.bands != cube.bands:
        raise IncompatibleError(f"{model_url} was trained on bands {config.bands}, but {cube.url} has {cube.bands}")
    if config.variables and config.variables != cube.variables:
        raise IncompatibleError(
            f"{model_url} was trained on climate variables {config.variables}, but {cube.url} has "
            f"{cube.variables or 'no climate'}"
        )


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


# ------------------------------------------------------------------------------------------------ engines


@lru_cache(maxsize=64)
def _output_array(url: str, name: str, build_id: str) -> zarr.Array:
    """Opened once per process and build (the build id keeps a replaced map from reusing it)."""
    return zarr.open_array(zarr_store(url), path=name, mode="r+", zarr_format=3)


class WindowPipeline:
    """One process's share of a map: windows read, computed and written on threads, so that reading the next
    window and writing the last overlap with the device computing this one (which computes one at a time)."""

    def __init__(self, spec: MapSpec, out: str, build_id: str, predictor: Predictor | TabularPredictor) -> None:
        self.spec, self.out, self.predictor = spec, out, predictor
        self.markers = Markers(out, build_id)
        self.cube = CubeAccess.open(spec.cube)
        self._device = threading.Lock()

    def run(self, window: Window) -> str:
        """Read, predict and write one window, then mark it done; safe to call from several threads."""
        data = read_window(self.cube, self.spec.grid, window, self.predictor)
        with self._device:
            values = predict_window(self.predictor, data)
        for name, array in values.items():
            _output_array(self.out, name, self.markers.build_id)[window.rows, window.cols] = array
        self.markers.mark(window.key)
        return window.key


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
    model = model or (catalog.predict.model if catalog is not None else "finetune")
    if "/" not in model and ":" not in model:
        model = join(root, "models", model)
    if not checkpoint.is_checkpoint(model):
        name = model.rstrip("/").rsplit("/", 1)[-1]
        how = f"`geosoc fit-tabular --model {name}`" if name in ("rf", "gbm", "qrf") else "`geosoc finetune`"
        raise NotFoundError(f"{model}: no model here; make it with {how} or pass a model URL")
    return url, tree, model


def plan_map(cube: str | xr.DataTree, model: str | None = None, *, resolution: float | None = None,
             bounds: tuple[float, float, float, float] | None = None, chunk: int | None = None,
             batch_size: int = DEFAULT_BATCH) -> MapPlan:
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
    return MapPlan(MapSpec(url, model, grid, batch_size, region, period), cube_grid, bands, patch)


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
    plan = plan_map(cube, model, resolution=resolution, bounds=bounds, chunk=chunk, batch_size=batch_size)
    spec = plan.spec
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
    _check_compatible(predictor.config, cube, spec.model)

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
    with exclusive(out, "predict"):  # also the check, before any work, that the output's folder takes writes
        return _build(spec, out, engine, device, sizing or RaySizing(), max_retries, fresh, progress)


def _build(spec: MapSpec, out: str, engine: Engine, device: str | None, sizing: RaySizing, max_retries: int,
           fresh: bool, progress: bool) -> str:
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
    with tqdm(total=spec.grid.n_chunks, initial=spec.grid.n_chunks - len(todo), desc="predict", unit="window",
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
    complete(out, {"geosoc_windows": spec.grid.n_chunks})
    return out


def _write_store_template(spec: MapSpec, out: str, fingerprint: str) -> dict[str, Any]:
    """Metadata only, from the checkpoint's config (the weights are not loaded here); the root's
    `geosoc_template_complete` flag is written last."""
    config, meta = checkpoint.load_config(spec.model)
    _require_map_model(spec.model, meta)
    _check_compatible(config, CubeAccess.open(spec.cube), spec.model)
    reference = checkpoint.load_aoa(spec.model)
    attrs = new_build(out, fingerprint, "writing", region=spec.region, cube=spec.cube, model=spec.model,
                      period=list(spec.period or []), calibration=json.dumps(checkpoint.calibration_of(meta)),
                      aoa_threshold=reference.threshold if reference is not None else None)
    outputs = output_names(config.quantiles)
    _template(spec, outputs, meta.get("units", ""), attrs).to_zarr(
        zarr_store(out), mode="w", compute=False, zarr_format=3, consolidated=False,
        encoding={name: {"chunks": spec.grid.chunks, "grid_mapping": "spatial_ref"} for name in outputs})
    return template_written(out, attrs)


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
