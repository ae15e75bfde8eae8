"""Users' own rasters (local or remote GeoTIFF/COG, or Zarr) resampled onto the region grid by rioxarray.

Each window is warped onto exactly its own pixels of the region grid from a clip of the source with a margin,
so a pixel's value does not depend on the window that asked for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import rioxarray  # registers the .rio accessor
import xarray as xr
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rioxarray.exceptions import NoDataInBounds, OneDimensionalRaster

from geosoc.catalog import LoadedCatalog
from geosoc.errors import CatalogError, InputError, first_line
from geosoc.grid import Grid
from geosoc.sources.layers import Layer

_MARGIN_PIXELS = 3

# GDAL's MEM-to-MEM warps under threads emit a spurious "no geotransform" warning; output is unaffected
# (opendatacube/odc-geo#131, and our chunk-invariance tests compare values).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.warp")


@dataclass(frozen=True)
class RasterInput:
    """One input file as the reader needs it: where, which bands, in which CRS, resampled how."""

    url: str
    bands: tuple[str, ...]
    crs: str
    resampling: str
    nodata: float | None
    resolution: float


def _open(url: str) -> xr.DataArray:
    """(band, y, x), lazily; Zarr stores give one band per 2-D data variable."""
    if url.rstrip("/").endswith(".zarr"):
        ds = xr.open_zarr(url, consolidated=False)
        names = [n for n, v in ds.data_vars.items() if v.dims[-2:] in (("y", "x"), ("lat", "lon"))]
        return ds[names].to_dataarray("band").assign_coords(band=names)
    return rioxarray.open_rasterio(url, masked=True)  # type: ignore[return-value]


def inspect_raster(url: str, where: str, bands: list[str] | None, crs: str | None, nodata: float | None,
                   resampling: str, path_key: str | None = None) -> RasterInput:
    """Read a file's metadata and check it against the catalog entry `where` (errors name both)."""
    path_key = path_key or f"{where}.path"
    try:
        src = _open(url)
    except Exception as err:  # rasterio/GDAL raise many types for unreadable input
        reason = first_line(err)
        raise InputError(f"{url}: cannot read raster ({reason}); check {path_key}") from err
    found_crs = src.rio.crs
    if found_crs is None and crs is None:
        hint = f"state it in the catalog as {where}.crs (e.g. 'EPSG:28355')" if where != path_key else "give it one"
        raise InputError(f"{url}: raster has no CRS; {hint}")
    names = _band_names(src, url)
    if bands is not None and len(bands) != len(names):
        raise InputError(f"{url}: has {len(names)} bands but {where}.bands lists {len(bands)}: {bands}")
    resolution = float(abs(src.rio.resolution()[0]))
    return RasterInput(
        url, tuple(bands or names), crs or found_crs.to_string(), resampling, nodata, resolution
    )


def _band_names(src: xr.DataArray, url: str) -> list[str]:
    descriptions = src.attrs.get("long_name")
    if isinstance(descriptions, (tuple, list)) and all(descriptions):
        return [str(d) for d in descriptions]
    if isinstance(descriptions, str) and src.sizes["band"] == 1:
        return [descriptions]
    if src["band"].dtype.kind in "US":
        return [str(b) for b in src["band"].values]
    return [f"{Path(url).stem}_b{i + 1}" for i in range(src.sizes["band"])]


@dataclass(frozen=True)
class RasterReader:
    inputs: tuple[RasterInput, ...]
    grid: Grid
    select: tuple[int, ...]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        blocks = [self._warp(item, rows, cols) for item in self.inputs]
        return np.concatenate(blocks)[list(self.select)]

    def _warp(self, item: RasterInput, rows: slice, cols: slice) -> np.ndarray:
        src = _open(item.url)
        if src.rio.crs is None:
            src = src.rio.write_crs(item.crs)
        clip = clip_window(src, item.resolution, self.grid, rows, cols)
        if clip is None:
            return np.full((len(item.bands), rows.stop - rows.start, cols.stop - cols.start), np.nan, np.float32)
        clip = clip.astype(np.float32)
        if item.nodata is not None:
            clip = clip.where(clip != item.nodata)
        return warp_window(clip, self.grid, rows, cols, item.resampling)


