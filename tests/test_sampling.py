"""Sampling: patches equal the cube's windows (chunk edges, region borders), one read per chunk group,
climate at the right cell, reproducible random locations on data, spatial folds, outside tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import geosoc.data.sampling as sampling
from geosoc.catalog import load_catalog
from geosoc.cli import app
from geosoc.data.cube import build_cube, group_grid, open_cube
from geosoc.data.points import Points
from geosoc.data.sampling import open_sampleset, random_points, sample_points, spatial_folds
from geosoc.data.tables import sampleset_from_table
from geosoc.errors import GeosocError
from tests.helpers import EDGEROI

PATCH = 8


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny synthetic region (96 x 96 px, 32 px chunks, a lake, 4 months of climate)."""
    import yaml

    from tests.helpers import tiny_catalog_dict

    folder = tmp_path_factory.mktemp("cube")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_catalog_dict()))
    return build_cube(load_catalog(path=path), str(folder), progress=False)


def at_pixels(cube: str, rows: list[int], cols: list[int], target: float = 10.0) -> Points:
    grid = group_grid(open_cube(cube)["imagery"].to_dataset())
    x, y = grid.x_of(np.array(cols)), grid.y_of(np.array(rows))
    n = len(rows)
    return Points(np.array([f"p{i}" for i in range(n)], dtype=object), x, y, x * 0, y * 0,
                  np.full(n, target), "g/kg", "test")


def padded_window(cube: str, row: int, col: int) -> np.ndarray:
    data = open_cube(cube)["imagery"].to_dataset()["data"].values
    padded = np.pad(data, ((0, 0), (PATCH, PATCH), (PATCH, PATCH)), constant_values=np.nan)
    r, c = row - PATCH // 2 + PATCH, col - PATCH // 2 + PATCH
    return padded[:, r : r + PATCH, c : c + PATCH]


