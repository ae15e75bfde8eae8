"""Earth Engine covariates: expression graphs offline, request planning, and the real xee path through a
fault-injecting pixel fetcher."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ee = pytest.importorskip("ee")
pytest.importorskip("xee")

from geosoc.catalog import INDICES, EarthEngineSource, load_catalog  # noqa: E402
from geosoc.data.cube import build_cube, open_cube  # noqa: E402
from geosoc.errors import GeosocError  # noqa: E402
from geosoc.grid import Grid  # noqa: E402
from geosoc.sources import earthengine  # noqa: E402
from geosoc.sources.ee_fetch import EarthEngineRequestError, RetryPolicy  # noqa: E402
from geosoc.sources.ee_plan import (  # noqa: E402
    MAX_REQUEST_BANDS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_SIDE,
    TileShape,
    count_requests,
    plan_tile,
    window_requests,
    within_limits,
)
from geosoc.sources.raster import masked  # noqa: E402
from tests.ee_fake import fake_layers, initialize_offline  # noqa: E402
from tests.helpers import tiny_catalog_dict, western_half_mask  # noqa: E402


@pytest.fixture
def offline_ee():
    initialize_offline()
    yield
    ee.Reset()


def graph(obj) -> str:
    return json.dumps(ee.serializer.encode(obj, for_cloud_api=True))


# --- expressions ---------------------------------------------------------------------------------------


def test_imagery_expression(offline_ee) -> None:
    source = EarthEngineSource(kind="earthengine")
    text = graph(earthengine.imagery_image(source, (dt.date(2015, 1, 1), dt.date(2015, 12, 31)),
                                           list(earthengine.IMAGERY_BANDS)))
    assert '"LANDSAT/LC08/C02/T1_L2"' in text and '"USGS/SRTMGL1_003"' in text
    assert '"2015-01-01"' in text and '"2016-01-01"' in text  # whole period, end inclusive
    assert '"QA_PIXEL"' in text and '"Image.bitwiseAnd"' in text and '"constantValue": 62' in text  # bits 1-5
    assert '"Image.updateMask"' in text
    assert "2.75e-05" in text and '"constantValue": -0.2' in text
    assert '"Filter.calendarRange"' in text and '"month"' in text
    assert '"Image.unmask"' in text and '"ImageCollection.qualityMosaic"' in text and '"reduce.median"' in text
    assert '"Terrain.slope"' in text
    for a, b in INDICES.values():
        assert f'"{a}"' in text and f'"{b}"' in text
    assert text.count('"Image.normalizedDifference"') >= 6  # five indices and the bare-soil ranking
    for band in earthengine.IMAGERY_BANDS:
        assert f'"{band}"' in text


def test_winter_and_rest_of_year_filters(offline_ee) -> None:
    source = EarthEngineSource(kind="earthengine")
    encoded = ee.serializer.encode(
        earthengine.landsat_composite(source, dt.date(2015, 1, 1), dt.date(2015, 12, 31)), for_cloud_api=True
    )
    ranges = []

    def visit(node):
        if isinstance(node, dict):
            call = node.get("functionInvocationValue")
            if call and call["functionName"] == "Filter.calendarRange":
                args = call["arguments"]
                ranges.append((args["start"]["constantValue"], args["end"]["constantValue"]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(encoded)
    assert sorted(ranges) == [(3, 10), (11, 2)]  # winter Nov-Feb (wrapping), the rest Mar-Oct


def test_climate_expression_scales_and_keeps_zeros(offline_ee) -> None:
    source = EarthEngineSource(kind="earthengine")
    months = [dt.date(2010, 1, 1), dt.date(2010, 2, 1)]
    variables = ["pr", "tmmx", "vap", "pdsi", "swe"]
    text = graph(earthengine.climate_collection(source, months, variables))
    assert '"IDAHO_EPSCOR/TERRACLIMATE"' in text
    assert '"2010-01-01"' in text and '"2010-03-01"' in text
    assert '[1.0, 0.1, 0.001, 0.01, 1.0]' in text  # pr, tmmx, vap, pdsi, swe scale factors
    assert "Image.multiply" in text
    for masking in ('"Image.updateMask"', '"Image.mask"', '"Image.selfMask"', '"Image.neq"'):
        assert masking not in text  # a real zero (no rain, no snow) must stay zero


# --- request planning ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n_index=st.integers(1, 2000), height=st.integers(1, 40_000), width=st.integers(1, 40_000))
def test_planned_tile_is_within_limits(n_index: int, height: int, width: int) -> None:
    tile = plan_tile(n_index, height, width)
    assert within_limits(tile)
    assert tile.nbytes <= MAX_REQUEST_BYTES and tile.index <= MAX_REQUEST_BANDS
    assert tile.height <= min(height, MAX_REQUEST_SIDE) and tile.width <= min(width, MAX_REQUEST_SIDE)


def test_limits_count_the_mask_byte() -> None:
    assert TileShape(1, 3547, 3547).nbytes == 3547 * 3547 * 5
    assert not within_limits(TileShape(61 * 14, 128, 128))  # 70 MB with mask bytes
    assert within_limits(plan_tile(61 * 14, 128, 128))


@settings(max_examples=60, deadline=None)
@given(
    n_index=st.integers(1, 80), rows=st.integers(1, 300), cols=st.integers(1, 300),
    tile_index=st.integers(1, 30), tile_h=st.integers(1, 90), tile_w=st.integers(1, 90),
)
def test_requests_tile_a_window_exactly(n_index, rows, cols, tile_index, tile_h, tile_w) -> None:
    tile = TileShape(min(tile_index, n_index), tile_h, tile_w)
    cover = np.zeros((2, n_index, rows, cols), dtype=int)
    for request in window_requests(["a", "b"], n_index, slice(0, rows), slice(0, cols), tile):
        shape = request.shape
        assert shape.index <= tile.index and shape.height <= tile.height and shape.width <= tile.width
        cover["ab".index(request.variable), request.index, request.rows, request.cols] += 1
    assert (cover == 1).all()  # no gap, no overlap


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 400), width=st.integers(1, 400), chunk=st.integers(8, 128),
       n_index=st.integers(1, 70))
def test_count_requests_matches_enumeration(height, width, chunk, n_index) -> None:
    grid = Grid("EPSG:3035", 0.0, 0.0, 30.0, (height, width), (chunk, chunk))
    tile = TileShape(min(n_index, 25), max(1, chunk // 3), chunk)
    enumerated = sum(
        1 for w in grid.windows() for _ in window_requests(["v"], n_index, w.rows, w.cols, tile)
    )
    assert count_requests(grid, ["v"], n_index, tile) == enumerated


def test_europe_dry_run_plan() -> None:
    """Europe's chunks wholly at sea (31 % of the bounding box's 21,440) are neither requested nor written."""
    from geosoc.data.cube import plan_cube

    plan = plan_cube(load_catalog("europe"))
    imagery, climate = plan.layers[:2]  # then the embeddings (tests/test_embeddings.py)
    assert imagery.chunks + imagery.outside_chunks == 21_440 and 6_000 < imagery.outside_chunks < 7_500
    assert imagery.requests == imagery.chunks * 14 and imagery.requests_saved == imagery.outside_chunks * 14
    assert imagery.concurrency == 40
    assert imagery.request_bytes <= MAX_REQUEST_BYTES and climate.request_bytes <= MAX_REQUEST_BYTES
    assert climate.requests == 90 * 14 and climate.outside_chunks == 0  # the climate grid is not masked
    assert imagery.estimated_seconds == pytest.approx(imagery.requests * 2.0 / 40)


# --- the real xee path with an injected pixel fetcher ---------------------------------------------------


def ee_catalog(write_catalog, concurrency: int = 4) -> tuple:
    data = tiny_catalog_dict()
    data["imagery"]["source"] = {"kind": "earthengine", "max_concurrency": concurrency}
    data["climate"]["source"] = {"kind": "earthengine", "max_concurrency": concurrency}
    synthetic = load_catalog(path=write_catalog(tiny_catalog_dict(), name="synthetic.yaml"))
    return load_catalog(path=write_catalog(data, name="ee.yaml")), synthetic


def cube_arrays(url: str) -> dict[str, np.ndarray]:
    tree = open_cube(url)
    return {g: tree[g].to_dataset()["data"].values for g in ("imagery", "climate")}


@pytest.fixture
def synthetic_cube(tmp_path: Path, write_catalog) -> dict[str, np.ndarray]:
    _, synthetic = ee_catalog(write_catalog)
    return cube_arrays(build_cube(synthetic, str(tmp_path / "synthetic"), progress=False))


def test_xee_cube_equals_synthetic_cube(offline_ee, tmp_path, write_catalog, synthetic_cube) -> None:
    catalog, _ = ee_catalog(write_catalog)
    layers, fakes = fake_layers(catalog)
    url = build_cube(catalog, str(tmp_path / "ee"), layers=layers, progress=False)
    got = cube_arrays(url)
    for group in ("imagery", "climate"):
        np.testing.assert_array_equal(got[group], synthetic_cube[group])
    assert np.isnan(got["imagery"]).any()  # masked pixels came back as NaN through xee's unmask
    assert (got["climate"][:, 2] == 0).any()  # swe: genuine zeros survive
    # Exactly the planned requests were sent.
    assert fakes["imagery"].calls == layers[0].reader.requests() == 9 * 14
    assert fakes["climate"].calls == layers[1].reader.requests()


def test_masked_region_requests_only_chunks_inside_the_mask(offline_ee, tmp_path, write_catalog,
                                                           synthetic_cube) -> None:
    """A mask of the region's western half: the third of the chunks wholly outside (x >= 64 of 96 px) is never
    requested nor written and reads NaN; partly inside ones are requested once and masked; the plan counts the
    requests sent and those the mask saves; the completion record counts the chunks outside."""
    from geosoc.data.cube import plan_cube

    data = tiny_catalog_dict()
    data["region"]["mask"] = western_half_mask(tmp_path, data["region"]["bounds"])
    data["imagery"]["source"] = {"kind": "earthengine", "max_concurrency": 4}
    data["climate"]["source"] = {"kind": "earthengine", "max_concurrency": 4}
    catalog = load_catalog(path=write_catalog(data, name="masked.yaml"))
    layers, fakes = fake_layers(catalog)
    layers[0] = masked(layers[0], data["region"]["mask"])  # as open_layers masks the catalog's own
    imagery = plan_cube(catalog).layers[0]
    assert (imagery.chunks, imagery.outside_chunks) == (6, 3)
    assert (imagery.requests, imagery.requests_saved) == (6 * 14, 3 * 14)
    url = build_cube(catalog, str(tmp_path / "ee"), layers=layers, progress=False)
    assert fakes["imagery"].calls == imagery.requests  # the chunks at sea cost nothing
    got = cube_arrays(url)
    assert np.isnan(got["imagery"][:, :, 48:]).all()  # outside the mask: never written (the fill value) or masked
    np.testing.assert_array_equal(got["imagery"][:, :, :48], synthetic_cube["imagery"][:, :, :48])
    np.testing.assert_array_equal(got["climate"], synthetic_cube["climate"])
    assert open_cube(url).attrs["geosoc_chunks"]["imagery"] == {"chunks": 9, "complete": 6, "outside_mask": 3}


def test_transient_failures_are_retried(offline_ee, tmp_path, write_catalog, synthetic_cube) -> None:
    catalog, _ = ee_catalog(write_catalog, concurrency=3)
    layers, fakes = fake_layers(catalog, failure_rate=0.3)
    url = build_cube(catalog, str(tmp_path / "ee"), layers=layers, workers=4, progress=False)
    got = cube_arrays(url)
    for group in ("imagery", "climate"):
        np.testing.assert_array_equal(got[group], synthetic_cube[group])
    assert fakes["imagery"].failures > 20  # 429s, 503s and timeouts really happened
    assert 1 < fakes["imagery"].max_in_flight <= 3  # parallel, and never above the limit
    assert fakes["climate"].max_in_flight <= 3


def test_bad_request_fails_at_once_naming_it(offline_ee, tmp_path, write_catalog) -> None:
    catalog, _ = ee_catalog(write_catalog)
    layers, fakes = fake_layers(catalog, bad_variable="ndvi")
    with pytest.raises(EarthEngineRequestError) as info:
        build_cube(catalog, str(tmp_path / "ee"), layers=layers, workers=1, progress=False)
    message = str(info.value)
    assert "Earth Engine refused the request for variable 'ndvi'" in message
    assert re.search(r"rows \d+:\d+, cols \d+:\d+: HTTP 400", message)
    assert "did not match any bands" in message
    assert isinstance(info.value, GeosocError)
    assert fakes["imagery"].calls <= 14  # no retries of a 400


def test_gives_up_after_retries(offline_ee, tmp_path, write_catalog) -> None:
    catalog, _ = ee_catalog(write_catalog)
    layers, _ = fake_layers(catalog, failure_rate=1.0)
    for layer in layers:
        layer.reader.retry = RetryPolicy(max_retries=2, initial_delay=0.001)
    with pytest.raises(EarthEngineRequestError, match="after 3 attempts.*re-run the build to resume"):
        build_cube(catalog, str(tmp_path / "ee"), layers=layers, workers=1, progress=False)


def test_one_limit_across_dask_worker_processes(offline_ee, tmp_path, write_catalog, synthetic_cube) -> None:
    distributed = pytest.importorskip("distributed")
    from tests.ee_fake import initialize_offline
    from tests.helpers import REPO

    catalog, _ = ee_catalog(write_catalog, concurrency=2)
    layers, fakes = fake_layers(catalog)
    log = tmp_path / "intervals.txt"
    for fake in fakes.values():
        fake.interval_log, fake.latency = str(log), 0.01
    env = {"PYTHONPATH": str(REPO)}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None,
                                  env=env) as cluster, distributed.Client(cluster) as client:
        client.run(initialize_offline)
        url = build_cube(catalog, str(tmp_path / "ee"), layers=layers, client=client, progress=False)
    got = cube_arrays(url)
    for group in ("imagery", "climate"):
        np.testing.assert_array_equal(got[group], synthetic_cube[group])
    assert 1 < fakes["imagery"].max_overlap() <= 2


def test_reader_pickles_without_its_dataset(offline_ee, write_catalog) -> None:
    import pickle

    catalog, _ = ee_catalog(write_catalog)
    layers, _ = fake_layers(catalog)
    reader = layers[1].reader
    reader.read(slice(0, 2), slice(0, 2))
    clone = pickle.loads(pickle.dumps(copy.copy(reader)))
    assert clone._dataset is None
    np.testing.assert_array_equal(clone.read(slice(0, 2), slice(0, 2)), reader.read(slice(0, 2), slice(0, 2)))
