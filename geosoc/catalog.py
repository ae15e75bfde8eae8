"""YAML catalogs -> typed, validated configuration for every pipeline step.

One catalog per region drives cube building, sampling, training and prediction. Validation happens on
load, and every message names the file, the key, the value found and what is allowed.
"""

from __future__ import annotations

import datetime as dt
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from geosoc.errors import CatalogError
from geosoc.grid import Grid

CATALOG_DIR = Path(__file__).parent / "catalogs"

LANDSAT_BANDS = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7")
INDICES = {  # the paper's spectral indices, each the normalised difference (a - b) / (a + b) of two bands
    "clay": ("SR_B6", "SR_B7"),
    "ferrous": ("SR_B6", "SR_B5"),
    "carbonate": ("SR_B4", "SR_B3"),
    "rock_outcrop": ("SR_B6", "SR_B3"),
    "ndvi": ("SR_B5", "SR_B4"),
}
TERRAIN = ("elevation", "slope")
IMAGERY_BANDS = LANDSAT_BANDS + tuple(INDICES) + TERRAIN
CLIMATE_VARIABLES = (
    "aet", "def", "pdsi", "pet", "pr", "ro", "soil", "srad", "swe", "tmmn", "tmmx", "vap", "vpd", "vs",
)  # fmt: skip
SOURCE_KINDS = ("synthetic", "earthengine", "raster")
# AlphaEarth Foundations annual Satellite Embedding: 64 axes of a unit vector per 10 m pixel, 2017 onwards.
EMBEDDING_BANDS = tuple(f"A{i:02d}" for i in range(64))
EMBEDDING_SOURCES = ("earthengine", "cog", "synthetic")
AEF_COLLECTION = "GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL"
AEF_COG_URL = "gs://alphaearth_foundations/satellite_embedding/v1/annual"
AEF_FIRST_YEAR = 2017


class _Section(BaseModel):
    """Catalog section: immutable, and unknown keys are errors that list the allowed ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                raise ValueError(
                    f"unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(cls.model_fields)}"
                )
        return data


def _parse_crs(value: str) -> str:
    try:
        CRS.from_user_input(value)
    except CRSError as err:
        raise ValueError(f"{value!r} is not a CRS pyproj understands (e.g. 'EPSG:3035')") from err
    return value


class RegionConfig(_Section):
    name: str
    crs: str
    bounds: tuple[float, float, float, float] = Field(description="xmin, ymin, xmax, ymax in `crs` units")
    mask: str | None = None

    _check_crs = field_validator("crs")(_parse_crs)

    @model_validator(mode="after")
    def _bounds_inside_crs_area(self) -> RegionConfig:
        xmin, ymin, xmax, ymax = self.bounds
        if not (xmin < xmax and ymin < ymax):
            raise ValueError(f"bounds {list(self.bounds)} must be [xmin, ymin, xmax, ymax] with min < max")
        check_bounds_in_crs_area(self.crs, self.bounds)
        return self


def check_bounds_in_crs_area(crs: str, bounds: tuple[float, float, float, float]) -> None:
    """Reject bounds whose centre lies outside the CRS's area of use (e.g. degrees given for metres)."""
    area = CRS.from_user_input(crs).area_of_use
    if area is None:
        return
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    margin = 1.0
    inside = (
        area.west - margin <= lon <= area.east + margin and area.south - margin <= lat <= area.north + margin
    )
    if not inside:
        raise ValueError(
            f"bounds {list(bounds)} are centred at lon {lon:.3f}, lat {lat:.3f}, outside the area of use of "
            f"{crs} ({area.name}: lon {area.west}..{area.east}, lat {area.south}..{area.north}); "
            f"bounds are in {crs} units, not degrees"
        )


class SyntheticSource(_Section):
    kind: Literal["synthetic"]
    seed: int = 0


class EarthEngineSource(_Section):
    kind: Literal["earthengine"]
    landsat: str = "LANDSAT/LC08/C02/T1_L2"
    terrain: str = "USGS/SRTMGL1_003"
    climate: str = "IDAHO_EPSCOR/TERRACLIMATE"
    max_concurrency: int = Field(40, ge=1, le=200, description="requests in flight for the whole build")
    max_retries: int = Field(8, ge=0, le=20, description="per request, on 429/5xx/timeouts")
    initial_backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles, with full jitter")
    seconds_per_request: float = Field(2.0, gt=0, description="assumed in --dry-run duration estimates")
    high_volume: bool = Field(False, description="use the high-volume endpoint (for automated, batch use)")