def test_patches_equal_cube_windows(cube: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [40, 31, 32, 31, 63, 64, 2, 95, 50]  # chunk edges at 32/64; region borders at 0/95
    cols = [40, 31, 32, 32, 64, 63, 50, 1, 95]
    points = at_pixels(cube, rows, cols)
    calls = []
    real = sampling._extract_group
    monkeypatch.setattr(sampling, "_extract_group", lambda *a: calls.append(a) or real(*a))
    report = sample_points(cube, points, str(tmp_path / "s.zarr"), PATCH, fold_block_size=1000, folds=2)
    ds = open_sampleset(report.url)
    grid = group_grid(open_cube(cube)["imagery"].to_dataset())
    chunks = {(r // 32, c // 32) for r, c in zip(rows, cols)}
    assert len(calls) == len(chunks)  # one window read per chunk group
    kept = {str(i): k for k, i in enumerate(ds["sample_id"].values)}
    for i, (r, c) in enumerate(zip(rows, cols)):
        want = padded_window(cube, r, c)
        if f"p{i}" not in kept:
            assert np.isnan(want).any(axis=0).mean() > 0.5 or np.isnan(want[:, PATCH // 2, PATCH // 2]).any()
            continue
        np.testing.assert_array_equal(ds["patch"].values[kept[f"p{i}"]], want)
        rr, cc = grid.rowcol(ds.x.values[kept[f"p{i}"]], ds.y.values[kept[f"p{i}"]])
        assert (rr, cc) == (r, c)
    assert ds.attrs["patch_size"] == PATCH and ds.attrs["has_climate"]
    assert list(ds["band"].values)[:2] == ["SR_B1", "SR_B2"]
    assert ds["target"].attrs["units"] == "g/kg"


def test_climate_series_of_the_cell(cube: str, tmp_path: Path) -> None:
    points = at_pixels(cube, [10, 70], [10, 80])
    ds = open_sampleset(sample_points(cube, points, str(tmp_path / "s.zarr"), PATCH, fold_block_size=1000,
                                      folds=2).url)
    climate = open_cube(cube)["climate"].to_dataset()["data"]
    grid = group_grid(open_cube(cube)["climate"].to_dataset())
    for k in range(ds.sizes["sample"]):
        r, c = grid.rowcol(ds.x.values[k : k + 1], ds.y.values[k : k + 1])
        np.testing.assert_array_equal(ds["climate"].values[k], climate.values[:, :, r[0], c[0]])
    assert list(ds["variable"].values) == ["pr", "tmmx", "swe"] and ds.sizes["time"] == 4


def test_mostly_nodata_patches_are_dropped(cube: str, tmp_path: Path) -> None:
    data = open_cube(cube)["imagery"].to_dataset()["data"].values
    lake = np.argwhere(np.isnan(data[0]))
    r, c = map(int, lake[len(lake) // 2])
    report = sample_points(cube, at_pixels(cube, [r, 40], [c, 40]), str(tmp_path / "s.zarr"), PATCH,
                           fold_block_size=1000, folds=2)
    assert report.samples == 1 and len(report.dropped) == 1 and "point p0" in report.dropped[0]
    assert "its centre pixel has no data" in report.dropped[0]


def test_the_nodata_threshold_is_a_setting_and_exactly_half_is_kept(cube: str, tmp_path: Path) -> None:
    data = open_cube(cube)["imagery"].to_dataset()["data"].values
    assert not np.isnan(data[:, :4, 36:44]).any()  # the patch at (0, 40) has data but for the rows above the grid
    points = at_pixels(cube, [0], [40])  # half of its patch is beyond the grid's edge
    assert sample_points(cube, points, str(tmp_path / "a.zarr"), PATCH, fold_block_size=1000, folds=2).samples == 1
    with pytest.raises(GeosocError, match="no point has a patch"):
        sample_points(cube, points, str(tmp_path / "b.zarr"), PATCH, fold_block_size=1000, folds=2, max_nodata=0.4)
    two = at_pixels(cube, [0, 40], [40, 40])
    report = sample_points(cube, two, str(tmp_path / "c.zarr"), PATCH, fold_block_size=1000, folds=2, max_nodata=0.4)
    assert report.samples == 1 and report.dropped == [
        "point p0: 50% of its patch has no data (more than sampling.max_nodata, 40%); dropped"]


def test_an_edge_sample_is_kept_with_its_mask(cube: str, tmp_path: Path) -> None:
    """A point in the grid's corner (3/4 of its patch beyond the rasters) is kept by default and counted; its
    patch keeps NaN where there is no data, and the network sees which pixels those are: the same values with
    the gaps filled by zeros (what it saw before the mask) give another prediction."""
    import torch

    from geosoc.learn.models import NetworkConfig, SoilNet

    report = sample_points(cube, at_pixels(cube, [0, 40], [0, 40]), str(tmp_path / "s.zarr"), PATCH,
                           fold_block_size=1000, folds=2)
    assert report.samples == 2 and report.dropped == [] and report.mostly_nodata == 1
    patch = open_sampleset(str(tmp_path / "s.zarr"))["patch"].values[0]
    assert np.isnan(patch[:, : PATCH // 2]).all() and np.isnan(patch[:, :, : PATCH // 2]).all()
    assert not np.isnan(patch[:, PATCH // 2 :, PATCH // 2 :]).any()
    torch.manual_seed(0)
    net = SoilNet(NetworkConfig(bands=[str(b) for b in range(patch.shape[0])], patch_size=PATCH, image_patch=4,
                                image_dim=16, image_depth=1, image_heads=2, embedding=8, nodata_mask=True)).eval()
    gaps = torch.from_numpy(patch[None])
    with torch.no_grad():
        masked, zeros = net({"patch": gaps}), net({"patch": torch.nan_to_num(gaps)})
    assert torch.isfinite(masked).all() and not torch.allclose(masked, zeros)


def test_random_locations_reproducible_and_on_data(cube: str) -> None:
    a = random_points(cube, 40, PATCH, seed=3, min_spacing=120)
    b = random_points(cube, 40, PATCH, seed=3, min_spacing=120)
    c = random_points(cube, 40, PATCH, seed=4, min_spacing=120)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    grid = group_grid(open_cube(cube)["imagery"].to_dataset())
    data = open_cube(cube)["imagery"].to_dataset()["data"].values
    rows, cols = grid.rowcol(a.x, a.y)
    assert not np.isnan(data[:, rows, cols]).any()  # never on nodata
    distances = np.hypot(a.x[:, None] - a.x[None], a.y[:, None] - a.y[None]) + np.eye(40) * 1e9
    assert distances.min() >= 120


def test_too_many_random_locations(cube: str) -> None:
    with pytest.raises(GeosocError, match="found only .* valid locations"):
        random_points(cube, 500, PATCH, seed=0, min_spacing=400)


def test_spatial_folds_are_blocks_and_balanced() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 100_000, 5000), rng.uniform(0, 100_000, 5000)
    fold = spatial_folds(x, y, 10_000, 5)
    blocks = np.floor(x / 10_000) * 1000 + np.floor(y / 10_000)
    for block in np.unique(blocks):
        assert len(np.unique(fold[blocks == block])) == 1  # a block never straddles folds
    counts = np.bincount(fold)
    assert len(counts) == 5 and counts.max() - counts.min() < 0.1 * counts.mean()


def test_failed_run_leaves_nothing(cube: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sampling, "climate_at", boom)
    with pytest.raises(RuntimeError):
        sample_points(cube, at_pixels(cube, [40], [40]), str(tmp_path / "s.zarr"), PATCH, fold_block_size=1000,
                      folds=2)
    assert list(tmp_path.iterdir()) == []


def test_cli_sample_labelled_and_unlabelled(tmp_path: Path, write_catalog) -> None:
    catalog = write_catalog()
    root = tmp_path / "root"
    build_cube(load_catalog(path=catalog), str(root), progress=False)
    points = tmp_path / "pts.csv"
    grid = load_catalog(path=catalog).config.imagery_grid
    xs, ys = grid.x_of(np.array([20, 50, 70])), grid.y_of(np.array([20, 50, 70]))
    points.write_text("site,x,y,soc\n" + "".join(f"s{i},{x},{y},{10 + i}\n" for i, (x, y) in enumerate(zip(xs, ys))))
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--catalog", str(catalog), "--root", str(root), "--points", str(points),
                                 "--id-col", "site", "--x-col", "x", "--y-col", "y", "--target-col", "soc",
                                 "--points-crs", "EPSG:3035", "-q"])
    assert result.exit_code == 0, result.output
    labelled = open_sampleset(str(root / "samples" / "labelled.zarr"))
    assert labelled.sizes["sample"] == 3 and labelled.attrs["kind"] == "labelled"
    result = runner.invoke(app, ["sample", "--catalog", str(catalog), "--root", str(root), "--random", "25",
                                 "--seed", "1", "-q"])
    assert result.exit_code == 0, result.output
    unlabelled = open_sampleset(str(root / "samples" / "unlabelled.zarr"))
    assert unlabelled.sizes["sample"] == 25 and np.isnan(unlabelled["target"].values).all()
    result = runner.invoke(app, ["sample", "--catalog", str(catalog), "--root", str(root)])
    assert result.exit_code == 1 and "give either --points FILE or --random N" in result.output


def test_edgeroi_samples_have_no_climate(tmp_path: Path) -> None:
    root = tmp_path / "edgeroi"
    build_cube("edgeroi", str(root), progress=False)
    result = CliRunner().invoke(app, ["sample", "--region", "edgeroi", "--root", str(root), "--points",
                                      str(EDGEROI / "edgeroi_topsoil_first_horizon.csv"), "--format", "edgeroi",
                                      "--on-error", "drop", "-q"])
    assert result.exit_code == 0, result.output
    assert "holds patches only" in result.output
    ds = open_sampleset(str(root / "samples" / "labelled.zarr"))
    assert "climate" not in ds and not ds.attrs["has_climate"]
    assert ds.sizes["sample"] > 300 and ds["patch"].shape[1:] == (13, 16, 16)
    assert set(np.unique(ds["fold"].values)) == set(range(5))


def test_sampleset_from_table_with_climate_columns(tmp_path: Path) -> None:
    months = ["2010-01", "2010-02", "2010-03"]
    header = "id,lon,lat,soc," + ",".join(f"{v}_{m}" for v in ("pr", "tmmx") for m in months)
    rows = [f"p{i},{11 + i * 0.1},{48 + i * 0.1},{10 + i}," + ",".join(str(i + k) for k in range(6)) for i in range(4)]
    table = tmp_path / "series.csv"
    table.write_text("\n".join([header, *rows]) + "\n")
    patches = np.random.default_rng(0).random((4, 2, 4, 4)).astype(np.float32)
    np.save(tmp_path / "patches.npy", patches)
    runner = CliRunner()
    result = runner.invoke(app, ["sample-table", "--table", str(table), "--out", str(tmp_path / "s.zarr"),
                                 "--crs", "EPSG:3035", "--id-col", "id", "--x-col", "lon", "--y-col", "lat",
                                 "--target-col", "soc", "--patches", str(tmp_path / "patches.npy"),
                                 "--bands", "red,nir"])
    assert result.exit_code == 0, result.output
    ds = open_sampleset(str(tmp_path / "s.zarr"))
    assert list(ds["variable"].values) == ["pr", "tmmx"] and ds.sizes["time"] == 3
    np.testing.assert_array_equal(ds["climate"].values[1, :, 1], [4, 5, 6])  # p1: tmmx over three months
    np.testing.assert_array_equal(ds["patch"].values, patches)
    assert list(ds["band"].values) == ["red", "nir"]


def test_table_with_incomplete_climate_columns(tmp_path: Path) -> None:
    from geosoc.data.points import Columns

    table = tmp_path / "t.csv"
    table.write_text("id,lon,lat,soc,pr_2010-01,pr_2010-02,tmmx_2010-01\np,11,48,10,1,2,3\n")
    with pytest.raises(GeosocError, match=r"climate columns incomplete, missing \['tmmx_2010-02'\]"):
        sampleset_from_table(table, str(tmp_path / "s.zarr"), "EPSG:3035", "csv",
                             Columns("id", ("lon",), ("lat",), "soc"), fold_block_size=1000, folds=2)


def test_region_mask_blanks_imagery_and_random_sampling_respects_it(tmp_path: Path, write_catalog) -> None:
    import rasterio
    from rasterio.transform import from_origin

    from tests.helpers import tiny_catalog_dict

    data = tiny_catalog_dict(climate=False)
    x0, y0, x1, y1 = data["region"]["bounds"]
    mask_path = tmp_path / "mask.tif"  # inside = western half, in another CRS-aligned grid of 60 m
    width, height = int((x1 - x0) / 60), int((y1 - y0) / 60)
    values = np.zeros((height, width), np.uint8)
    values[:, : width // 2] = 1
    with rasterio.open(mask_path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                       crs="EPSG:3035", transform=from_origin(x0, y1, 60, 60)) as dst:
        dst.write(values, 1)
    data["region"]["mask"] = str(mask_path)
    catalog = load_catalog(path=write_catalog(data))
    url = build_cube(catalog, str(tmp_path / "root"), progress=False)
    image = open_cube(url)["imagery"].to_dataset()["data"].values
    assert np.isnan(image[:, :, 48:]).all() and np.isfinite(image[:, :, :40]).mean() > 0.8
    points = random_points(url, 20, PATCH, seed=0)
    grid = group_grid(open_cube(url)["imagery"].to_dataset())
    assert (grid.rowcol(points.x, points.y)[1] < 48).all()  # never outside the mask


RESAMPLER = """
import os, sys, types
from geosoc.data.sampling import SampleSetWriter, sample_points
from geosoc.io import storage
from tests.test_sampling import PATCH, two_point_sets
append = SampleSetWriter.append

def appending(self, patches):  # patches written into the SampleSet being made beside the old one
    append(self, patches)
    step("append")

def replace(source, target):  # a publish's renames: the old SampleSet set aside, then the new one in place
    os.replace(source, target)
    if ".old-" in target or ".partial-" in source:  # (not a lock's or a file's own rename)
        step("aside" if ".old-" in target else "in")

SampleSetWriter.append = appending
storage.os = types.SimpleNamespace(**{**vars(os), "replace": replace})
cube, url = sys.argv[1:3]
sets = two_point_sets(cube)
print("ready", flush=True)
turn = 0
while True:
    sample_points(cube, sets[turn % 2], url, PATCH, fold_block_size=1000, folds=2)
    turn += 1
"""


def _put_back(url: str) -> None:
    """What the next run does first: a SampleSet set aside by a run killed between its two renames goes back."""
    from geosoc.io.storage import tidy_beside

    if not Path(url).exists():
        assert list(Path(url).parent.glob(Path(url).name + ".old-*")), "neither the old SampleSet nor the new"
    tidy_beside(url)


def _sampleset_target(url: str, sizes: dict[float, int]) -> float:
    """The target of the one whole SampleSet at `url` (of as many samples as its point set gave)."""
    ds = open_sampleset(url)
    targets = set(ds["target"].values.tolist())
    assert len(targets) == 1
    target = targets.pop()
    assert ds.sizes["sample"] == sizes[target]
    assert ds["patch"].notnull().any(dim=("band", "py", "px")).all()
    return target


def two_point_sets(cube: str) -> list[Points]:
    """Two point sets told apart by their size and their target."""
    return [at_pixels(cube, [20, 40, 60], [20, 40, 60], target=5.0),
            at_pixels(cube, [10, 30, 50, 70, 80], [10, 30, 50, 70, 80], target=7.0)]


def test_killed_while_replacing_a_sampleset_leaves_the_old_or_the_new(cube: str, tmp_path: Path) -> None:
    """A process re-sampling in a loop is killed with SIGKILL: exactly after it wrote patches, set the old
    SampleSet aside, or moved the new one in, and at random moments after those. What is at the SampleSet's
    place is always one whole SampleSet, the last one moved in (or, killed between the two renames, the old one
    set aside, which the next run puts back); the next run leaves nothing beside it."""
    import random

    from tests.helpers import RandomKiller

    url = str(tmp_path / "samples" / "labelled.zarr")
    sets = two_point_sets(cube)
    sizes = {float(p.target[0]): sample_points(cube, p, url, PATCH, fold_block_size=1000, folds=2).samples
             for p in sets}
    rng = random.Random(1)
    moments = rng.sample(["append", "aside", "in"], 3)
    with RandomKiller(RESAMPLER) as killer:
        for moment in moments:
            before = _sampleset_target(url, sizes)
            steps = killer.kill_at_step([cube, url], rng.randint(1, 2), label=moment)
            assert Path(url).exists() == (steps[-1] != "aside"), steps
            _put_back(url)
            moved_in = steps.count("in")  # each round starts with the first set: they alternate from there
            assert _sampleset_target(url, sizes) == (float(sets[(moved_in - 1) % 2].target[0]) if moved_in else before)
            killer.kill_after_step([cube, url], rng.randint(1, 3), rng.uniform(0, 0.3))
            _put_back(url)
            _sampleset_target(url, sizes)
    sample_points(cube, two_point_sets(cube)[0], url, PATCH, fold_block_size=1000, folds=2)  # takes the lock over
    assert sorted(p.name for p in Path(url).parent.iterdir()) == ["labelled.zarr"]