@lru_cache(maxsize=64)
def transformer(source: str, target: str) -> Transformer:
    """x/y from one CRS to another, made once per pair (making one costs ~50 ms; pyproj >= 3.1 makes them
    thread-safe)."""
    return Transformer.from_crs(source, target, always_xy=True)


def clip_window(src: xr.DataArray, resolution: float, grid: Grid, rows: slice, cols: slice) -> xr.DataArray | None:
    """The part of a raster (with its CRS) under a window of `grid`, with a margin of a few source pixels so
    that resampling at the window's edge sees its neighbours; None where the raster does not reach."""
    to_src = transformer(grid.crs, src.rio.crs.to_wkt())
    xmin, ymin, xmax, ymax = to_src.transform_bounds(*grid.window_bounds(rows, cols))
    pad = _MARGIN_PIXELS * resolution
    try:
        return src.rio.clip_box(xmin - pad, ymin - pad, xmax + pad, ymax + pad)
    except (NoDataInBounds, OneDimensionalRaster):
        return None


def warp_window(clip: xr.DataArray, grid: Grid, rows: slice, cols: slice, resampling: str) -> np.ndarray:
    """A float clip (NaN: no data, left out of every resampling) warped onto exactly a window of `grid`."""
    warped = clip.rio.write_nodata(np.nan, encoded=False).rio.reproject(
        grid.crs,
        shape=(rows.stop - rows.start, cols.stop - cols.start),
        transform=grid.window_transform(rows, cols),
        resampling=Resampling[resampling],
        nodata=np.nan,
    )
    return warped.values.astype(np.float32)


def raster_imagery(catalog: LoadedCatalog, grid: Grid) -> Layer:
    """The imagery layer of a `raster` source: every file's bands, or the catalog's `imagery.bands`."""
    config = catalog.config
    files = config.imagery.source.files  # type: ignore[union-attr]
    inputs = tuple(
        inspect_raster(
            catalog.resolve(f.path), f"imagery.source.files[{i}]", f.bands, f.crs, f.nodata, f.resampling
        )
        for i, f in enumerate(files)
    )
    available = [band for item in inputs for band in item.bands]
    wanted = config.imagery.bands or available
    unknown = [b for b in wanted if b not in available]
    if unknown:
        raise CatalogError(f"{catalog.path}: imagery.bands {unknown} not in the rasters; available: {available}")
    select = tuple(available.index(b) for b in wanted)
    attrs = {"source": "raster", "files": [item.url for item in inputs]}
    return Layer("imagery", grid, {"band": list(wanted)}, RasterReader(inputs, grid, select), attrs)


@dataclass(frozen=True)
class MaskedReader:
    """Imagery with no data outside the region mask (mask raster: non-zero inside, 0 or nodata outside)."""

    reader: Any
    mask: RasterReader

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        values = self.reader.read(rows, cols)
        inside = self.mask.read(rows, cols)[0]
        values[:, ~(np.isfinite(inside) & (inside != 0))] = np.nan
        return values

    def __getattr__(self, name: str) -> Any:  # prepare(), plan() of the wrapped reader
        if name == "reader":
            raise AttributeError(name)
        return getattr(self.reader, name)


def masked(layer: Layer, mask_url: str) -> Layer:
    """The layer with `region.mask` applied: the mask is resampled onto the grid (nearest) window by window."""
    item = inspect_raster(mask_url, "region.mask", None, None, None, "nearest", path_key="region.mask")
    mask = RasterReader((item,), layer.grid, (0,))
    return Layer(layer.group, layer.grid, layer.axes, MaskedReader(layer.reader, mask),
                 {**layer.attrs, "mask": mask_url})