class RasterFile(_Section):
    path: str
    bands: list[str] | None = None
    crs: str | None = None
    resampling: Literal["nearest", "bilinear", "cubic", "average", "mode"] = "nearest"
    nodata: float | None = None

    @field_validator("crs")
    @classmethod
    def _check_crs(cls, value: str | None) -> str | None:
        return None if value is None else _parse_crs(value)


class RasterSource(_Section):
    kind: Literal["raster"]
    files: list[RasterFile] = Field(min_length=1)


ImagerySource = Annotated[SyntheticSource | EarthEngineSource | RasterSource, Field(discriminator="kind")]
ClimateSource = Annotated[SyntheticSource | EarthEngineSource, Field(discriminator="kind")]


class ImageryConfig(_Section):
    resolution: float = Field(gt=0)
    chunk: int = Field(512, ge=16, le=8192)
    source: ImagerySource
    bands: list[str] | None = Field(None, description="default: every band the source offers")
    period: tuple[dt.date, dt.date] = (dt.date(2015, 1, 1), dt.date(2015, 12, 31))

    @model_validator(mode="after")
    def _check(self) -> ImageryConfig:
        if self.period[0] > self.period[1]:
            raise ValueError(f"period {[str(d) for d in self.period]} ends before it starts")
        if self.bands is not None and not isinstance(self.source, RasterSource):
            unknown = [b for b in self.bands if b not in IMAGERY_BANDS]
            if unknown:
                raise ValueError(f"bands {unknown} unknown; allowed: {', '.join(IMAGERY_BANDS)}")
        return self


def _month(value: Any) -> str:
    text = str(value)
    try:
        dt.datetime.strptime(text, "%Y-%m")
    except ValueError as err:
        raise ValueError(f"{text!r} is not a month written YYYY-MM") from err
    return text


