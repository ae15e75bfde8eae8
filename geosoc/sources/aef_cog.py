"""The AlphaEarth Foundations embedding from its public int8 COGs, through the raster source's warping.

Layout (the dataset's GCS readme, https://developers.google.com/earth-engine/guides/aef_on_gcs_readme):
`<url>/<year>/<UTM zone><N|S>/<image id>-<y offset>-<x offset>.tiff`, each file 8192 x 8192 px at 10 m in its
zone's UTM CRS, 64 int8 bands A00..A63, -128 no data. `url` is any fsspec URL (the bucket is
gs://alphaearth_foundations/satellite_embedding/v1/annual, requester-pays) or a local folder in that layout.

Only the zones under the region are listed, and each file's header is read once (`prepare`, before a build
starts; the list travels with the reader to every worker). A window is then made from each file under it: the
clip is de-quantised (no data to NaN), warped onto the window with GDAL's `sum` resampling (the area-weighted
sum of the valid 10 m vectors under each cell: no-data pixels are left out, not averaged in as numbers), the
files' sums are added, and the total is re-normalised to unit length. That is the mean's direction, which is
what the dataset's overviews hold; summing rather than averaging per file weights a cell that straddles two
tiles or two zones by the pixels each contributes, so there is no seam.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rioxarray
import xarray as xr

from geosoc.catalog import EMBEDDING_BANDS, LoadedCatalog
from geosoc.errors import GeosocError, InputError, first_line
from geosoc.grid import Grid
from geosoc.io.gdal_urls import gdal_path
from geosoc.io.storage import filesystem, join
from geosoc.sources.embeddings import GROUP, dequantise, embeddings_attrs, unit_vectors
from geosoc.sources.layers import Layer
from geosoc.sources.raster import clip_window, transformer, warp_window

FLOAT_BYTES = 256 * 2**20  # de-quantised values warped at a time (bands per warp follow): the int8 clip is read
# once, its float copy in band groups (a 512 px window of 30 m cells is 64 x 1,600 x 1,600 source pixels)


@dataclass(frozen=True)
class CogFile:
    """One COG of the dataset: where it is, its resolution, and its bounds in the region grid's CRS."""

    url: str
    resolution: float
    bounds: tuple[float, float, float, float]


def utm_zones(grid: Grid) -> list[str]:
    """The dataset's zone folders (`31N`, `1S`, ...) under a grid: 6-degree zones of its lon/lat extent."""
    to_lonlat = transformer(grid.crs, "EPSG:4326")
    west, south, east, north = to_lonlat.transform_bounds(*grid.bounds, densify_pts=21)
    first, last = (min(60, max(1, math.floor((lon + 180) / 6) + 1)) for lon in (west, east))
    zones = range(first, last + 1) if first <= last else [*range(first, 61), *range(1, last + 1)]  # antimeridian
    hemispheres = [h for h, inside in (("N", north >= 0), ("S", south < 0)) if inside]
    return [f"{zone}{h}" for h in hemispheres for zone in zones]


@contextmanager
def open_cog(url: str) -> Iterator[xr.DataArray]:
    """A COG as (band, y, x) int8, lazily, readable inside the block and closed on leaving; any fsspec URL, through
    GDAL's own readers with fsspec's settings (`io.gdal_urls`: no Python file object under GDAL, which failed
    under Dask's threads). Whatever fails inside the block, the open or a read, is one InputError naming `url`."""
    path = url
    try:
        with gdal_path(url) as path:
            src = rioxarray.open_rasterio(path)
            assert isinstance(src, xr.DataArray)
            try:
                yield src
            finally:
                src.close()
    except GeosocError:
        raise
    except Exception as err:  # rasterio/GDAL and fsspec raise many types for unreadable input
        reason = first_line(err).replace(path, url)  # GDAL names its own path (/vsis3/...): say the URL
        raise InputError(f"{url}: cannot read AlphaEarth COG ({reason})") from err


