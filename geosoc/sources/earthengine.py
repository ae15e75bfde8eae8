"""Earth Engine covariates of SSL-SoilNet, streamed through xee onto the cube grid.

Imagery: Landsat 8 Collection 2 Level 2 surface reflectance (SR_B1..SR_B7, scale 2.75e-5, offset -0.2) with
clouds, shadows, cirrus, snow and dilated clouds masked from QA_PIXEL; a wall-to-wall composite equivalent to
the paper's scene choice (median of clear winter observations, Nov-Feb, gaps filled by a minimum-NDVI
mosaic of the rest of the period); the five soil indices; SRTM elevation and slope.
Climate: TerraClimate monthly variables with each band's scale factor applied and no masking of zeros.
Embeddings: the AlphaEarth Foundations annual Satellite Embedding of one year, each UTM zone's 10 m vectors
averaged over the cells of the region grid and the mosaic re-normalised to unit length.

Pixels are read through xee's store and backend array (its tiling, grid projection and mask handling), with
two seams of ours: the pixel fetcher (throttle, retries, fault injection in tests) and the collection
metadata, which we know because we built the expressions (xee would otherwise ask the server).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geosoc.catalog import EMBEDDING_BANDS, IMAGERY_BANDS, INDICES, EarthEngineSource, LoadedCatalog
from geosoc.errors import CredentialsError, ServiceError, first_line
from geosoc.grid import Grid, Window
from geosoc.sources.ee_credentials import ENV_KEY_FILE, ENV_PROJECT, find_credentials
from geosoc.sources.ee_fetch import Fetch, PixelFetcher, RetryPolicy, Throttle
from geosoc.sources.ee_plan import TileShape, count_requests, plan_tile
from geosoc.sources.embeddings import GROUP as EMBEDDINGS
from geosoc.sources.embeddings import embeddings_attrs
from geosoc.sources.layers import Layer

LANDSAT_SR_BANDS = ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7"]
LANDSAT_SCALE, LANDSAT_OFFSET = 2.75e-5, -0.2
# QA_PIXEL bits: 1 dilated cloud, 2 cirrus, 3 cloud, 4 cloud shadow, 5 snow.
QA_MASK_BITS = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5)
WINTER_MONTHS = (11, 2)  # November through February (calendarRange wraps over the year end)
# Scale factors of IDAHO_EPSCOR/TERRACLIMATE bands (Earth Engine catalog); bands not listed are unscaled.
TERRACLIMATE_SCALE = {
    "aet": 0.1, "def": 0.1, "pdsi": 0.01, "pet": 0.1, "soil": 0.1, "srad": 0.1,
    "tmmn": 0.1, "tmmx": 0.1, "vap": 0.001, "vpd": 0.01, "vs": 0.01,
}  # fmt: skip
CHECK_DEADLINE_MS = 20_000
EMBEDDING_PIXEL = 10.0  # metres: the embedding's native pixel
MAX_REDUCE_PIXELS = 65_535  # reduceResolution's largest maxPixels
STACKED = "imagery"  # the one variable of stacked imagery, whose images are the bands


# --- expressions -------------------------------------------------------------------------------------------


def landsat_composite(source: EarthEngineSource, start: dt.date, end: dt.date) -> Any:
    """The 7 scaled SR bands: clear winter median, gaps filled by the rest of the period's min-NDVI mosaic."""
    import ee

    def clear_reflectance(image: Any) -> Any:
        clear = image.select("QA_PIXEL").bitwiseAnd(QA_MASK_BITS).eq(0)
        reflectance = image.select(LANDSAT_SR_BANDS).multiply(LANDSAT_SCALE).add(LANDSAT_OFFSET)
        return reflectance.updateMask(clear).copyProperties(image, ["system:time_start"])

    observations = (
        ee.ImageCollection(source.landsat)
        .filterDate(start.isoformat(), (end + dt.timedelta(days=1)).isoformat())
        .map(clear_reflectance)
    )
    winter = observations.filter(ee.Filter.calendarRange(WINTER_MONTHS[0], WINTER_MONTHS[1], "month"))
    rest = observations.filter(ee.Filter.calendarRange(WINTER_MONTHS[1] + 1, WINTER_MONTHS[0] - 1, "month"))
    barest = rest.map(
        lambda image: image.addBands(image.normalizedDifference(["SR_B5", "SR_B4"]).multiply(-1).rename("bare"))
    ).qualityMosaic("bare")
    return winter.median().unmask(barest.select(LANDSAT_SR_BANDS))


