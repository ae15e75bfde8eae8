"""A SampleSet straight from the sources equals cutting the same points from a built cube, cell for cell (synthetic,
COG/raster and Earth Engine through its fake); random locations stay inside the mask and apart; Earth Engine reads
are batched and counted; a killed run resumes where it stopped; the dry run costs the points from the catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

import geosoc.data.window_sources as window_sources
from geosoc.catalog import load_catalog
from geosoc.cli import app
from geosoc.data.cube import build_cube
from geosoc.data.from_source import plan_points, point_layers, sample_from_source
from geosoc.data.points import Points
from geosoc.data.sampling import open_sampleset, sample_points, staging_url
from geosoc.data.window_sources import LayerWindows, split_group, units
from tests.helpers import EDGEROI, tiny_catalog_dict, western_half_mask

PATCH = 8
EMBEDDINGS = {"source": "synthetic", "year": 2017, "seed": 7, "resolution": 60, "chunk": 16}


def catalog_dict(embeddings: bool = True, **kwargs: Any) -> dict[str, Any]:
    """The tiny synthetic region (96 x 96 px in 32 px chunks, a lake, climate) with a synthetic embedding (COGs)."""
    data = tiny_catalog_dict(**kwargs)
    data["sampling"] = {"patch_size": PATCH, "fold_block_size": 1000, "folds": 2}
    if embeddings:
        data["embeddings"] = dict(EMBEDDINGS)
    return data


def at_pixels(grid: Any, rows: list[int], cols: list[int]) -> Points:
    x, y = grid.x_of(np.array(cols)), grid.y_of(np.array(rows))
    n = len(rows)
    return Points(np.array([f"p{i}" for i in range(n)], dtype=object), x, y, x * 0, y * 0,
                  np.arange(n, dtype=np.float64) + 5, "g/kg", "test")


EDGES = ([40, 31, 32, 31, 63, 64, 2, 95, 50, 10, 12, 80], [40, 31, 32, 32, 64, 63, 50, 1, 95, 88, 5, 20])


def assert_same_sampleset(cube_route: str, source_route: str, by_id: bool = False) -> None:
    """Every array, coordinate, dtype and chunking equal (the routes' own attributes aside)."""
    a, b = open_sampleset(cube_route), open_sampleset(source_route)
    if by_id:
        a, b = a.sortby("sample_id"), b.sortby("sample_id")
    assert set(a.variables) == set(b.variables) and a.sizes == b.sizes
    for name in a.variables:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    raw_a, raw_b = xr.open_zarr(cube_route, consolidated=False), xr.open_zarr(source_route, consolidated=False)
    for name in raw_a.data_vars:
        assert raw_a[name].encoding["chunks"] == raw_b[name].encoding["chunks"], name
    own = {"cube", "route", "region", "created", "reads"}
    assert {k: v for k, v in a.attrs.items() if k not in own} == {k: v for k, v in b.attrs.items() if k not in own}


def both_routes(catalog: Any, root: Path, points: Points, layers: dict[str, Any] | None = None,
                cube_catalog: Any = None) -> tuple[str, str]:
    """The SampleSet of `points` cut from a built cube and read from the sources."""
    cube = build_cube(cube_catalog or catalog, str(root), progress=False)
    sampling = catalog.config.sampling
    a = sample_points(cube, points, str(root / "cube-route.zarr"), sampling.patch_size,
                      fold_block_size=sampling.fold_block_size, folds=sampling.folds)
    b = sample_from_source(catalog, str(root / "source-route.zarr"), points, root=str(root), layers=layers)
    assert a.samples == b.samples and a.dropped == b.dropped and a.mostly_nodata == b.mostly_nodata
    return a.url, b.url


@pytest.mark.parametrize("call_cost", [window_sources.CALL_COST_PX, 0])
def test_synthetic_source_equals_the_cube_cell_for_cell(tmp_path: Path, write_catalog, monkeypatch,
                                                         call_cost: int) -> None:
    """Chunk edges, region borders, the lake (a dropped point); windows of a chunk's points (the default cost)
    or one per point (a read costing nothing beside its pixels); the embedding's COGs read by chunk windows."""
    monkeypatch.setattr(window_sources, "CALL_COST_PX", call_cost)
    catalog = load_catalog(path=write_catalog(catalog_dict()))
    points = at_pixels(catalog.config.imagery_grid, *EDGES)
    reads: list[tuple[str, slice, slice]] = []
    real = LayerWindows.read

    def counting(self: LayerWindows, group: str, rows: slice, cols: slice) -> np.ndarray:
        reads.append((group, rows, cols))
        return real(self, group, rows, cols)

    monkeypatch.setattr(LayerWindows, "read", counting)
    a, b = both_routes(catalog, tmp_path, points)
    assert_same_sampleset(a, b)
    ds = open_sampleset(b)
    assert ds.attrs["has_climate"] and ds.attrs["has_embeddings"] and ds.attrs["route"] == "source"
    windows = [r for r in reads if r[0] == "imagery"]
    sides = {(w[1].stop - w[1].start, w[2].stop - w[2].start) for w in windows}
    if call_cost == 0:
        assert len(windows) == len(EDGES[0]) and sides == {(PATCH, PATCH)}  # one window a point, no more pixels
    else:
        assert len(windows) < len(EDGES[0])  # a chunk's points share a window


def test_split_group_reads_close_points_together_and_far_ones_apart() -> None:
    rows = np.array([10, 12, 14, 500, 900])
    cols = np.array([10, 11, 15, 500, 20])

    def cost(height: int, width: int) -> float:
        return 1000 + height * width

    parts = split_group(rows, cols, 8, cost)
    assert sorted(map(list, parts)) == [[0, 1, 2], [3], [4]]
    assert [list(p) for p in split_group(rows, cols, 8, lambda h, w: 1e12 + h * w)] == [[0, 1, 2, 3, 4]]


def raster_catalog(write_catalog, resampling: str, crs: str, bounds: list[float], resolution: float) -> Any:
    data = {
        "region": {"name": "edgeroi-part", "crs": crs, "bounds": bounds},
        "imagery": {"resolution": resolution, "chunk": 16, "source": {"kind": "raster", "files": [
            {"path": str(EDGEROI / "edgeroi_grids100m.tif"), "resampling": resampling}]}},
        "sampling": {"patch_size": PATCH, "fold_block_size": 1000, "folds": 2},
    }
    return load_catalog(path=write_catalog(data, name=f"{resampling}.yaml"))


@pytest.mark.parametrize("resampling, crs, bounds, resolution", [
    ("nearest", "EPSG:28355", [760000, 6655000, 765600, 6660600], 100),  # any window: nearest is window-invariant
    ("bilinear", "EPSG:3577", [1680300, -3403500, 1686060, -3397740], 90),  # by chunk windows, as the cube
])
def test_raster_source_equals_the_cube_cell_for_cell(tmp_path: Path, write_catalog, resampling: str, crs: str,
                                                     bounds: list[float], resolution: float) -> None:
    catalog = raster_catalog(write_catalog, resampling, crs, bounds, resolution)
    grid = catalog.config.imagery_grid
    layers = point_layers(catalog)
    assert LayerWindows(layers).splits("imagery") == (resampling == "nearest")
    rng = np.random.default_rng(4)
    rows, cols = rng.integers(-2, grid.height + 2, 25), rng.integers(-2, grid.width + 2, 25)
    rows[:4], cols[:4] = [15, 16, 31, 0], [15, 16, 47, 63]  # chunk edges and the border
    a, b = both_routes(catalog, tmp_path, at_pixels(grid, rows.tolist(), cols.tolist()))
    assert_same_sampleset(a, b)


@pytest.fixture
def offline_ee():
    ee = pytest.importorskip("ee")
    pytest.importorskip("xee")
    from tests.ee_fake import initialize_offline

    initialize_offline()
    yield
    ee.Reset()


def ee_catalogs(write_catalog, concurrency: int = 4) -> tuple[Any, Any]:
    """The tiny region from Earth Engine (its fake serves the synthetic landscape) and its synthetic twin."""
    data = catalog_dict(embeddings=False)
    twin = load_catalog(path=write_catalog(data, name="synthetic.yaml"))
    for section in ("imagery", "climate"):
        data[section]["source"] = {"kind": "earthengine", "max_concurrency": concurrency}
    return load_catalog(path=write_catalog(data, name="ee.yaml")), twin


def test_earthengine_source_equals_the_cube_and_batches_requests(offline_ee, tmp_path: Path, write_catalog) -> None:
    from tests.ee_fake import fake_layers

    catalog, twin = ee_catalogs(write_catalog)
    layers, fakes = fake_layers(catalog, stacked=True, failure_rate=0.2)
    by_group = {layer.group: layer for layer in layers}
    points = at_pixels(catalog.config.imagery_grid, *EDGES)
    plan = plan_points(catalog, "unused", points, layers=by_group)
    a, b = both_routes(catalog, tmp_path, points, layers=by_group, cube_catalog=twin)
    assert_same_sampleset(a, b)
    imagery, climate = plan.reads
    assert imagery.requests == imagery.windows < len(points)  # points share requests, every band in one
    assert fakes["imagery"].calls - fakes["imagery"].failures == imagery.requests
    assert fakes["climate"].calls - fakes["climate"].failures == climate.requests == climate.windows * 3
    assert fakes["imagery"].failures > 0  # retried, as a cube build is
    assert imagery.estimated_seconds == pytest.approx(imagery.requests * 2.0 / 4)


RESUMER = """
import json, sys
import geosoc.data.from_source as from_source
from geosoc.catalog import load_catalog
from tests.ee_fake import fake_layers, initialize_offline

from_source.FLUSH_BYTES = 1  # a record after every window
flush = from_source._Staged.flush

def flushing(self, **values):
    flush(self, **values)
    step("flush")

from_source._Staged.flush = flushing
initialize_offline()
catalog = load_catalog(path=sys.argv[1])
print("ready", flush=True)
layers, fakes = fake_layers(catalog, stacked=True)
fakes["imagery"].interval_log = sys.argv[3]
from_source.sample_from_source(catalog, sys.argv[2], n_random=int(sys.argv[4]), seed=3, kind="unlabelled",
                               layers={layer.group: layer for layer in layers})
"""


def test_killed_run_resumes_where_it_stopped(offline_ee, tmp_path: Path, write_catalog) -> None:
    """SIGKILL a random sampling run from Earth Engine (its fake) after a few recorded windows, then at a random
    moment later; the next run reads only the windows not yet recorded and writes the same SampleSet as a run
    never killed."""
    import random

    from tests.ee_fake import fake_layers
    from tests.helpers import RandomKiller

    catalog, _ = ee_catalogs(write_catalog)
    path = str(catalog.path)
    url, log = str(tmp_path / "killed.zarr"), tmp_path / "calls.log"
    n = 30
    args = [path, url, str(log), str(n)]
    rng = random.Random(5)
    with RandomKiller(RESUMER) as killer:
        killer.kill_at_step(args, rng.randint(2, 5))
        killer.kill_after_step(args, rng.randint(3, 8), rng.uniform(0, 0.05))
    assert not Path(url).exists() and Path(staging_url(url)).exists()
    import zarr

    from geosoc.data.from_source import RECORD

    record = dict(zarr.open_group(staging_url(url), mode="r").attrs)[RECORD]
    windows_done = record["steps"]["round 0"]
    assert windows_done >= 3

    layers, fakes = fake_layers(catalog, stacked=True)
    by_group = {layer.group: layer for layer in layers}
    resumed = sample_from_source(catalog, url, n_random=n, seed=3, kind="unlabelled", layers=by_group)
    fresh_layers, fresh_fakes = fake_layers(catalog, stacked=True)
    reference = sample_from_source(catalog, str(tmp_path / "reference.zarr"), n_random=n, seed=3, kind="unlabelled",
                                   layers={layer.group: layer for layer in fresh_layers})
    assert resumed.samples == reference.samples == n
    assert fakes["imagery"].calls == fresh_fakes["imagery"].calls - windows_done  # nothing recorded read again
    assert_same_sampleset(reference.url, resumed.url)
    assert not Path(staging_url(url)).exists()
    killed_calls = len(log.read_text().splitlines())
    assert killed_calls >= windows_done


def masked_catalog(write_catalog, tmp_path: Path, **kwargs: Any) -> Any:
    """The tiny region inside a mask of its western half (pixels 0-47 of 96), random locations 200 m apart."""
    data = catalog_dict(embeddings=False, **kwargs)
    data["region"]["mask"] = western_half_mask(tmp_path, data["region"]["bounds"])
    data["sampling"]["min_spacing"] = 200
    return load_catalog(path=write_catalog(data, name="masked.yaml"))


def test_random_locations_inside_the_mask_apart_and_as_the_cube_gives(tmp_path: Path, write_catalog) -> None:
    catalog = masked_catalog(write_catalog, tmp_path)
    grid = catalog.config.imagery_grid
    first = sample_from_source(catalog, str(tmp_path / "a.zarr"), n_random=20, seed=2, kind="unlabelled")
    again = sample_from_source(catalog, str(tmp_path / "b.zarr"), n_random=20, seed=2, kind="unlabelled")
    assert_same_sampleset(first.url, again.url)  # reproducible
    ds = open_sampleset(first.url)
    assert ds.sizes["sample"] == 20 and np.isnan(ds["target"].values).all()
    rows, cols = grid.rowcol(ds.x.values, ds.y.values)
    assert (cols < 48).all()  # never outside the mask
    xy = np.column_stack([ds.x.values, ds.y.values])
    distances = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert distances[~np.eye(20, dtype=bool)].min() >= 200
    assert np.isfinite(ds["patch"].values[:, :, PATCH // 2, PATCH // 2]).all()  # data at every centre
    points = Points(ds.sample_id.values.astype(object), ds.x.values, ds.y.values, ds.lon.values, ds.lat.values,
                    ds.target.values, "", ds.attrs["source"])
    cube = build_cube(catalog, str(tmp_path / "root"), progress=False)
    cut = sample_points(cube, points, str(tmp_path / "cut.zarr"), PATCH, fold_block_size=1000, folds=2,
                        kind="unlabelled")
    assert_same_sampleset(cut.url, first.url, by_id=True)


def test_windows_of_a_chunk_by_cost_and_of_a_cube_whole(tmp_path: Path, write_catalog) -> None:
    catalog = load_catalog(path=write_catalog(catalog_dict(embeddings=False, size_px=192, chunk=96)))
    source = LayerWindows(point_layers(catalog))
    rows, cols = np.array([5, 7, 90, 91, 150]), np.array([5, 9, 90, 10, 150])
    parts = units(source, "imagery", rows, cols, PATCH)
    # chunk order; in the first chunk two pairs (a thin window is cheap), the pairs apart (a window over all four
    # would hold ~8,700 px against ~4,100 of a call); the last point in the next chunk
    assert [list(p) for p in parts] == [[0, 1], [2, 3], [4]]


def test_dry_run_from_the_catalog_alone(tmp_path: Path) -> None:
    """Europe: 100,000 random locations cost requests, bytes and hours from the catalog, nothing written."""
    result = CliRunner().invoke(app, ["sample", "--region", "europe", "--root", str(tmp_path / "europe"),
                                      "--random", "2000", "--from-source", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Earth Engine requests" in result.output and "nothing written" in result.output
    assert not (tmp_path / "europe").exists()


def test_the_plan_of_random_locations_takes_as_many_rounds_as_the_run(tmp_path: Path, write_catalog) -> None:
    """With a spacing that leaves the first round's draw short of N (as Europe's 5 km leaves 100,000 short), the
    plan draws the further rounds the run draws: it plans N locations and the SampleSet's bytes, as the run writes."""
    from geosoc.data.from_source import RATE_GUESS, Spacing, _draw, _round_size

    catalog = load_catalog(path=write_catalog(catalog_dict(embeddings=False)))
    n, spacing = 90, 180.0
    url = str(tmp_path / "unlabelled.zarr")
    layers = point_layers(catalog, str(tmp_path))
    first, _ = _draw(0, 0, _round_size(n, RATE_GUESS), layers["imagery"].grid, None, Spacing(spacing))
    assert len(first) < n  # the case: one round is not enough
    plan = plan_points(catalog, url, None, n, seed=0, min_spacing=spacing, layers=layers)
    report = sample_from_source(catalog, url, n_random=n, seed=0, min_spacing=spacing, kind="unlabelled",
                                layers=layers)
    ds = open_sampleset(url)
    assert plan.points == report.samples == ds.sizes["sample"] == n
    assert plan.sampleset_bytes == sum(int(ds[name].nbytes) for name in ("patch", "climate"))
    assert plan.reads[0].windows > 1
    read = ds.attrs["reads"]  # the run reads what the plan says, and the windows still in flight when N is reached
    imagery, climate = plan.reads
    assert imagery.windows <= read["imagery"]["windows"] and imagery.nbytes <= read["imagery"]["bytes"]
    assert (climate.windows, climate.nbytes) == (read["climate"]["windows"], read["climate"]["bytes"])


def test_the_run_reads_the_windows_and_bytes_its_plan_says(tmp_path: Path, write_catalog) -> None:
    """Labelled points: the windows and bytes read from each group, as the SampleSet records them, are the plan's."""
    catalog = load_catalog(path=write_catalog(catalog_dict()))
    points = at_pixels(catalog.config.imagery_grid, *EDGES)
    url = str(tmp_path / "labelled.zarr")
    plan = plan_points(catalog, url, points, root=str(tmp_path))
    sample_from_source(catalog, url, points, root=str(tmp_path))
    read = open_sampleset(url).attrs["reads"]
    assert {r.group: {"windows": r.windows, "bytes": r.nbytes} for r in plan.reads} == read
    assert set(read) == {"imagery", "climate", "embeddings"} and read["imagery"]["windows"] > 1


def test_cli_from_source_without_a_cube(tmp_path: Path, write_catalog) -> None:
    path = write_catalog(catalog_dict(embeddings=False))
    root = tmp_path / "root"
    result = CliRunner().invoke(app, ["sample", "--catalog", str(path), "--root", str(root), "--random", "12",
                                      "--seed", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert "from the sources" in result.output
    ds = open_sampleset(str(root / "samples" / "unlabelled.zarr"))
    assert ds.sizes["sample"] == 12 and ds.attrs["route"] == "source"
    assert not (root / "cube.zarr").exists()
    refused = CliRunner().invoke(app, ["sample", "--catalog", str(path), "--root", str(root), "--random", "12",
                                       "--from-cube", "-q"])
    assert refused.exit_code == 1 and "no cube here" in refused.output
    refused = CliRunner().invoke(app, ["sample", "--catalog", str(path), "--root", str(root), "--random", "12",
                                       "--from-cube", "--dry-run"])
    assert refused.exit_code == 1 and "geosoc build-cube --dry-run" in refused.output