class ClimateConfig(_Section):
    resolution: float = Field(gt=0)
    chunk: int = Field(64, ge=1, le=4096)
    source: ClimateSource
    variables: list[str] = Field(default_factory=lambda: list(CLIMATE_VARIABLES), min_length=1)
    start: str = "2010-01"
    end: str = "2015-01"

    _check_months = field_validator("start", "end", mode="before")(_month)

    @field_validator("variables")
    @classmethod
    def _known_variables(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in CLIMATE_VARIABLES]
        if unknown:
            raise ValueError(f"variables {unknown} unknown; allowed: {', '.join(CLIMATE_VARIABLES)}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> ClimateConfig:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    @property
    def months(self) -> list[dt.date]:
        """First day of every month from start to end inclusive."""
        year, month = map(int, self.start.split("-"))
        last = tuple(map(int, self.end.split("-")))
        out = []
        while (year, month) <= last:
            out.append(dt.date(year, month, 1))
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return out


_COG_ONLY = ("url",)
_EARTHENGINE_ONLY = ("collection", "max_concurrency", "max_retries", "initial_backoff_s", "seconds_per_request",
                     "high_volume")
_SYNTHETIC_ONLY = ("seed",)
_KEYS_OF = {"cog": _COG_ONLY, "earthengine": _EARTHENGINE_ONLY, "synthetic": _SYNTHETIC_ONLY}


class EmbeddingsConfig(_Section):
    """The AlphaEarth Foundations Satellite Embedding of one year, from Earth Engine or from the public COGs,
    averaged from 10 m onto its own grid (default: the imagery's) and re-normalised to unit length. `synthetic`
    (the demo's): int8 COGs in the dataset's layout made from the synthetic landscape, read back as `cog` is."""

    source: Literal["earthengine", "cog", "synthetic"]
    year: int = Field(ge=AEF_FIRST_YEAR, description="the annual embedding to use (2017 onwards)")
    resolution: float | None = Field(None, gt=0, description="CRS units; default: the imagery's")
    chunk: int | None = Field(None, ge=16, le=8192, description="pixels per chunk side; default: the imagery's")
    url: str = Field(AEF_COG_URL, min_length=1, description="cog: the folder holding <year>/<UTM zone>/*.tiff "
                     "(any fsspec URL, or a path relative to the catalog)")
    collection: str = AEF_COLLECTION
    max_concurrency: int = Field(40, ge=1, le=200, description="requests in flight for the whole build")
    max_retries: int = Field(8, ge=0, le=20, description="per request, on 429/5xx/timeouts")
    initial_backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles, with full jitter")
    seconds_per_request: float = Field(2.0, gt=0, description="assumed in --dry-run duration estimates")
    high_volume: bool = Field(False, description="use the high-volume endpoint (for automated, batch use)")
    seed: int = Field(0, description="synthetic: the landscape the vectors are made from (the imagery's seed)")

    @model_validator(mode="after")
    def _keys_of_its_source(self) -> EmbeddingsConfig:
        for owner, keys in _KEYS_OF.items():
            misplaced = [key for key in keys if key in self.model_fields_set] if owner != self.source else []
            if misplaced:
                verb = "applies" if len(misplaced) == 1 else "apply"
                raise ValueError(f"{', '.join(misplaced)} {verb} only to source {owner!r}, not {self.source!r}")
        return self

    def earthengine_source(self) -> EarthEngineSource:
        """The request settings (throttle, retries, endpoint) as the other Earth Engine layers take them."""
        return EarthEngineSource(
            kind="earthengine", max_concurrency=self.max_concurrency, max_retries=self.max_retries,
            initial_backoff_s=self.initial_backoff_s, seconds_per_request=self.seconds_per_request,
            high_volume=self.high_volume)


class SamplingConfig(_Section):
    patch_size: int = Field(64, ge=1, le=1024)
    unlabelled: int = Field(10_000, ge=0)
    fold_block_size: float = Field(50_000, gt=0, description="side of spatial CV blocks, CRS units")
    folds: int = Field(5, ge=2)
    max_nodata: float = Field(1.0, ge=0, le=1, description="a patch with a larger fraction of pixels without data "
                              "is dropped (one without data at its centre always is); default 1: kept, the network "
                              "sees which pixels are missing")
    depth: str | None = Field(None, description="the soil layer the samples measure, e.g. '0-20 cm': the map "
                                                "predicts that layer, and its title and STAC item say so")
    min_spacing: float = Field(0, ge=0, description="random locations (`geosoc sample --random`) at least this far "
                               "apart, CRS units (--min-spacing overrides it)")


# Sizes left unset (None) are chosen from the number of samples the network learns from, when it is built:
# geosoc.learn.sizing (small on a survey, the paper's size on a continental sample). Set values always win.
BY_DATA = "default: from the data size (geosoc.learn.sizing)"


class ImageEncoderConfig(_Section):
    patch: int = Field(8, ge=1)
    dim: int | None = Field(None, ge=1, description=BY_DATA)
    depth: int | None = Field(None, ge=1, description=BY_DATA)
    heads: int | None = Field(None, ge=1, description=BY_DATA)
    centre_pixel: bool = Field(True, description="the head also reads each band's centre pixel and the mean of "
                               "the 5 x 5 px around it, beside the ViT's embedding")


class ClimateEncoderConfig(_Section):
    dim: int | None = Field(None, ge=1, description=BY_DATA)
    layers: int | None = Field(None, ge=1, description=BY_DATA)
    heads: int | None = Field(None, ge=1, description=BY_DATA)
    feedforward: int | None = Field(None, ge=1, description=BY_DATA)


class ModelConfig(_Section):
    image: ImageEncoderConfig = ImageEncoderConfig()
    climate: ClimateEncoderConfig = ClimateEncoderConfig()
    embedding: int | None = Field(None, ge=1, description=BY_DATA)
    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95])


class StageConfig(_Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(1e-4, gt=0)
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share held out to pick the best epoch; fine-tuning's also calibrates the "
        "interval: whole spatial blocks, at least 19 samples and at most half")


class PretrainConfig(StageConfig):
    temperature: float = Field(0.5, gt=0)


class FinetuneConfig(StageConfig):
    # Measured on real surveys (Edgeroi and others): 1e-3 converges by ~epoch 15 where 1e-4 still improves at 60.
    learning_rate: float = Field(1e-3, gt=0)
    log_target: bool = True
    patience: int = Field(10, ge=1, description="epochs without validation improvement before stopping")
    seeds: int = Field(1, ge=1, le=20, description="ensemble members, each trained with its own seed on the same "
                       "validation blocks (or parts of them: validation_groups); their quantiles are averaged, and "
                       "the average calibrated as one")
    validation_groups: int = Field(1, ge=1, le=20, description="an ensemble's members take turns among this many "
                                   "disjoint validation parts (at most one per member); each part is scored by "
                                   "the members that held it out, so the calibration has this many times the "
                                   "samples")


class TrainingConfig(_Section):
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    seed: int = 0


