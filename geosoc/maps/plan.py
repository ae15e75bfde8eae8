"""What a map will cost, before anything exists: `geosoc predict --dry-run` from the catalog alone.

The output grid and windows come from the catalog's region, imagery and `predict` sections; the cells that will be
computed from its `region.mask` (sampled on a lattice of at most ~1 M points); the bytes read from the cube's chunk
layout as the engine reads them (`maps.reads`: Zarr decodes whole chunks, each process keeps the chunks its windows
share and runs them in strips, actors take contiguous runs of them; chunks wholly outside the mask are never
written, so never decoded), against the floor of every pixel under some patch read once (read amplification);
the network's size from the `model:` section (built on PyTorch's meta device: no memory, no weights). Time is two
bounds, compute (cells / a measured rate) and reading (bytes / a stated bandwidth); the run takes the larger, since
reading, computing and writing overlap.

Rates come from `rates.json` beside this module, written by `tests/benchmarks/inference.py` (device, output and
cube resolution, model size); another file can be named with `GEOSOC_RATES` or `--rates`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geosoc.catalog import LoadedCatalog
from geosoc.errors import InputError
from geosoc.grid import Grid, Window
from geosoc.maps.inference import output_grid
from geosoc.maps.reads import GroupReads, MapReads
from geosoc.maps.windows import IN_FLIGHT

RATES_FILE = Path(__file__).with_name("rates.json")
LATTICE_POINTS = 2**20  # mask samples at most
DEFAULT_READ_MBPS = 500.0  # per actor: what one VM reading a bucket with many requests in flight commonly gets


@dataclass(frozen=True)
class Rate:
    """One measured throughput of `geosoc.predict` (tests/benchmarks/inference.py)."""

    device: str
    parameters: int
    resolution: float
    cells_per_s: float
    bare_cells_per_s: float
    measured: str
    command: str
    startup_s: float = 0.0  # a Ray map job's seconds before its first window (tests/benchmarks/continent.py)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rate:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})  # a missing one: TypeError


def rates_file() -> Path:
    return Path(os.environ.get("GEOSOC_RATES") or RATES_FILE)


def load_rates(path: Path | None = None) -> list[Rate]:
    path = path or rates_file()
    try:
        return [Rate.from_dict(entry) for entry in json.loads(path.read_text())["rates"]]
    except FileNotFoundError as err:
        raise InputError(f"{path}: no rates file; write one with tests/benchmarks/inference.py --record") from err
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a rates file (expected {{\"rates\": [{{device, parameters, resolution, "
                         f"cells_per_s, ...}}]}}): {err}") from err


def record_rate(rate: Rate, path: Path | None = None) -> None:
    """Add or replace the entry for the same device, model size and resolution (written in one step)."""
    path = path or rates_file()
    entries = json.loads(path.read_text())["rates"] if path.exists() else []
    same = (rate.device, rate.parameters, rate.resolution)
    entries = [e for e in entries if (e["device"], e["parameters"], e["resolution"]) != same] + [vars(rate)]
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"rates": entries}, indent=1) + "\n")
    partial.replace(path)


def choose_rate(rates: list[Rate], device: str | None, parameters: int, resolution: float) -> tuple[float, str]:
    """Cells/s per actor for a model of `parameters` on `device`, and how it was found.

    Fallback, in order: the device's entry nearest in model size, scaled by the ratio of parameters (compute grows
    about linearly with them); without an entry for the device, the GPU entries' likewise (their first device
    when none is named), with the substitution said."""
    if not rates:
        raise InputError(f"{rates_file()}: no rates in it")
    named = [r for r in rates if device is not None and r.device.lower() == device.lower()]
    fallback = ([r for r in rates if r.device != "cpu"] or rates)[0].device
    pool = named or [r for r in rates if r.device == fallback]
    best = _nearest(pool, parameters, resolution)
    how = f"{best.cells_per_s:,.0f} cells/s measured on {best.device} ({best.parameters / 1e6:.1f} M parameters, " \
          f"output cells of {best.resolution:g}, {best.measured})"
    rate = best.cells_per_s
    if best.parameters != parameters:
        rate *= best.parameters / parameters
        how += f", scaled to {parameters / 1e6:.1f} M parameters"
    if device is not None and not named:
        how += f"; nothing measured on {device!r} (run tests/benchmarks/inference.py there)"
    return rate, how


def choose_startup(rates: list[Rate], device: str | None, parameters: int, resolution: float) -> tuple[float, str]:
    """Seconds a Ray map job spends before its first window is written (the job, its actors, their model loads,
    the driver's plan of the reads), and how it was found: the measurement on `device` (on any device when it has
    none) nearest in model size and output resolution, as for the rate."""
    measured = [r for r in rates if r.startup_s]
    pool = [r for r in measured if device is not None and r.device.lower() == device.lower()] or measured
    if not pool:
        return 0.0, "not measured (none in the rates file): left out"
    best = _nearest(pool, parameters, resolution)
    return best.startup_s, f"{best.startup_s:,.0f} s measured on {best.device} (output cells of {best.resolution:g})"


def _nearest(pool: list[Rate], parameters: int, resolution: float) -> Rate:
    return min(pool, key=lambda r: (abs(math.log(r.parameters / parameters)), abs(math.log(r.resolution / resolution))))


@dataclass(frozen=True)
class CatalogPlan:
    """A map's size and cost, from the catalog."""

    grid: Grid
    cells_in_bounds: int
    cells_inside: int
    windows: int
    windows_inside: int
    mask: str | None
    reads: MapReads  # what each window reads; chunks outside the mask are never decoded
    order: list[Window]  # the windows in the order a process runs them
    strip: int  # windows a strip is wide
    cache_bytes: int  # decoded chunks a process keeps
    parameters: int
    patch: int
    bands: int
    variables: int
    months: int
    _decoded: dict[int, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)

    def decoded(self, actors: int = 1) -> dict[str, int]:
        """Bytes decoded per cube group when `actors` processes share the map (each its own run of the order)."""
        if actors not in self._decoded:
            runs = self.reads.split(self.order, actors, self.strip + IN_FLIGHT)
            self._decoded[actors] = self.reads.decoded_bytes(runs, self.cache_bytes)
        return self._decoded[actors]

    def read_bytes(self, actors: int = 1) -> int:
        return sum(self.decoded(actors).values())

    @property
    def needed_bytes(self) -> int:
        """Every stored pixel under some cell's patch (or climate cell) once: no reader decodes less."""
        return sum(self.reads.needed_bytes().values())

    def amplification(self, actors: int = 1) -> float:
        """Decoded bytes over the bytes the patches need."""
        return self.read_bytes(actors) / max(self.needed_bytes, 1)

    def bytes_per_cell(self, actors: int = 1) -> float:
        """Bytes read per cell computed: the read rate one actor needs is this x its cells/s."""
        return self.read_bytes(actors) / max(self.cells_inside, 1)

    def compute_seconds(self, rate: float, actors: int) -> float:
        return self.cells_inside / (rate * actors)

    def read_seconds(self, mbps: float, actors: int) -> float:
        return self.read_bytes(actors) / (mbps * 1e6 * actors)


