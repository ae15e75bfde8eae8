"""A synthetic AlphaEarth embedding: a smooth unit-vector field of lon/lat, written as int8 COGs in the dataset's
layout (year / UTM zone / <id>-<y offset>-<x offset>.tiff, -128 no data) and served by a fake Earth Engine.

The field is continuous across UTM zones, so a seam in a cube made from it shows as a departure from the
field's own cell means (`cell_means`). A rectangular lake of no-data pixels tests that -128 is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from pyproj import Transformer

from geosoc.catalog import EMBEDDING_BANDS
from geosoc.grid import Grid
from tests.ee_fake import MASK_VALUE, FakeEarthEngine

YEAR = 2022
ORIGIN = (6.0, 50.0)  # lon, lat: on the boundary of UTM zones 31N and 32N
# 40 x 40 px of 30 m in EPSG:3035 around ORIGIN (x of lon 6 is about 4034348)
REGION_BOUNDS = [4033800, 2994780, 4035000, 2995980]
LAKE = (4034160, 2995320, 4034400, 2995560)  # xmin, ymin, xmax, ymax in EPSG:3035: 8 x 8 cells of no data
OVERHANG = 0.002  # degrees of valid pixels past a zone's edge (the real files overhang their zones a little)
_rng = np.random.default_rng(22)
_ANGLES = _rng.uniform(0, 2 * np.pi, 64)
_WAVELENGTHS = _rng.uniform(1.5, 6.0, 64)  # km: smooth at 30 m
_PHASES = _rng.uniform(0, 2 * np.pi, 64)


def field(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """(64, *shape) unit vectors at points."""
    x = (np.asarray(lon) - ORIGIN[0]) * 111.32 * np.cos(np.radians(ORIGIN[1]))
    y = (np.asarray(lat) - ORIGIN[1]) * 110.57
    along = np.multiply.outer(np.cos(_ANGLES), x) + np.multiply.outer(np.sin(_ANGLES), y)
    phase = 2 * np.pi * along / _WAVELENGTHS.reshape(-1, *([1] * x.ndim)) + _PHASES.reshape(-1, *([1] * x.ndim))
    values = np.sin(phase) + 0.3
    return values / np.sqrt((values**2).sum(axis=0))


def quantise(values: np.ndarray) -> np.ndarray:
    """The inverse of the readme's de-quantisation: sign(v) sqrt(|v|) 127.5, rounded, in -127..127."""
    return np.clip(np.round(np.sign(values) * np.sqrt(np.abs(values)) * 127.5), -127, 127).astype(np.int8)


def in_lake(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x > LAKE[0]) & (x < LAKE[2]) & (y > LAKE[1]) & (y < LAKE[3])


def _zone_crs(zone: int) -> str:
    return f"EPSG:{32600 + zone}"