def imagery_image(source: EarthEngineSource, period: tuple[dt.date, dt.date], bands: list[str]) -> Any:
    """All 14 covariates as one float image, then the catalog's `bands` in order."""
    import ee

    reflectance = landsat_composite(source, *period)
    indices = [reflectance.normalizedDifference(list(pair)).rename(name) for name, pair in INDICES.items()]
    dem = ee.Image(source.terrain).select("elevation")
    terrain = [dem.rename("elevation"), ee.Terrain.slope(dem).rename("slope")]
    return ee.Image.cat([reflectance, *indices, *terrain]).rename(list(IMAGERY_BANDS)).select(bands).toFloat()


def climate_collection(source: EarthEngineSource, months: list[dt.date], variables: list[str]) -> Any:
    """TerraClimate months as images of `variables`, each band multiplied by its scale factor.

    Nothing is masked: a real zero (no rain, no snow) stays zero.
    """
    import ee

    scales = ee.Image.constant([TERRACLIMATE_SCALE.get(v, 1.0) for v in variables])
    end = _next_month(months[-1])

    def scaled(image: Any) -> Any:
        values = image.select(variables).multiply(scales).rename(variables).toFloat()
        return values.copyProperties(image, ["system:time_start"])

    return (
        ee.ImageCollection(source.climate)
        .filterDate(months[0].isoformat(), end.isoformat())
        .select(variables)
        .sort("system:time_start")
        .map(scaled)
    )


def embedding_image(collection: str, year: int, grid: Grid) -> Any:
    """The year's embedding on `grid`: in each UTM zone's image, the mean of the 10 m vectors under each cell
    (reduceResolution in the image's own projection, then onto the grid), the zones mosaicked, and the mean
    re-normalised to unit length, as the dataset's own overviews are."""
    import ee

    t = grid.transform
    max_pixels = min(MAX_REDUCE_PIXELS, math.ceil(grid.resolution / EMBEDDING_PIXEL + 1) ** 2)

    def onto_grid(image: Any) -> Any:
        mean = image.reduceResolution(reducer=ee.Reducer.mean(), maxPixels=max_pixels)
        return mean.reproject(crs=grid.crs, crsTransform=[t.a, t.b, t.c, t.d, t.e, t.f])

    mosaic = (
        ee.ImageCollection(collection)
        .filterDate(f"{year}-01-01", f"{year + 1}-01-01")
        .select(list(EMBEDDING_BANDS))
        .map(onto_grid)
        .mosaic()
    )
    length = mosaic.pow(2).reduce(ee.Reducer.sum()).sqrt()
    return mosaic.divide(length).rename(list(EMBEDDING_BANDS)).toFloat()


def embedding_collection(collection: str, year: int, grid: Grid) -> Any:
    """The embedding as a collection of 64 one-band images (`embedding`), one per axis: xee then fetches many
    axes in one request (a request's index range), not one request per axis."""
    import ee

    image = embedding_image(collection, year, grid)
    return ee.ImageCollection([image.select([band]).rename(["embedding"]) for band in EMBEDDING_BANDS])


def _next_month(month: dt.date) -> dt.date:
    return dt.date(month.year + month.month // 12, month.month % 12 + 1, 1)


# --- credentials -------------------------------------------------------------------------------------------

_init_lock = threading.Lock()


def initialize(high_volume: bool = False) -> None:
    """Initialise Earth Engine in this process from the environment, once; fail fast with what to do.

    Credentials: see `ee_credentials` (a file in GOOGLE_APPLICATION_CREDENTIALS, the `earthengine
    authenticate` token, Application Default Credentials with the metadata server). Project: GEOSOC_EE_PROJECT,
    else the one the credentials name.
    """
    import ee

    with _init_lock:
        if ee.data.is_initialized():
            return
        credentials, project = find_credentials()
        project = os.environ.get(ENV_PROJECT) or project
        if not project:
            raise CredentialsError(
                f"set {ENV_PROJECT} to the Google Cloud project registered for Earth Engine (e.g. my-ee-project)"
            )
        url = ee.data.HIGH_VOLUME_API_BASE_URL if high_volume else None
        try:
            ee.Initialize(credentials=credentials, project=project, opt_url=url)
            ee.data.setMaxRetries(0)  # geosoc retries, with jitter and a shared throttle
            ee.data.setDeadline(CHECK_DEADLINE_MS)
            ee.Number(1).getInfo()
        except Exception as err:  # every failure here means one of two things to the user, told apart below
            ee.Reset()
            reason = first_line(err)
            if _unreachable(err):
                raise ServiceError(
                    f"could not reach Earth Engine ({reason}): check this machine's network, DNS or proxy; the "
                    "credentials were not checked"
                ) from err
            raise CredentialsError(
                f"Earth Engine did not accept the credentials for project {project!r}: {reason}. "
                f"Check {ENV_KEY_FILE} / `earthengine authenticate` and that the project has Earth Engine enabled"
            ) from err


def _unreachable(err: BaseException) -> bool:
    """Whether a failure (or what caused it) is the network's: no name resolution, no connection, a timeout."""
    import socket

    from google.auth.exceptions import TransportError

    network = (socket.gaierror, ConnectionError, TimeoutError, TransportError)
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, network) or type(err).__name__ in ("ServerNotFoundError", "NameResolutionError"):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


