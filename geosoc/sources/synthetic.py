"""An offline procedural landscape: the embedded default source and the stand-in for Earth Engine.

Every value is a pure function of position (CRS coordinates), the CRS and a seed, so a pixel never depends on
chunking or on the window asked for, and a continental grid costs nothing until a window is read. A window is
computed in blocks of at most `BLOCK_PIXELS` pixels, so a read's working memory is bounded whatever its size.

The landscape has terrain, land-cover patches, field parcels whose tillage stripes have a contrast that
varies smoothly (visible only as texture across a patch), climate gradients with latitude, elevation and
season, and a hidden *true SOC* (g/kg): log-normal-ish and right-skewed like LUCAS (median about 20 g/kg,
tail to several hundred in wetlands), depending non-linearly on climate, precipitation seasonality,
land cover, clay, elevation and the parcel texture contrast.

One soil-forming latent is there for self-supervised learning to find: *drainage* (impeded drainage, a few km
across), which raises SOC and which both modalities carry, neither plainly. The climate grid shows it in soil
moisture and the drought index of its 4 km cells; the imagery shows it only as the density of small wet hollows
(90 m, darker and greener) across a patch, so that a pixel or a 5 x 5 window says little and a patch says it
well. A model has to learn to read hollow density from labels, which a small survey has few of; contrastive
pretraining on unlabelled places can learn it by matching patches to their climate cells.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyproj import Transformer

from geosoc.catalog import CLIMATE_VARIABLES, IMAGERY_BANDS, INDICES
from geosoc.grid import Grid
from geosoc.sources.layers import Layer
from geosoc.sources.noise import fbm, hash_uniform, key_of, lattice_interp, value_noise

WATER, WETLAND, FOREST, GRASSLAND, CROPLAND, BARE = range(6)  # land-cover codes

_SOC_MEDIAN_OFFSET = 0.11  # centres log SOC so that the median over a continent is about 20 g/kg
_LC_SOC_EFFECT = np.array([np.nan, 1.7, 0.45, 0.25, -0.35, -0.9])
_FRACTION_COVER = np.array([0.0, 0.6, 0.85, 0.6, 0.22, 0.03])
_SOIL_SPECTRUM = np.array([0.07, 0.09, 0.13, 0.19, 0.25, 0.33, 0.28])
_VEGETATION_SPECTRUM = np.array([0.03, 0.04, 0.075, 0.045, 0.42, 0.22, 0.10])
_PARCEL_SIZE = 420.0  # m
_STRIPE_PERIOD = 150.0  # m: about five 30 m pixels, so a single pixel cannot tell stripe contrast
_DRAINAGE_SCALE = 6e3  # m: larger than a climate cell (4 km), so that the climate grid resolves it
_HOLLOW_SIZE = 90.0  # m: three 30 m pixels; a 32 px patch holds about a hundred hollow sites
_LAT_LATTICE = 20_000.0
BLOCK_PIXELS = 1 << 14  # pixels of a window computed at once: about 7 MiB of float64 intermediates for imagery

_transformers = threading.local()


def _latitude(x: np.ndarray, y: np.ndarray, crs: str) -> np.ndarray:
    """Latitude, interpolated from a 20 km lattice of exact values (smooth, cheap, position-deterministic)."""
    cache = _transformers.__dict__.setdefault("by_crs", {})
    if crs not in cache:
        cache[crs] = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    to_lonlat = cache[crs]

    def nodes(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
        ix, iy = np.broadcast_arrays(ix, iy)
        _, lat = to_lonlat.transform(ix * _LAT_LATTICE, iy * _LAT_LATTICE)
        return np.nan_to_num(np.asarray(lat, dtype=np.float64), nan=0.0)

    return lattice_interp(x, y, _LAT_LATTICE, nodes)


@dataclass(frozen=True)
class Landscape:
    """The synthetic world for one seed; `fields` evaluates everything at points or on a grid window.

    `block_pixels` bounds how many pixels of a window `imagery`, `true_soc` and `climate` compute at once (their
    memory); it changes no value, since every pixel is a function of its position alone.
    """

    seed: int = 0
    block_pixels: int = BLOCK_PIXELS

    def _key(self, name: str) -> int:
        return key_of(self.seed, name)

    def normals(self, x: np.ndarray, y: np.ndarray, crs: str) -> dict[str, np.ndarray]:
        """Slowly varying terrain and climate normals (the inputs shared by imagery, climate and SOC)."""
        k = self._key
        lat = _latitude(x, y, crs)
        elevation = 150.0 + 1300.0 * np.clip(fbm(x, y, 60e3, 5, k("elev")) * 0.5 + 0.5, 0, 1) ** 2
        elevation = elevation + 40.0 * value_noise(x, y, 700.0, k("relief"))
        wet = np.clip(0.5 + 0.45 * fbm(x, y, 250e3, 3, k("wet")) + 0.12 * (elevation - 600) / 800, 0, 1)
        tmean = 27.0 - 0.42 * np.abs(lat) - 6.5 * elevation / 1000.0
        seasonality = np.clip(0.45 + 0.45 * fbm(x, y, 300e3, 2, k("season")), 0.0, 0.95)
        drainage = np.clip(0.5 + 0.9 * fbm(x, y, _DRAINAGE_SCALE, 2, k("drainage")), 0.0, 1.0)  # 1: impeded
        return {"lat": lat, "elevation": elevation, "wet": wet, "tmean": tmean, "seasonality": seasonality,
                "drainage": drainage}

    def fields(self, x: np.ndarray, y: np.ndarray, crs: str) -> dict[str, np.ndarray]:
        """Every per-pixel quantity: normals, soil properties, land cover, parcel texture and true SOC."""
        k = self._key
        f = self.normals(x, y, crs)
        f["clay"] = np.clip(0.28 + 0.2 * fbm(x, y, 25e3, 3, k("clay")), 0.03, 0.7)
        f["carbonate"] = np.clip(1.5 * fbm(x, y, 80e3, 2, k("carbonate")), 0.0, 1.0)
        f["iron"] = np.clip(0.5 + 0.5 * fbm(x, y, 15e3, 2, k("iron")), 0.0, 1.0)

        lakes = 0.7 * value_noise(x, y, 3e3, k("lakes")) + 0.3 * value_noise(x, y, 900.0, k("lakes2"))
        cover = fbm(x, y, 5e3, 3, k("cover")) + 0.35 * (f["elevation"] - 700) / 700
        land = np.full(lakes.shape, CROPLAND, dtype=np.int8)
        land[cover > -0.05] = GRASSLAND
        land[cover > 0.3] = FOREST
        land[(f["elevation"] > 1250) | ((f["wet"] < 0.2) & (cover < -0.4))] = BARE
        land[(lakes > 0.5) & (f["wet"] > 0.45)] = WETLAND
        land[lakes > 0.62] = WATER
        f["land_cover"] = land

        # Tillage/hedgerow texture: stripes whose direction and phase change per parcel and whose contrast
        # follows a smooth "mosaic" field. One pixel's value is ambiguous; a patch reveals the contrast.
        px = np.floor(x / _PARCEL_SIZE).astype(np.int64)
        py = np.floor(y / _PARCEL_SIZE).astype(np.int64)
        angle = np.pi * hash_uniform(px, py, k("parcel-angle"))
        phase = 2 * np.pi * hash_uniform(px, py, k("parcel-phase"))
        mosaic = np.clip(0.5 + 0.6 * fbm(x, y, 8e3, 2, k("mosaic")), 0.0, 1.0)
        along = x * np.cos(angle) + y * np.sin(angle)
        farmed = (land == CROPLAND) | (land == GRASSLAND)
        f["mosaic"] = mosaic
        f["texture"] = np.where(farmed, mosaic * np.sin(2 * np.pi * along / _STRIPE_PERIOD + phase), 0.0)
        # Wet hollows: each 90 m site is one with a probability that grows with impeded drainage.
        hx = np.floor(x / _HOLLOW_SIZE).astype(np.int64)
        hy = np.floor(y / _HOLLOW_SIZE).astype(np.int64)
        f["hollow"] = (land != WATER) & (hash_uniform(hx, hy, k("hollow")) < 0.05 + 0.45 * f["drainage"])
        f["soc"] = self._soc(f, land, farmed, x, y)
        return f

    def _soc(
        self, f: dict[str, np.ndarray], land: np.ndarray, farmed: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> np.ndarray:
        wz = (f["wet"] - 0.5) / 0.2
        tz = (f["tmean"] - 8.0) / 6.0
        cz = (f["clay"] - 0.28) / 0.12
        sz = (f["seasonality"] - 0.45) / 0.25
        ez = (f["elevation"] - 600.0) / 400.0
        z = (
            0.35 * wz
            - 0.3 * tz
            - 0.12 * wz * tz  # cold and wet: peat-like accumulation
            + 0.15 * np.tanh(cz) * (1 + 0.5 * wz)
            - 0.22 * sz  # strongly seasonal rain: dry summers, less carbon
            + 0.1 * ez
            + _LC_SOC_EFFECT[land]
            + np.where(farmed, 0.9 * (f["mosaic"] - 0.5), 0.0)  # hedgerows and field margins store carbon
            + 0.8 * (f["drainage"] - 0.5)  # waterlogging slows decomposition
            + 0.15 * value_noise(x, y, 2e3, self._key("soc-noise"))
        )
        return 20.0 * np.exp(0.85 * (z - _SOC_MEDIAN_OFFSET))

    def soc_at(self, x: np.ndarray, y: np.ndarray, crs: str) -> np.ndarray:
        """True SOC (g/kg) at points given in `crs`; NaN on water. For labelling synthetic samples."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return self.fields(x, y, crs)["soc"]

    def imagery(self, grid: Grid, rows: slice, cols: slice, bands: Sequence[str]) -> np.ndarray:
        """(band, rows, cols) float32 reflectances, indices and terrain; NaN on open water."""
        return self._in_blocks(rows, cols, (len(bands),), lambda r, c: self._imagery(grid, r, c, bands))

    def _imagery(self, grid: Grid, rows: slice, cols: slice, bands: Sequence[str]) -> np.ndarray:
        # One pixel of halo so that slope comes from neighbours that are themselves position-determined.
        x = grid.x_of(np.arange(cols.start - 1, cols.stop + 1))[None, :]
        y = grid.y_of(np.arange(rows.start - 1, rows.stop + 1))[:, None]
        f = self.fields(x, y, grid.crs)
        dz_dy, dz_dx = np.gradient(f["elevation"], grid.resolution)
        slope = np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))[1:-1, 1:-1]
        f = {name: value[1:-1, 1:-1] for name, value in f.items()}
        x, y = x[:, 1:-1], y[1:-1, :]

        land, texture = f["land_cover"], f["texture"]
        brightness = np.clip(
            1.25 - 0.22 * np.log(np.nan_to_num(f["soc"], nan=20.0) / 20.0) + 0.25 * f["carbonate"] - 0.1 * f["wet"],
            0.4,
            1.8,
        ) * (1 + 0.15 * texture)
        soil = _SOIL_SPECTRUM[:, None, None] * brightness
        soil[3] *= 1 + 0.3 * f["iron"]  # red: iron oxides
        soil[4] *= 1 - 0.12 * f["iron"]
        soil[6] *= 1 - 0.35 * f["clay"]  # SWIR2: clay hydroxyl absorption
        soil[2] *= 1 + 0.15 * f["carbonate"]
        soil *= np.where(f["hollow"], 0.75, 1.0)  # wet soil is darker
        crop_texture = 0.2 * np.where(land == CROPLAND, texture, 0)
        cover = np.clip(_FRACTION_COVER[land] * (0.6 + 0.5 * f["wet"]) + crop_texture + 0.15 * f["hollow"], 0, 0.95)
        sensor = 0.004 * value_noise(x, y, 30.0, self._key("sensor"))
        reflectance = (1 - cover) * soil + cover * _VEGETATION_SPECTRUM[:, None, None] + sensor
        b = {f"SR_B{i + 1}": reflectance[i] for i in range(7)}

        layers = {
            **b,
            **{name: (b[a] - b[c]) / (b[a] + b[c]) for name, (a, c) in INDICES.items()},
            "elevation": f["elevation"],
            "slope": slope,
        }
        out = np.stack([layers[name] for name in bands]).astype(np.float32)
        out[:, land == WATER] = np.nan
        return out

    def true_soc(self, grid: Grid, rows: slice, cols: slice) -> np.ndarray:
        """(rows, cols) float32 true SOC on a grid window; NaN on water."""
        return self._in_blocks(rows, cols, (), lambda r, c: self._true_soc(grid, r, c))

    def _true_soc(self, grid: Grid, rows: slice, cols: slice) -> np.ndarray:
        x = grid.x_of(np.arange(cols.start, cols.stop))[None, :]
        y = grid.y_of(np.arange(rows.start, rows.stop))[:, None]
        return self.fields(x, y, grid.crs)["soc"].astype(np.float32)

    def climate(
        self, grid: Grid, rows: slice, cols: slice, months: Sequence[dt.date], variables: Sequence[str]
    ) -> np.ndarray:
        """(time, variable, rows, cols) float32 monthly TerraClimate-like values at cell centres.

        Precipitation, snow water and runoff have genuine zeros (dry seasons, warm places).
        """

        def block(rows: slice, cols: slice) -> np.ndarray:
            x = grid.x_of(np.arange(cols.start, cols.stop))[None, :]
            y = grid.y_of(np.arange(rows.start, rows.stop))[:, None]
            return self._climate(x, y, grid.crs, months, variables)

        return self._in_blocks(rows, cols, (len(months), len(variables)), block)

    def _in_blocks(self, rows: slice, cols: slice, leading: tuple[int, ...],
                   compute: Callable[[slice, slice], np.ndarray]) -> np.ndarray:
        """(*leading, rows, cols) float32 filled block by block from `compute(block rows, block cols)`."""
        blocks = list(_blocks(rows, cols, self.block_pixels))
        if len(blocks) == 1:  # no copy
            return compute(rows, cols)
        out = np.empty((*leading, max(0, rows.stop - rows.start), max(0, cols.stop - cols.start)), np.float32)
        for r, c in blocks:
            out[..., r.start - rows.start:r.stop - rows.start, c.start - cols.start:c.stop - cols.start] = compute(r, c)
        return out

    def climate_at(self, x: np.ndarray, y: np.ndarray, crs: str, months: Sequence[dt.date],
                   variables: Sequence[str]) -> np.ndarray:
        """(points, time, variable) float32 monthly values at points given in `crs` (for survey-like tables
        whose series come from elsewhere: the same values a climate cell centred on the point would hold)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return np.moveaxis(self._climate(x, y, crs, months, variables), -1, 0)

    def _climate(self, x: np.ndarray, y: np.ndarray, crs: str, months: Sequence[dt.date],
                 variables: Sequence[str]) -> np.ndarray:
        """(time, variable, *shape of x and y broadcast) float32."""
        n = self.normals(x, y, crs)
        lat, wet, tmean, season, drainage = n["lat"], n["wet"], n["tmean"], n["seasonality"], n["drainage"]
        hemisphere = np.where(lat >= 0, 1.0, -1.0)
        amplitude = 6.0 + 0.2 * np.abs(lat)
        range_ = 8.0 + 6.0 * (1.0 - wet)
        mean_pr = 15.0 + 110.0 * wet
        wind = 2.5 + 1.5 * (value_noise(x, y, 150e3, self._key("wind")) * 0.5 + 0.5)
        out = np.empty((len(months), len(variables), *np.broadcast_shapes(x.shape, y.shape)), np.float32)
        for t, month in enumerate(months):
            step = month.year * 12 + month.month - 1
            summer = hemisphere * np.cos(2 * np.pi * (month.month - 7) / 12)  # +1 in local midsummer
            temp_anomaly = 1.2 * value_noise(x, y, 400e3, self._key(f"t-anomaly-{step}"))
            pr_anomaly = 0.35 * value_noise(x, y, 300e3, self._key(f"pr-anomaly-{step}"))
            t_mean = tmean + amplitude * summer + temp_anomaly
            tmmx, tmmn = t_mean + range_ / 2, t_mean - range_ / 2
            pr = np.maximum(0.0, mean_pr * (1 - 1.6 * season * summer) * (1 + pr_anomaly))
            srad = np.maximum(20.0, 190.0 - 2.2 * np.abs(lat) + (90.0 + 1.2 * np.abs(lat)) * summer)
            pet = np.maximum(0.0, (t_mean + 5.0) * 3.2 * srad / 200.0)
            soil = np.clip(40.0 + 260.0 * wet + 120.0 * (drainage - 0.5) - 0.3 * (pet - pr), 0.0, 400.0)
            aet = np.minimum(pet, pr + 0.2 * soil)
            vap = _saturation_vapour_pressure(tmmn) * (0.7 + 0.3 * wet)
            values = {
                "aet": aet,
                "def": pet - aet,
                "pdsi": np.clip((pr - pet) / 40.0 + 2.0 * (wet - 0.5) + 1.5 * (drainage - 0.5), -8.0, 8.0),
                "pet": pet,
                "pr": pr,
                "ro": np.maximum(0.0, pr - pet) * (0.3 + 0.4 * wet),
                "soil": soil,
                "srad": srad,
                "swe": np.maximum(0.0, -t_mean) * 8.0 * mean_pr / 60.0,
                "tmmn": tmmn,
                "tmmx": tmmx,
                "vap": vap,
                "vpd": np.maximum(
                    0.0, (_saturation_vapour_pressure(tmmx) + _saturation_vapour_pressure(tmmn)) / 2 - vap),
                "vs": wind + 0.6 * np.abs(summer),
            }
            for v, name in enumerate(variables):
                out[t, v] = values[name]
        return out


def _blocks(rows: slice, cols: slice, pixels: int) -> Iterator[tuple[slice, slice]]:
    """Blocks of a window of at most `pixels` each: bands of whole rows, or pieces of one row where a row is
    longer than `pixels`."""
    width = max(1, min(cols.stop - cols.start, pixels))
    height = max(1, pixels // width)
    for r in range(rows.start, rows.stop, height):
        for c in range(cols.start, cols.stop, width):
            yield slice(r, min(r + height, rows.stop)), slice(c, min(c + width, cols.stop))


def _saturation_vapour_pressure(temp_c: np.ndarray) -> np.ndarray:
    """kPa, Tetens formula."""
    return 0.6108 * np.exp(17.27 * temp_c / (temp_c + 237.3))


@dataclass(frozen=True)
class _ImageryReader:
    window_invariant = True  # a pure function of position
    landscape: Landscape
    grid: Grid
    bands: tuple[str, ...]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return self.landscape.imagery(self.grid, rows, cols, self.bands)


@dataclass(frozen=True)
class _ClimateReader:
    window_invariant = True
    landscape: Landscape
    grid: Grid
    months: tuple[dt.date, ...]
    variables: tuple[str, ...]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return self.landscape.climate(self.grid, rows, cols, self.months, self.variables)


def synthetic_imagery(grid: Grid, seed: int, bands: Sequence[str] | None = None) -> Layer:
    bands = tuple(bands or IMAGERY_BANDS)
    reader = _ImageryReader(Landscape(seed), grid, bands)
    return Layer("imagery", grid, {"band": list(bands)}, reader, {"source": "synthetic", "seed": seed})


def synthetic_climate(
    grid: Grid, seed: int, months: Sequence[dt.date], variables: Sequence[str] = CLIMATE_VARIABLES
) -> Layer:
    reader = _ClimateReader(Landscape(seed), grid, tuple(months), tuple(variables))
    axes: dict[str, list[Any]] = {"time": list(months), "variable": list(variables)}
    return Layer("climate", grid, axes, reader, {"source": "synthetic", "seed": seed})


@dataclass(frozen=True)
class _SocReader:
    window_invariant = True
    landscape: Landscape
    grid: Grid

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return self.landscape.true_soc(self.grid, rows, cols)[None]


def true_soc_layer(grid: Grid, seed: int) -> Layer:
    """The hidden SOC map as a layer (one band) for evaluating maps against the truth."""
    return Layer("soc", grid, {"band": ["soc"]}, _SocReader(Landscape(seed), grid), {"units": "g/kg"})