def _write(path: Path, raw: np.ndarray, transform: Affine, crs: str, cog: bool) -> None:
    """A 64-band int8 GeoTIFF, -128 no data, bands named A00..A63; a COG, or a plain bottom-up GeoTIFF (the
    bucket's files are reported to store rows bottom-up, with a positive y pixel size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": raw.shape[1], "width": raw.shape[2], "count": raw.shape[0],
               "dtype": "int8", "crs": crs, "transform": transform, "nodata": -128}
    target = path.with_suffix(".plain.tif") if cog else path
    with rasterio.open(target, "w", **profile) as dst:
        dst.write(raw)
        for i, name in enumerate(EMBEDDING_BANDS[: raw.shape[0]]):
            dst.set_band_description(i + 1, name)
    if cog:
        rasterio.shutil.copy(target, path, driver="COG", BLOCKSIZE=64)
        target.unlink()


def write_zone(folder: Path, zone: int, bounds: tuple[float, float, float, float], year: int = YEAR,
               pieces: int = 1, bottom_up_piece: int | None = None, constant: int | None = None,
               image: str = "a") -> list[Path]:
    """The zone's 10 m pixels over `bounds` (EPSG:3035) cut into `pieces` files (rows), named as in the bucket."""
    crs = _zone_crs(zone)
    xmin, ymin, xmax, ymax = Transformer.from_crs("EPSG:3035", crs, always_xy=True).transform_bounds(*bounds)
    x0, y0 = np.floor(xmin / 10) * 10, np.ceil(ymax / 10) * 10
    width, height = int(np.ceil((xmax - x0) / 10)), int(np.ceil((y0 - ymin) / 10))
    xs = x0 + 5 + 10 * np.arange(width)
    ys = y0 - 5 - 10 * np.arange(height)
    gx, gy = np.meshgrid(xs, ys)
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(gx, gy)
    raw = quantise(field(lon, lat)) if constant is None else np.full((64, height, width), constant, np.int8)
    west, east = -180 + 6 * (zone - 1) - OVERHANG, -180 + 6 * zone + OVERHANG
    lx, ly = Transformer.from_crs(crs, "EPSG:3035", always_xy=True).transform(gx, gy)
    raw[:, (lon < west) | (lon > east) | in_lake(lx, ly)] = -128
    paths = []
    edges = np.linspace(0, height, pieces + 1).astype(int)
    for piece, (r0, r1) in enumerate(zip(edges[:-1], edges[1:])):
        path = folder / str(year) / f"{zone}N" / f"fake{zone}{image}-{r0:010d}-{0:010d}.tiff"
        top = Affine(10, 0, x0, 0, -10, y0 - 10 * r0)
        if piece == bottom_up_piece:
            _write(path, raw[:, r0:r1][:, ::-1], Affine(10, 0, x0, 0, 10, y0 - 10 * r1), crs, cog=False)
        else:
            _write(path, raw[:, r0:r1], top, crs, cog=True)
        paths.append(path)
    return paths


def write_dataset(folder: Path) -> Path:
    """The region's COGs: zone 31N in two files (one bottom-up), zone 32N in one, plus decoys that must not be
    read: another year of constant vectors and a 32N file far north of the region."""
    margin = 150
    bounds = (REGION_BOUNDS[0] - margin, REGION_BOUNDS[1] - margin, REGION_BOUNDS[2] + margin,
              REGION_BOUNDS[3] + margin)
    write_zone(folder, 31, bounds, pieces=2, bottom_up_piece=1)
    write_zone(folder, 32, bounds)
    x, y = REGION_BOUNDS[0] + 300, REGION_BOUNDS[1] + 300  # in zone 31N, away from the lake
    write_zone(folder, 31, (x, y, x + 200, y + 200), year=YEAR - 1, constant=127)
    write_zone(folder, 32, (x + 600, y + 50_000, x + 800, y + 50_200), image="far")
    return folder


def cell_means(grid: Grid, rows: slice, cols: slice, samples: int = 6) -> np.ndarray:
    """(64, h, w): each cell's mean field direction from samples x samples points in it (lake points left out);
    NaN where every point is in the lake. What Earth Engine's mean of the 10 m vectors would give, without
    the quantisation."""
    offsets = (np.arange(samples) + 0.5) / samples
    cols_f = (np.arange(cols.start, cols.stop)[:, None] + offsets[None, :]).ravel()
    rows_f = (np.arange(rows.start, rows.stop)[:, None] + offsets[None, :]).ravel()
    x = grid.x0 + cols_f * grid.resolution
    y = grid.y0 - rows_f * grid.resolution
    gx, gy = np.meshgrid(x, y)
    lon, lat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(gx, gy)
    values = np.where(in_lake(gx, gy), 0.0, field(lon, lat))
    h, w = rows.stop - rows.start, cols.stop - cols.start
    summed = values.reshape(64, h, samples, w, samples).sum(axis=(2, 4))
    norm = np.sqrt((summed**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, summed / norm, np.nan)


class FakeEmbeddingEngine(FakeEarthEngine):
    """computePixels for the embedding layer: bands `index` of each cell's mean direction, masked in the lake."""

    def __init__(self, grid: Grid, **kwargs: Any) -> None:
        super().__init__(0, grid, "embeddings", ["embedding"], list(EMBEDDING_BANDS), **kwargs)

    def _pixels(self, info: Any) -> np.ndarray:
        values = cell_means(self.grid, info.rows, info.cols)[info.index]
        return np.where(np.isnan(values), MASK_VALUE, values).astype(np.float32)