# --- xee ---------------------------------------------------------------------------------------------------


def _xee_dataset(image_collection: Any, grid: Grid, bands: list[str], index: list[Any],
                 tile: TileShape, fetcher: PixelFetcher) -> Any:
    """An xarray Dataset (one variable per band, dims time, y, x) over the collection, read by xee; `index`
    labels its images (dates, or the embedding's axis names)."""
    from xarray.backends.store import StoreBackendEntrypoint
    from xee import ext

    info = {
        "size": len(index),
        "props": {},
        "first": {
            "type": "Image",
            "bands": [
                {"id": b, "data_type": {"type": "PixelType", "precision": "float"}, "crs": grid.crs,
                 "crs_transform": [1, 0, 0, 0, 1, 0]}
                for b in bands
            ],
        },
        "properties": [
            [f"geosoc/{t.isoformat() if isinstance(t, dt.date) else t}" for t in index],
            [int(dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC).timestamp() * 1000) if isinstance(t, dt.date)
             else i for i, t in enumerate(index)],
        ],
    }

    class _Store(ext.EarthEngineStore):
        get_info = info  # metadata of expressions we built: no server round trip

        def image_to_array(self, image: Any, pixels_getter: Any = None, dtype: Any = np.float32, **kw: Any) -> Any:
            return super().image_to_array(image, pixels_getter=fetcher, dtype=dtype, **kw)

    t = grid.transform
    store = _Store.open(
        image_collection,
        crs=grid.crs,
        crs_transform=(t.a, t.b, t.c, t.d, t.e, t.f),
        shape_2d=(grid.width, grid.height),
        chunk_store=tile.as_xee_chunks(),
        getitem_kwargs={"max_retries": 0},  # retries happen in the fetcher
        executor_kwargs={"max_workers": 8},
    )
    return StoreBackendEntrypoint().open_dataset(store)