def plan_from_catalog(catalog: LoadedCatalog, *, resolution: float | None = None, chunk: int | None = None,
                      bounds: tuple[float, float, float, float] | None = None) -> CatalogPlan:
    """The map `geosoc predict` would make of the region, sized without a cube or a model."""
    from geosoc.learn.training import network_config
    from geosoc.sources.from_catalog import open_layers

    config = catalog.config
    layers = {layer.group: layer for layer in open_layers(catalog)}
    imagery, climate = layers["imagery"], layers.get("climate")
    cube_grid = config.imagery_grid
    bands = imagery.shape[0]
    months, variables = climate.shape[:2] if climate is not None else (0, 0)
    network = network_config(config.model, [str(i) for i in range(bands)], [str(i) for i in range(variables)],
                             config.sampling.patch_size, months, config.sampling.unlabelled)  # pretrained on those
    patch = network.patch_size
    grid = output_grid(cube_grid, resolution if resolution is not None else config.predict.resolution, bands, patch,
                       bounds, chunk)
    inside = _inside_fraction(grid, catalog.resolve(config.region.mask) if config.region.mask else None)
    groups = [_group(imagery, patch)] + ([_group(climate, 1)] if climate is not None else [])
    reads = MapReads(grid, tuple(groups))
    order, strip, cache = reads.order(list(grid.windows()), IN_FLIGHT)
    sizes = np.outer(*grid.dask_chunks())  # cells per window
    return CatalogPlan(grid, grid.height * grid.width, int(round(float((inside * sizes).sum()))), grid.n_chunks,
                       int((inside > 0).sum()), config.region.mask, reads, order, strip, cache,
                       _parameters(network), patch, bands, variables, months)


def _group(layer: Any, size: int) -> GroupReads:
    """A cube group as the map will read it, with the chunks a build writes (those that may hold a pixel inside
    the region's mask)."""
    stored = layer.reader.chunks_inside() if hasattr(layer.reader, "chunks_inside") else None
    return GroupReads.of_array(layer.group, layer.grid, size, layer.shape, layer.chunk_shape, stored=stored)


def _parameters(network: Any) -> int:
    import torch

    from geosoc.learn.models import SoilNet

    with torch.device("meta"):  # shapes only
        return sum(p.numel() for p in SoilNet(network).parameters())


def _inside_fraction(grid: Grid, mask: str | None) -> np.ndarray:
    """(window rows, window cols): the share of each window's cells inside the mask (all 1 without one), from the
    mask sampled (nearest) at the centres of a lattice of `step` x `step` output cells."""
    ny, nx = grid.chunk_counts
    if mask is None:
        return np.ones((ny, nx))
    import rasterio
    from affine import Affine
    from rasterio.warp import Resampling, reproject

    step = max(1, min(math.ceil(math.sqrt(grid.height * grid.width / LATTICE_POINTS)), *grid.chunks))
    shape = (math.ceil(grid.height / step), math.ceil(grid.width / step))
    lattice = np.zeros(shape, dtype=np.uint8)
    try:
        with rasterio.open(mask) as src:
            reproject(rasterio.band(src, 1), lattice, dst_transform=grid.transform * Affine.scale(step),
                      dst_crs=grid.crs, resampling=Resampling.nearest, dst_nodata=0)
    except rasterio.errors.RasterioIOError as err:
        raise InputError(f"region.mask: {mask} cannot be read ({err})") from err
    rows = np.minimum(np.arange(shape[0]) * step // grid.chunks[0], ny - 1)
    cols = np.minimum(np.arange(shape[1]) * step // grid.chunks[1], nx - 1)
    inside, count = np.zeros((ny, nx)), np.zeros((ny, nx))
    np.add.at(inside, (rows[:, None], cols[None, :]), lattice != 0)
    np.add.at(count, (rows[:, None], cols[None, :]), 1)
    return inside / np.maximum(count, 1)