def _inspect(url: str, grid: Grid) -> CogFile:
    """A file's header, checked against the dataset's format (64 int8 bands with a CRS)."""
    try:
        with open_cog(url) as src:
            crs, count, dtype = src.rio.crs, src.sizes["band"], src.dtype
            bounds, resolution = src.rio.bounds(), float(abs(src.rio.resolution()[0]))
    except InputError as err:
        raise InputError(f"{err}; check embeddings.url") from err
    if crs is None or count != len(EMBEDDING_BANDS) or dtype != np.int8:
        raise InputError(f"{url}: not an AlphaEarth embedding COG: expected {len(EMBEDDING_BANDS)} int8 bands "
                         f"with a CRS, got {count} {dtype} bands, CRS {crs}")
    left, bottom, right, top = bounds
    return CogFile(url, resolution, transformer(crs.to_wkt(), grid.crs).transform_bounds(
        left, bottom, right, top, densify_pts=21))


def find_files(url: str, year: int, grid: Grid) -> tuple[CogFile, ...]:
    """Every COG of `year` that reaches the grid, from the zone folders under it."""
    fs, path = filesystem(url)
    remote = "://" in url and not url.startswith("file://")
    zones = utm_zones(grid)
    found = []
    for zone in zones:
        for name in sorted(fs.glob(join(path, str(year), zone, "*.tif*"))):
            found.append(_inspect(fs.unstrip_protocol(name) if remote else name, grid))
    if not found:
        raise InputError(f"{join(url, str(year))}: no AlphaEarth COGs for UTM zones {', '.join(zones)} (looked for "
                         f"<zone>/*.tiff); check embeddings.url and embeddings.year")
    reaching = tuple(f for f in found if _overlap(f.bounds, grid.bounds))
    if not reaching:
        raise InputError(f"{join(url, str(year))}: none of the {len(found)} COGs of zones {', '.join(zones)} reaches "
                         f"the region {list(grid.bounds)} ({grid.crs})")
    return reaching


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@dataclass
class CogEmbeddingReader:
    """Reads windows of the embedding layer from the COGs of one year (file list found once, then carried)."""

    grid: Grid
    url: str
    year: int
    files: tuple[CogFile, ...] | None = field(default=None)

    def prepare(self) -> None:
        """List the zone folders and read the headers, before a build writes anything (errors name the file)."""
        if self.files is None:
            self.files = find_files(self.url, self.year, self.grid)

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        self.prepare()
        assert self.files is not None
        bounds = self.grid.window_bounds(rows, cols)
        total = np.zeros((len(EMBEDDING_BANDS), rows.stop - rows.start, cols.stop - cols.start), np.float64)
        for item in self.files:
            if _overlap(item.bounds, bounds):
                self._add(item, rows, cols, total)
        return unit_vectors(total)

    def _add(self, item: CogFile, rows: slice, cols: slice, total: np.ndarray) -> None:
        """Add one file's area-weighted sums of valid de-quantised vectors under each cell of the window."""
        with open_cog(item.url) as src:  # a file that went away or broke since its header was read: InputError
            clip = clip_window(src, item.resolution, self.grid, rows, cols)
            if clip is None:
                return
            raw = clip.values
        step = max(1, FLOAT_BYTES // (4 * raw.shape[1] * raw.shape[2]))
        for start in range(0, raw.shape[0], step):
            part = slice(start, start + step)
            values = xr.DataArray(dequantise(raw[part]), dims=clip.dims, coords={"y": clip.y, "x": clip.x})
            values = values.rio.write_crs(clip.rio.crs).rio.write_transform(clip.rio.transform())
            total[part] += np.nan_to_num(warp_window(values, self.grid, rows, cols, "sum"))


def cog_embeddings(catalog: LoadedCatalog) -> Layer:
    """The embedding layer read from the COGs at the catalog's `embeddings.url` for its `embeddings.year`."""
    config = catalog.config.embeddings
    grid = catalog.config.embeddings_grid
    assert config is not None and grid is not None
    url = catalog.resolve(config.url)
    reader = CogEmbeddingReader(grid, url, config.year)
    attrs: dict[str, Any] = embeddings_attrs(catalog, url=url)
    return Layer(GROUP, grid, {"band": list(EMBEDDING_BANDS)}, reader, attrs)
