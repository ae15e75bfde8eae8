"""AlphaEarth embeddings as a cube group: the catalog section, the int8 COGs in the bucket's layout read through
the raster source, the Earth Engine path through a fake computePixels, and the two agreeing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from geosoc.catalog import EMBEDDING_BANDS, load_catalog
from geosoc.data.cube import build_cube, open_cube
from geosoc.errors import CatalogError, InputError
from geosoc.sources import embeddings
from geosoc.sources.aef_cog import utm_zones
from tests import aef_fake

QUANTISATION_TOLERANCE = 0.01  # per component: a de-quantisation step is 2 sqrt|v| / 127.5 (<= 0.0157)


def aef_catalog(write_catalog, source: str = "cog", **section: Any):
    data = {
        "region": {"name": "aef", "crs": "EPSG:3035", "bounds": aef_fake.REGION_BOUNDS},
        "imagery": {"resolution": 30, "chunk": 20, "source": {"kind": "synthetic", "seed": 7}, "bands": ["ndvi"]},
        "embeddings": {"source": source, "year": aef_fake.YEAR, **section},
    }
    return load_catalog(path=write_catalog(data, name=f"aef-{source}.yaml"))


@pytest.fixture(scope="module")
def cog_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return aef_fake.write_dataset(tmp_path_factory.mktemp("aef") / "satellite_embedding")


@pytest.fixture(scope="module")
def cog_cube(cog_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, np.ndarray]:
    import yaml

    folder = tmp_path_factory.mktemp("aef-cube")
    data = {
        "region": {"name": "aef", "crs": "EPSG:3035", "bounds": aef_fake.REGION_BOUNDS},
        "imagery": {"resolution": 30, "chunk": 20, "source": {"kind": "synthetic", "seed": 7}, "bands": ["ndvi"]},
        "embeddings": {"source": "cog", "year": aef_fake.YEAR, "url": str(cog_folder)},
    }
    (folder / "aef.yaml").write_text(yaml.safe_dump(data))
    catalog = load_catalog(path=folder / "aef.yaml")
    tree = open_cube(build_cube(catalog, str(folder / "root"), progress=False, workers=2))
    return tree, tree["embeddings"].to_dataset()["data"].values


def test_dequantisation_is_the_readmes() -> None:
    raw = np.array([-128, -127, -64, -1, 0, 1, 64, 127], np.int8)
    expected = ((raw / 127.5) ** 2) * np.sign(raw)  # the readme's NumPy expression
    got = embeddings.dequantise(raw)
    assert np.isnan(got[0]) and got.dtype == np.float32
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-6)
    assert -1 < got[1] < -0.99 and got[4] == 0


def test_catalog_section(write_catalog, tmp_path: Path) -> None:
    catalog = aef_catalog(write_catalog, url="cogs")
    config = catalog.config
    assert config.embeddings is not None and config.embeddings_grid == config.imagery_grid
    assert config.embeddings.collection == "GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL"
    coarse = aef_catalog(write_catalog, resolution=120, chunk=16).config.embeddings_grid
    assert coarse is not None and coarse.resolution == 120 and coarse.chunks == (16, 16)
    with pytest.raises(CatalogError, match=r"embeddings: max_concurrency applies only to source 'earthengine'"):
        aef_catalog(write_catalog, max_concurrency=4)
    with pytest.raises(CatalogError, match=r"embeddings: url applies only to source 'cog'"):
        aef_catalog(write_catalog, "earthengine", url="x")
    with pytest.raises(CatalogError, match=r"embeddings.year: .*greater than or equal to 2017"):
        aef_catalog(write_catalog, year=2016)


def test_zones_under_a_region() -> None:
    catalog = load_catalog("europe")
    zones = utm_zones(catalog.config.imagery_grid)
    assert "29N" in zones and "35N" in zones and not any(z.endswith("S") for z in zones)


def test_cog_cube_is_the_fields_cell_means(cog_cube) -> None:
    """Unit vectors, within the quantisation error of the field's own cell means on both sides of the UTM zone
    boundary and across the zone's two tiles (one stored bottom-up): no seam, no gap; the lake is no data."""
    tree, values = cog_cube
    data = tree["embeddings"].to_dataset()["data"]
    assert list(data.band.values) == list(EMBEDDING_BANDS) and data.dtype == np.float32
    assert data.rio.crs.to_epsg() == 3035
    height, width = values.shape[1:]
    truth = aef_fake.cell_means(_grid_of(tree), slice(0, height), slice(0, width))
    finite = np.isfinite(values[0])
    norm = np.sqrt((values[:, finite].astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_allclose(norm, 1.0, atol=1e-5)
    both = finite & np.isfinite(truth[0])
    assert np.abs(values[:, both] - truth[:, both]).max() < QUANTISATION_TOLERANCE
    # The lake: no data inside (its edge cells may hold the few valid pixels that reach into them), data
    # everywhere else, including along the zone boundary (lon 6 runs through the middle of the region).
    assert (finite == np.isfinite(truth[0]))[~_near_lake(tree)].all()
    assert not finite.all() and finite.mean() > 0.95
    lon = _lon_of(tree)
    assert lon.min() < 6.0 < lon.max()


def test_cog_cube_metadata(cog_cube, cog_folder: Path) -> None:
    tree, _ = cog_cube
    assert tree.attrs["attribution"] == [embeddings.ATTRIBUTION]
    attrs = tree["embeddings"].to_dataset()["data"].attrs
    assert attrs["attribution"] == embeddings.ATTRIBUTION and attrs["license"] == "CC-BY-4.0"
    assert attrs["year"] == aef_fake.YEAR and attrs["source"] == "cog" and attrs["url"] == str(cog_folder)


def test_no_data_is_left_out_not_averaged_in(cog_folder: Path, write_catalog) -> None:
    """Cells on the lake's edge mix valid and -128 pixels: their vectors are the valid pixels' direction (-128
    taken as a number would pull every component towards -1)."""
    catalog = aef_catalog(write_catalog, url=str(cog_folder))
    from geosoc.sources.from_catalog import open_layers

    layer = open_layers(catalog)[1]
    rows, cols = slice(16, 28), slice(10, 22)  # around the lake's south-west corner
    got = layer.reader.read(rows, cols)
    # the files of the year under the region: not 2021's, not the 32N file far to the north
    assert sorted(Path(f.url).name for f in layer.reader.files) == [
        "fake31a-0000000000-0000000000.tiff", "fake31a-0000000082-0000000000.tiff", "fake32a-0000000000-0000000000.tiff"]
    truth = aef_fake.cell_means(layer.grid, rows, cols)
    both = np.isfinite(got[0]) & np.isfinite(truth[0])
    assert np.isnan(got[0]).any() and both.sum() > 80
    assert np.abs(got[:, both] - truth[:, both]).max() < QUANTISATION_TOLERANCE


def test_fsspec_url(cog_folder: Path, write_catalog) -> None:
    """Any fsspec URL: the same files in a memory:// filesystem give the same window."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in cog_folder.rglob("*.tiff"):
        fs.pipe(f"/aef-test/{path.relative_to(cog_folder)}", path.read_bytes())
    local = open_layers_of(aef_catalog(write_catalog, url=str(cog_folder)))
    remote = open_layers_of(aef_catalog(write_catalog, url="memory://aef-test"))
    np.testing.assert_array_equal(remote.read(slice(0, 20), slice(10, 30)), local.read(slice(0, 20), slice(10, 30)))


def test_missing_year_names_the_folder(cog_folder: Path, write_catalog) -> None:
    reader = open_layers_of(aef_catalog(write_catalog, url=str(cog_folder), year=2019))
    with pytest.raises(InputError, match=r"/2019: no AlphaEarth COGs for UTM zones 31N, 32N"):
        reader.prepare()


def open_layers_of(catalog) -> Any:
    from geosoc.sources.from_catalog import open_layers

    return open_layers(catalog)[1].reader


def _grid_of(tree):
    from geosoc.data.cube import group_grid

    return group_grid(tree["embeddings"].to_dataset())


def _near_lake(tree) -> np.ndarray:
    """Cells within one cell of the lake's edge."""
    grid = _grid_of(tree)
    x, y = np.meshgrid(grid.x, grid.y)
    r = grid.resolution
    outer = (x > aef_fake.LAKE[0] - r) & (x < aef_fake.LAKE[2] + r) & (y > aef_fake.LAKE[1] - r) & (
        y < aef_fake.LAKE[3] + r)
    inner = (x > aef_fake.LAKE[0] + r) & (x < aef_fake.LAKE[2] - r) & (y > aef_fake.LAKE[1] + r) & (
        y < aef_fake.LAKE[3] - r)
    return outer & ~inner


def _lon_of(tree) -> np.ndarray:
    from pyproj import Transformer

    grid = _grid_of(tree)
    x, y = np.meshgrid(grid.x, grid.y)
    return Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(x, y)[0]


# --- Earth Engine: the expression offline, the real xee path through a fake computePixels ---------------------


@pytest.fixture
def offline_ee():
    ee = pytest.importorskip("ee")
    pytest.importorskip("xee")
    from tests.ee_fake import initialize_offline

    initialize_offline()
    yield ee
    ee.Reset()


def test_earthengine_expression(offline_ee, write_catalog) -> None:
    import json

    from geosoc.sources import earthengine

    grid = aef_catalog(write_catalog, "earthengine").config.embeddings_grid
    image = earthengine.embedding_image("GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL", 2022, grid)
    text = json.dumps(offline_ee.serializer.encode(image, for_cloud_api=True))
    assert '"GOOGLE/SATELLITE_EMBEDDING/V1/ANNUAL"' in text
    assert '"2022-01-01"' in text and '"2023-01-01"' in text  # the catalog's year, whole
    assert '"Image.reduceResolution"' in text and '"Reducer.mean"' in text and '"maxPixels": {"constantValue": 16}' in text
    assert '"Image.reproject"' in text and '"EPSG:3035"' in text and "4033800" in text  # onto the region grid
    assert '"ImageCollection.mosaic"' in text
    assert '"Image.pow"' in text and '"Reducer.sum"' in text and '"Image.sqrt"' in text and '"Image.divide"' in text
    assert '"A00"' in text and '"A63"' in text


def test_earthengine_cube_equals_cog_cube(offline_ee, write_catalog, tmp_path: Path, cog_cube) -> None:
    """The same cube from Earth Engine (a fake computePixels serving the field's cell means) as from the COGs,
    within the quantisation error; every axis of a window in one request, as planned."""
    from geosoc.sources.earthengine import earthengine_embeddings
    from geosoc.sources.from_catalog import open_layers
    from tests.ee_fake import FAST_RETRY

    catalog = aef_catalog(write_catalog, "earthengine", max_concurrency=3)
    grid = catalog.config.embeddings_grid
    fake = aef_fake.FakeEmbeddingEngine(grid)
    layer = earthengine_embeddings(catalog, fake, FAST_RETRY)
    url = build_cube(catalog, str(tmp_path / "ee"), layers=[open_layers(catalog)[0], layer], progress=False)
    got = open_cube(url)["embeddings"].to_dataset()["data"]
    assert list(got.band.values) == list(EMBEDDING_BANDS) and got.attrs["source"] == "earthengine"
    ee_values, cog_values = got.values, cog_cube[1]
    both = np.isfinite(ee_values[0]) & np.isfinite(cog_values[0])
    assert both.mean() > 0.9
    assert np.abs(ee_values[:, both] - cog_values[:, both]).max() < QUANTISATION_TOLERANCE
    norm = np.sqrt((ee_values[:, np.isfinite(ee_values[0])].astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_allclose(norm, 1.0, atol=1e-5)
    assert fake.calls == layer.reader.requests() == grid.n_chunks  # 64 axes x 20 x 20 px: one request a window
    assert layer.reader.plan()["concurrency"] == 3


def test_europe_dry_run_lists_the_embeddings() -> None:
    from geosoc.data.cube import plan_cube
    from geosoc.sources.ee_plan import MAX_REQUEST_BYTES

    plan = {layer.group: layer for layer in plan_cube(load_catalog("europe")).layers}
    layer = plan["embeddings"]
    assert layer.shape[0] == 64 and layer.requests and layer.concurrency == 40
    assert layer.request_bytes is not None and layer.request_bytes <= MAX_REQUEST_BYTES
    assert layer.requests == layer.chunks * 2  # 64 axes x 512 x 512 px is over 48 MiB: two requests a chunk


def test_maps_carry_the_attribution(cog_cube, tmp_path: Path) -> None:
    """A map made from a cube with embeddings says what the licence asks: in its attributes (from the cube),
    its COGs' metadata and its STAC item."""
    import rasterio
    import xarray as xr

    from geosoc.maps import export
    from geosoc.maps.inference import source_attribution

    tree, _ = cog_cube
    attrs = source_attribution(tree.encoding["source"])
    assert attrs == {"attribution": [embeddings.ATTRIBUTION]}
    values = np.linspace(5, 30, 16 * 16, dtype=np.float32).reshape(16, 16)
    ds = xr.Dataset({"soc_median": (("y", "x"), values, {"long_name": "median SOC", "units": "g/kg"})},
                    coords={"y": 2995000.0 - 30 * np.arange(16), "x": 4034000.0 + 30 * np.arange(16)}, attrs=attrs)
    ds = ds.rio.write_crs("EPSG:3035")
    tags = {"ATTRIBUTION": " ".join(export.attribution(ds))}
    cog = export.write_cog(ds["soc_median"], str(tmp_path / "soc_median.tif"), "EPSG:3035", ds.rio.transform(), tags)
    with rasterio.open(cog) as src:
        assert src.tags()["ATTRIBUTION"] == embeddings.ATTRIBUTION
    item = export.stac_item(ds, str(tmp_path), {"soc_median": "soc_median.tif"}, "geosoc-aef-soc")
    assert item["properties"]["geosoc:attribution"] == [embeddings.ATTRIBUTION]
    assert "geosoc:attribution" not in export.stac_item(ds.assign_attrs(attribution=[]), str(tmp_path), {},
                                                        "plain")["properties"]


# --- the demo's synthetic embedding: its COGs written on any fsspec root and read back as the real ones are --------


def _synthetic_reader(bounds: tuple[float, float, float, float], root: str) -> Any:
    from geosoc.sources.from_catalog import open_layers

    layers = open_layers(load_catalog("demo", None, bounds), root)
    return next(layer for layer in layers if layer.group == "embeddings").reader


def test_synthetic_cogs_on_any_fsspec_root(tmp_path: Path) -> None:
    """The same vectors from COGs written to a memory:// root (read back through GDAL's memory) as to a folder."""
    part = (4419990.0, 2809980.0, 4421910.0, 2811900.0)
    local, memory = _synthetic_reader(part, str(tmp_path)), _synthetic_reader(part, "memory://synthetic-aef")
    window = (slice(0, 32), slice(0, 32))
    got = memory.read(*window)
    np.testing.assert_array_equal(got, local.read(*window))
    assert np.isfinite(got).all()


def test_synthetic_cogs_of_one_part_do_not_serve_another(tmp_path: Path) -> None:
    """A build of a small part and then of a larger one at the same root: each gets COGs of its own extent (one
    set reused for both left the larger part's edges without data)."""
    small = (4419990.0, 2809980.0, 4421910.0, 2811900.0)
    large = (4419990.0, 2809980.0, 4423830.0, 2813820.0)
    first = _synthetic_reader(small, str(tmp_path))
    first.prepare()
    second = _synthetic_reader(large, str(tmp_path))
    assert second.url != first.url
    values = second.read(slice(0, second.grid.shape[0]), slice(0, second.grid.shape[1]))
    assert np.isfinite(values).all()
