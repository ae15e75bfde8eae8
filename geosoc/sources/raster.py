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
from geosoc.io.gdal_urls import gdal_path
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

    @property
    def window_invariant(self) -> bool:
        """Whether a pixel is the same whatever window asks for it: so with `nearest`; GDAL's other resamplings
        scale their kernels by the window they warp (a bilinear pixel moves by a few hundredths)."""
        return all(item.resampling == "nearest" for item in self.inputs)

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
    """Imagery with no data outside the region mask (mask raster: non-zero inside, 0 or nodata outside).

    A pixel is inside where the mask pixel under its centre is (nearest): looked up in the mask, read once per
    process, so a pixel's answer is the same whatever window asks for it, and a small window (a patch at a point)
    costs no warp. A mask too large to hold (over `MASK_PIXELS`) or rotated is warped onto each window instead."""

    reader: Any
    mask: RasterReader

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        values = self.reader.read(rows, cols)
        values[:, ~self._inside_window(rows, cols)] = np.nan
        return values

    def _inside_window(self, rows: slice, cols: slice) -> np.ndarray:
        item, grid = self.mask.inputs[0], self.mask.grid
        if _looked_up(item.url):
            x, y = np.meshgrid(grid.x_of(np.arange(cols.start, cols.stop)), grid.y_of(np.arange(rows.start, rows.stop)))
            return points_inside(item, grid.crs, x.ravel(), y.ravel()).reshape(x.shape)
        inside = self.mask.read(rows, cols)[0]
        return np.isfinite(inside) & (inside != 0)

    @property
    def window_invariant(self) -> bool:
        return bool(getattr(self.reader, "window_invariant", False)) and (
            _looked_up(self.mask.inputs[0].url) or self.mask.window_invariant)

    def chunks_inside(self) -> np.ndarray:
        """(chunk rows, chunk cols): which chunks of the layer's grid may hold a pixel inside the mask (the others
        are never requested nor written)."""
        return chunks_inside(self.mask.inputs[0], self.mask.grid)

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether points (the grid's CRS) are inside the mask, from its pixel under each (nearest)."""
        return points_inside(self.mask.inputs[0], self.mask.grid.crs, x, y)

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


MASK_PIXELS = 2**25  # a mask larger than this is read coarser to find what it covers (a coarse pixel is inside
# where any of its pixels is: never a chunk with land skipped, at worst an all-sea chunk requested)
_OUTLINE_STEPS = 4  # points along each side of a chunk projected onto the mask's CRS


@lru_cache(maxsize=4)
def _mask_pixels(url: str) -> tuple[np.ndarray, Any, str, int]:
    """The mask's inside pixels (bool), their transform and CRS, and how many mask pixels a side of one holds."""
    import rasterio

    try:
        with gdal_path(url) as path, rasterio.open(path) as src:
            factor = max(1, int(np.ceil(np.sqrt(src.width * src.height / MASK_PIXELS))))
            shape = (-(-src.height // factor), -(-src.width // factor))
            values = src.read(1, out_shape=shape, masked=True, resampling=Resampling.max if factor > 1 else
                              Resampling.nearest)
            transform = src.transform * src.transform.scale(src.width / shape[1], src.height / shape[0])
            crs = src.crs.to_wkt()
    except rasterio.errors.RasterioIOError as err:
        raise InputError(f"region.mask: {url} cannot be read ({first_line(err)})") from err
    data = np.ma.filled(values, 0)
    inside = data != 0
    if data.dtype.kind == "f":
        inside &= np.isfinite(data)
    return inside, transform, crs, factor


def _looked_up(url: str) -> bool:
    """Whether pixels are looked up in the mask as read (whole, north-up) rather than warped window by window."""
    _, transform, _, factor = _mask_pixels(url)
    return factor == 1 and transform.b == 0 and transform.d == 0


def _mask_rowcol(url: str, crs: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Fractional (row, col) on the mask's pixels of points given in `crs`; None for a rotated mask."""
    _, transform, mask_crs, _ = _mask_pixels(url)
    if transform.b != 0 or transform.d != 0:
        return None
    mx, my = transformer(crs, mask_crs).transform(x, y)
    return (np.asarray(my) - transform.f) / transform.e, (np.asarray(mx) - transform.c) / transform.a


def points_inside(mask: RasterInput, crs: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether each point (in `crs`) falls on an inside pixel of the mask (a coarse one for a mask too large to
    read whole: inside where any of its pixels is; every point for a rotated mask)."""
    inside = _mask_pixels(mask.url)[0]
    found = _mask_rowcol(mask.url, crs, np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if found is None:
        return np.ones(len(x), dtype=bool)
    rows, cols = (np.floor(np.nan_to_num(v, nan=-1.0, posinf=-1.0, neginf=-1.0)).astype(np.int64) for v in found)
    ok = (rows >= 0) & (rows < inside.shape[0]) & (cols >= 0) & (cols < inside.shape[1])
    out = np.zeros(len(rows), dtype=bool)
    out[ok] = inside[rows[ok], cols[ok]]
    return out


def chunks_inside(mask: RasterInput, grid: Grid) -> np.ndarray:
    """(chunk rows, chunk cols) bool: chunks of `grid` that may hold a pixel the mask calls inside. Each chunk's
    outline (densified) is projected onto the mask, widened by a mask pixel, and any inside mask pixel in that box
    counts: a chunk left False is wholly outside whatever the resampling picks."""
    inside = _mask_pixels(mask.url)[0]
    ny, nx = grid.chunk_counts
    rows_at = _outline(grid.height, grid.chunks[0])
    cols_at = _outline(grid.width, grid.chunks[1])
    x = grid.x0 + cols_at[None, :] * grid.resolution
    y = grid.y0 - rows_at[:, None] * grid.resolution
    found = _mask_rowcol(mask.url, grid.crs, *np.broadcast_arrays(x, y))
    if found is None:
        return np.ones((ny, nx), dtype=bool)
    mrow, mcol = found
    unknown = _per_chunk(~(np.isfinite(mrow) & np.isfinite(mcol)), np.maximum)
    r0 = np.floor(_per_chunk(np.nan_to_num(mrow), np.minimum)).astype(np.int64) - 1
    r1 = np.floor(_per_chunk(np.nan_to_num(mrow), np.maximum)).astype(np.int64) + 2
    c0 = np.floor(_per_chunk(np.nan_to_num(mcol), np.minimum)).astype(np.int64) - 1
    c1 = np.floor(_per_chunk(np.nan_to_num(mcol), np.maximum)).astype(np.int64) + 2
    height, width = inside.shape
    r0, r1 = np.clip(r0, 0, height), np.clip(r1, 0, height)
    c0, c1 = np.clip(c0, 0, width), np.clip(c1, 0, width)
    total = np.zeros((height + 1, width + 1), dtype=np.int32)  # counts of inside pixels above and left of each
    total[1:, 1:] = inside.cumsum(axis=0, dtype=np.int32).cumsum(axis=1, dtype=np.int32)
    count = total[r1, c1] - total[r0, c1] - total[r1, c0] + total[r0, c0]
    return unknown.astype(bool) | (count > 0)


def _outline(length: int, chunk: int) -> np.ndarray:
    """Positions (pixel edges) along one axis: every chunk boundary and `_OUTLINE_STEPS - 1` points between."""
    bounds = np.append(np.arange(0, length, chunk), length).astype(np.float64)
    steps = np.linspace(0.0, 1.0, _OUTLINE_STEPS, endpoint=False)
    inner = bounds[:-1, None] + (bounds[1:] - bounds[:-1])[:, None] * steps[None, :]
    return np.append(inner.ravel(), length)


def _per_chunk(values: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """`reduce` over each chunk's points of an outline lattice (`_outline` along both axes), boundaries included
    on both sides: (chunk rows, chunk cols)."""
    step = _OUTLINE_STEPS
    starts0 = np.arange(0, values.shape[0] - 1, step)
    starts1 = np.arange(0, values.shape[1] - 1, step)
    along0 = reduce.reduceat(values, starts0, axis=0)  # rows [i*step, (i+1)*step), the last one to the end
    along0[:-1] = reduce(along0[:-1], values[starts0[1:]])  # and the boundary row the next chunk starts at
    both = reduce.reduceat(along0, starts1, axis=1)
    both[:, :-1] = reduce(both[:, :-1], along0[:, starts1[1:]])
    return both