class PredictConfig(_Section):
    resolution: float = Field(1000, gt=0)
    model: str = Field("finetune", min_length=1, description="under the region's models/ (finetune, rf, gbm, qrf) "
                                                             "or a URL")
    max_actors: int | None = Field(None, ge=1, description="Ray maps: actors to ask for (one GPU each on a GPU "
                                   "cluster; an autoscaler brings the nodes); default: what the cluster holds")


class Catalog(_Section):
    region: RegionConfig
    imagery: ImageryConfig
    climate: ClimateConfig | None = None
    embeddings: EmbeddingsConfig | None = None
    sampling: SamplingConfig = SamplingConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    predict: PredictConfig = PredictConfig()

    @cached_property
    def imagery_grid(self) -> Grid:
        return Grid.from_bounds(
            self.region.crs, self.region.bounds, self.imagery.resolution, self.imagery.chunk
        )

    @cached_property
    def climate_grid(self) -> Grid | None:
        if self.climate is None:
            return None
        return self.imagery_grid.with_resolution(self.climate.resolution, self.climate.chunk)

    @cached_property
    def embeddings_grid(self) -> Grid | None:
        """The embeddings' grid: the imagery's unless the section sets its own resolution or chunk."""
        if self.embeddings is None:
            return None
        resolution = self.embeddings.resolution or self.imagery.resolution
        chunk = self.embeddings.chunk or self.imagery.chunk
        if resolution == self.imagery.resolution and chunk == self.imagery.chunk:
            return self.imagery_grid
        return self.imagery_grid.with_resolution(resolution, chunk)


class LoadedCatalog(BaseModel):
    """A validated catalog with where it came from: the text as written travels into the cube's attrs."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    config: Catalog
    path: Path
    text: str

    def resolve(self, relative: str) -> str:
        """A path in the catalog, made absolute against the catalog's own folder (URLs pass through)."""
        if "://" in relative or os.path.isabs(relative):
            return relative
        return str((self.path.resolve().parent / relative).resolve())


def known_regions() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently:
    a catalog with `training:` twice would lose half of its settings without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    """A catalog's YAML text as Python data; yaml.YAMLError (with the line) for bad syntax or a repeated key."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_catalog(text: str) -> Catalog:
    """A catalog from text that was validated when it was written (a Ray job's copy, a cube's attributes)."""
    return Catalog.model_validate(_parse_yaml(text))


def catalog_path(region: str) -> Path:
    path = CATALOG_DIR / f"{region}.yaml"
    if not path.is_file():
        raise CatalogError(
            f"unknown region {region!r}: no catalog {path.name}; known regions: {', '.join(known_regions())} "
            "(or pass --catalog PATH)"
        )
    return path


def load_catalog(
    region: str | None = None,
    path: str | os.PathLike[str] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
) -> LoadedCatalog:
    """Read and validate a catalog by region name or file; `bounds` overrides the region's bounds."""
    if path is None:
        if region is None:
            raise CatalogError("name a region (--region) or a catalog file (--catalog)")
        path = catalog_path(region)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise CatalogError(f"{path}: cannot read catalog: {err.strerror}") from err
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err)
        raise CatalogError(f"{path}: not valid YAML{at}: {problem}") from err
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a mapping with keys region, imagery, ...; got {type(data).__name__}")
    if bounds is not None:
        data.setdefault("region", {})
        if isinstance(data["region"], dict):
            data["region"] = {**data["region"], "bounds": list(bounds)}
    try:
        config = Catalog.model_validate(data)
    except ValidationError as err:
        raise CatalogError(_describe(path, err)) from err
    if region is not None and config.region.name != region:
        raise CatalogError(f"{path}: region.name is {config.region.name!r}, expected {region!r}")
    return LoadedCatalog(config=config, path=path, text=text)


def _describe(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = _dotted(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_not_found":
            msg = f"missing key 'kind'; allowed kinds: {', '.join(SOURCE_KINDS)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] not in ("value_error", "union_tag_invalid") and "input" in e:
            got = e["input"]
            msg = f"{msg} (got {got!r})" if not isinstance(got, dict) else msg
        lines.append(f"{path}: {key or '(top level)'}: {msg}")
    return "\n".join(lines)


def _dotted(loc: tuple[Any, ...]) -> str:
    """('imagery', 'source', 'raster', 'files', 0, 'crs') -> 'imagery.source.files[0].crs'."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in SOURCE_KINDS and i > 0 and loc[i - 1] == "source":
            continue
        else:
            out += f".{part}" if out else str(part)
    return out
