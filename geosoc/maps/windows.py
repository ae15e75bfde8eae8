"""A map's windows: what a map is (`MapSpec`), the cube block and climate a window reads, and `WindowPipeline`,
which reads, predicts and writes windows with the three overlapped (both engines run it)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from geosoc.data.window_sources import cells_at
from geosoc.errors import IncompatibleError
from geosoc.fingerprints import fingerprint
from geosoc.grid import Grid, Window
from geosoc.io.progress import Markers
from geosoc.io.storage import zarr_store
from geosoc.learn.models import NetworkConfig
from geosoc.maps.chunks import ChunkCache, ReadCount
from geosoc.maps.predictor import DEFAULT_BATCH, Predictor
from geosoc.maps.reads import CACHE_BYTES, MapReads

if TYPE_CHECKING:  # imported with a tree model only (`predictor.load_predictor`)
    from geosoc.maps.tabular import EmbeddingWindow, TabularPredictor

MAP_LAYOUT = 2  # in the resume fingerprint: a map written with other variables (1: soc_mean) is not continued
IN_FLIGHT = 3  # windows a process holds at once: one read ahead, one on the device, one being written


@dataclass(frozen=True)
class MapSpec:
    """What a map is: the cube and model it comes from and its output grid (picklable, for Ray actors)."""

    cube: str
    model: str
    grid: Grid
    batch_size: int = DEFAULT_BATCH
    region: str = ""
    period: tuple[str, str] | None = None  # the imagery's dates, for the STAC item
    depth: str = ""  # the soil layer the samples measure (catalog sampling.depth), for the title and STAC item

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


@dataclass
class WindowInput:
    """What one window needs from the cube, read on the host (so the next can be read while one computes)."""

    window: Window
    block: np.ndarray
    top: np.ndarray
    left: np.ndarray
    climate: np.ndarray | None  # (climate cells, time, variable): each climate cell under the window once
    climate_of: np.ndarray | None  # (cells,): each cell's row of `climate`
    embedding: EmbeddingWindow | None = None  # aef models: the embedding cells under the window, plus halo
    cells: np.ndarray | None = None  # (cells, 2): each cell's x and y in the grid's CRS (a `+rk` model kriges there)


@dataclass
class CubeAccess:
    """The cube's grids, opened once per process, and the decoded chunks its windows share (`cache`, of `capacity`
    bytes: `maps.reads` sizes it); reads go to its Zarr arrays through that cache."""

    url: str
    imagery: Grid
    climate: Grid | None
    bands: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    embeddings: Grid | None = None
    capacity: int = CACHE_BYTES
    cache: ChunkCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grids = {"imagery": self.imagery, "climate": self.climate, "embeddings": self.embeddings}
        self.cache = ChunkCache(self.url, {k: g for k, g in grids.items() if g is not None}, self.capacity)

    def with_capacity(self, capacity: int) -> CubeAccess:
        """The same cube with an empty cache of `capacity` bytes."""
        return replace(self, capacity=capacity)

    @classmethod
    def open(cls, url: str, capacity: int = CACHE_BYTES) -> CubeAccess:
        from geosoc.data.cube import cube_parts, embeddings_part

        imagery, grid, climate, climate_grid = cube_parts(url)
        variables = [str(v) for v in climate["variable"].values] if climate is not None else []
        embedding = embeddings_part(url)
        return cls(url, grid, climate_grid, [str(b) for b in imagery["band"].values], variables,
                   embedding[1] if embedding is not None else None, capacity)

    def reads(self, grid: Grid, predictor: Predictor | TabularPredictor) -> MapReads:
        """What the windows of a map on `grid` read from this cube (`read_window`'s groups and sizes)."""
        groups = [self.cache.reads("imagery", predictor.patch)]
        if predictor.uses_climate and self.climate is not None:
            groups.append(self.cache.reads("climate", 1))
        size = getattr(predictor, "embedding_patch", 0)
        if size and self.embeddings is not None:
            groups.append(self.cache.reads("embeddings", size))
        return MapReads(grid, tuple(groups))


def read_window(cube: CubeAccess, grid: Grid, window: Window, predictor: Predictor | TabularPredictor) -> WindowInput:
    """The imagery block under a window's cells plus the halo of their patches (the predictor's patch size),
    and, when the predictor uses climate, the series of each climate cell under them (thousands of map cells
    share one: the network's climate branch then runs once per climate cell)."""
    xs, ys = grid.x_of(np.arange(window.cols.start, window.cols.stop)), grid.y_of(np.arange(window.rows.start,
                                                                                          window.rows.stop))
    x, y = np.meshgrid(xs, ys)
    rows, cols = cube.imagery.rowcol(x.ravel(), y.ravel())
    patch = predictor.patch
    half = patch // 2
    r0, c0 = int(rows.min()) - half, int(cols.min()) - half
    block = cube.cache.read("imagery", slice(r0, int(rows.max()) - half + patch),
                            slice(c0, int(cols.max()) - half + patch))
    series = climate_of = None
    if predictor.uses_climate and cube.climate is not None:
        climate_rows, climate_cols = cube.climate.rowcol(x.ravel(), y.ravel())
        _, first, climate_of = np.unique(climate_rows * cube.climate.width + climate_cols, return_index=True,
                                         return_inverse=True)
        series = cells_at(cube.cache, "climate", climate_rows[first], climate_cols[first])
    embedding = None
    size = getattr(predictor, "embedding_patch", 0)
    if size and cube.embeddings is not None:
        e_rows, e_cols = cube.embeddings.rowcol(x.ravel(), y.ravel())
        e_half = size // 2
        e0, f0 = int(e_rows.min()) - e_half, int(e_cols.min()) - e_half
        vectors = cube.cache.read("embeddings", slice(e0, int(e_rows.max()) - e_half + size),
                                  slice(f0, int(e_cols.max()) - e_half + size))
        embedding = (vectors, e_rows - e_half - e0, e_cols - e_half - f0)
    return WindowInput(window, block, rows - half - r0, cols - half - c0, series, climate_of, embedding,
                       np.stack([x.ravel(), y.ravel()], axis=1))


def predict_window(predictor: Predictor | TabularPredictor, data: WindowInput) -> dict[str, np.ndarray]:
    """(h, w) arrays of every output of one window."""
    flat = predictor.predict(data.block, data.top, data.left, data.climate, data.climate_of, data.embedding)
    residuals = getattr(predictor, "residuals", None)  # a `+rk` model: its residuals kriged at the cells
    if residuals is not None and data.cells is not None:
        flat = residuals.apply(flat, data.cells)
    return {name: values.reshape(data.window.shape) for name, values in flat.items()}


def check_compatible(config: NetworkConfig, cube: CubeAccess, model_url: str,
                     meta: dict[str, Any] | None = None) -> None:
    """The cube has what the model reads: its bands, its climate variables and (aef models) an embeddings group."""
    if (meta or {}).get("embedding_bands") and cube.embeddings is None:
        raise IncompatibleError(f"{model_url} reads the AlphaEarth embedding, but {cube.url} has no embeddings group: "
                                "add an `embeddings:` section to the catalog and rebuild the cube")
    if config.bands and config.bands != cube.bands:
        raise IncompatibleError(f"{model_url} was trained on bands {config.bands}, but {cube.url} has {cube.bands}")
    if config.variables and config.variables != cube.variables:
        raise IncompatibleError(
            f"{model_url} was trained on climate variables {config.variables}, but {cube.url} has "
            f"{cube.variables or 'no climate'}"
        )


@lru_cache(maxsize=64)
def output_array(url: str, name: str, build_id: str) -> zarr.Array:
    """Opened once per process and build (the build id keeps a replaced map from reusing it)."""
    return zarr.open_array(zarr_store(url), path=name, mode="r+", zarr_format=3)


class WindowPipeline:
    """One process's share of a map: windows read, computed and written on threads, so that reading the next
    window and writing the last overlap with the device computing this one (which computes one at a time)."""

    def __init__(self, spec: MapSpec, out: str, build_id: str, predictor: Predictor | TabularPredictor,
                 cube: CubeAccess) -> None:
        self.spec, self.out, self.predictor, self.cube = spec, out, predictor, cube
        self.markers = Markers(out, build_id)
        self._device = threading.Lock()

    @property
    def decoded(self) -> ReadCount:
        """The cube chunks this process decoded so far."""
        return self.cube.cache.count

    def run(self, window: Window) -> str:
        """Read, predict and write one window, then mark it done; safe to call from several threads."""
        data = read_window(self.cube, self.spec.grid, window, self.predictor)
        with self._device:
            values = predict_window(self.predictor, data)
        for name, array in values.items():
            output_array(self.out, name, self.markers.build_id)[window.rows, window.cols] = array
        self.markers.mark(window.key)
        return window.key