@dataclass
class EarthEngineReader:
    """Reads a cube window of one layer through xee; builds its expression and dataset once per process.

    `index` are the images of its collection: one for imagery, the months for climate, the 64 axes for the
    embeddings (one variable, `embedding`)."""

    group: str
    grid: Grid
    source: EarthEngineSource
    variables: list[str]
    index: list[Any]
    period: tuple[dt.date, dt.date]
    fetch: Fetch | None = None
    retry: RetryPolicy | None = None
    collection: str = ""  # embeddings: the collection (the catalog's `embeddings.collection`)
    stacked: bool = False  # imagery: the bands as the images of one variable, all fetched in one request
    _dataset: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    window_invariant = True  # computed on the grid, pixel by pixel, whatever window a request asks for

    @property
    def tile(self) -> TileShape:
        return plan_tile(len(self.index), *self.grid.chunks)

    def requests(self, windows: Iterable[Window] | None = None) -> int:
        """Requests for the whole layer, or for `windows` of it only."""
        if windows is None:
            return count_requests(self.grid, self.variables, len(self.index), self.tile)
        return sum(self.window_requests(*window.shape) for window in windows)

    def window_requests(self, height: int, width: int) -> int:
        """Requests that read one window of this size (xee tiles it from its corner)."""
        tile = self.tile
        return len(self.variables) * -(-len(self.index) // tile.index) * -(-height // tile.height) * -(
            -width // tile.width)

    def plan(self, windows: Iterable[Window] | None = None) -> dict[str, Any]:
        """What `--dry-run` shows: requests (for the whole layer or `windows` of it), their largest size,
        concurrency and assumed time each."""
        return {
            "requests": self.requests(windows),
            "request_bytes": self.tile.nbytes,
            "concurrency": self.source.max_concurrency,
            "seconds_per_request": self.source.seconds_per_request,
        }

    def prepare(self) -> None:
        """Fail fast on credentials before a build starts (skipped when a fetcher is injected)."""
        if self.fetch is None:
            initialize(self.source.high_volume)

    def _open(self) -> Any:
        with self._lock:
            if self._dataset is None:
                self.prepare()
                import ee

                if self.group == "imagery" and self.stacked:
                    image = imagery_image(self.source, self.period, self.index)
                    collection = ee.ImageCollection([image.select([b]).rename([STACKED]) for b in self.index])
                elif self.group == "imagery":
                    collection = ee.ImageCollection([imagery_image(self.source, self.period, self.variables)])
                elif self.group == EMBEDDINGS:
                    collection = embedding_collection(self.collection, self.period[0].year, self.grid)
                else:
                    collection = climate_collection(self.source, self.index, self.variables)
                retry = self.retry or RetryPolicy(self.source.max_retries, self.source.initial_backoff_s)
                semaphore = Throttle(self.source.max_concurrency).semaphore()
                fetcher = PixelFetcher(self.grid, semaphore, retry, self.fetch)
                self._dataset = _xee_dataset(collection, self.grid, self.variables, self.index, self.tile, fetcher)
            return self._dataset

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        dataset = self._open()

        def one(variable: str) -> np.ndarray:
            return np.asarray(dataset[variable].isel(y=rows, x=cols).values, dtype=np.float32)

        with ThreadPoolExecutor(max_workers=len(self.variables)) as pool:
            per_variable = list(pool.map(one, self.variables))  # each (time, h, w)
        stacked = np.stack(per_variable, axis=1)  # (time, variable, h, w)
        if self.group == "imagery" and not self.stacked:
            return stacked[0]
        return stacked[:, 0] if self.group == EMBEDDINGS or self.stacked else stacked

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_dataset"] = None
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def earthengine_imagery(catalog: LoadedCatalog, fetch: Fetch | None = None,
                       retry: RetryPolicy | None = None, stacked: bool = False) -> Layer:
    """The imagery layer; `fetch` replaces computePixels (tests, benchmarks), `retry` the catalog's policy.
    `stacked`: every band of a window in one request (the bands as the images of one variable, as the embedding's
    axes are), for windows around points; a cube build asks for one band at a time."""
    config = catalog.config
    source = config.imagery.source
    assert isinstance(source, EarthEngineSource)
    bands = list(config.imagery.bands or IMAGERY_BANDS)
    grid, period = config.imagery_grid, config.imagery.period
    if stacked:
        reader = EarthEngineReader("imagery", grid, source, [STACKED], bands, period, fetch, retry, stacked=True)
    else:
        reader = EarthEngineReader("imagery", grid, source, bands, [period[0]], period, fetch, retry)
    attrs = {"source": "earthengine", "collections": [source.landsat, source.terrain]}
    return Layer("imagery", grid, {"band": bands}, reader, attrs)


def earthengine_climate(catalog: LoadedCatalog, fetch: Fetch | None = None,
                        retry: RetryPolicy | None = None) -> Layer:
    """The monthly climate layer (TerraClimate)."""
    config = catalog.config
    climate = config.climate
    assert climate is not None and isinstance(climate.source, EarthEngineSource)
    grid, variables = config.climate_grid, list(climate.variables)
    assert grid is not None  # a catalog with a climate section has a climate grid
    reader = EarthEngineReader(
        "climate", grid, climate.source, variables, climate.months, config.imagery.period, fetch, retry
    )
    attrs = {"source": "earthengine", "collections": [climate.source.climate]}
    return Layer("climate", grid, {"time": climate.months, "variable": variables}, reader, attrs)


def earthengine_embeddings(catalog: LoadedCatalog, fetch: Fetch | None = None,
                           retry: RetryPolicy | None = None) -> Layer:
    """The embedding layer (`embeddings.source: earthengine`), throttled with the other Earth Engine layers."""
    config = catalog.config.embeddings
    grid = catalog.config.embeddings_grid
    assert config is not None and grid is not None
    year = (dt.date(config.year, 1, 1), dt.date(config.year, 12, 31))
    reader = EarthEngineReader(EMBEDDINGS, grid, config.earthengine_source(), ["embedding"], list(EMBEDDING_BANDS),
                               year, fetch, retry, config.collection)
    attrs = embeddings_attrs(catalog, collections=[config.collection])
    return Layer(EMBEDDINGS, grid, {"band": list(EMBEDDING_BANDS)}, reader, attrs)
