"""Cube building: contract, round trips, resumability, Dask distributed, real Edgeroi values, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr

from geosoc.catalog import load_catalog
from geosoc.data.cube import build_cube, open_cube, plan_cube
from geosoc.errors import GeosocError
from geosoc.sources.from_catalog import open_layers
from tests.helpers import EDGEROI, tiny_catalog_dict


def expected(catalog) -> dict[str, xr.DataArray]:
    return {layer.group: layer.lazy().compute() for layer in open_layers(catalog)}


def assert_cube_matches_sources(url: str, catalog) -> None:
    tree = open_cube(url)
    for group, want in expected(catalog).items():
        got = tree[group].to_dataset()["data"]
        assert got.dims == want.dims
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.x.values, want.x.values)
        np.testing.assert_array_equal(got.y.values, want.y.values)


def test_build_writes_the_contract(tmp_path: Path, write_catalog) -> None:
    catalog = load_catalog(path=write_catalog())
    url = build_cube(catalog, str(tmp_path / "root"), progress=False)
    assert url == str(tmp_path / "root" / "cube.zarr")
    assert_cube_matches_sources(url, catalog)

    tree = open_cube(url)
    assert tree.attrs["region"] == "tiny" and tree.attrs["geosoc_status"] == "complete"
    assert "imagery:" in tree.attrs["catalog"] and tree.attrs["geosoc_version"] and tree.attrs["created"]
    assert tree.attrs["geosoc_chunks"] == {
        "imagery": {"chunks": 9, "complete": 9, "outside_mask": 0},
        "climate": {"chunks": 4, "complete": 4, "outside_mask": 0},
    }
    imagery = tree["imagery"].to_dataset()["data"]
    assert imagery.rio.crs.to_epsg() == 3035 and imagery.data.chunksize == (14, 32, 32)
    assert list(imagery.band.values)[:2] == ["SR_B1", "SR_B2"]
    climate = tree["climate"].to_dataset()["data"]
    assert climate.dims == ("time", "variable", "y", "x") and list(climate["variable"].values) == ["pr", "tmmx", "swe"]
    assert climate.time.dtype.kind == "M" and climate.rio.crs.to_epsg() == 3035

    # On disk: Zarr v3, integer axis coordinates with their names in attrs (no string coordinates).
    raw = zarr.open_group(str(tmp_path / "root" / "cube.zarr"), mode="r")
    assert raw.metadata.zarr_format == 3
    assert raw["imagery/band"].dtype.kind == "i" and raw["imagery/band"].attrs["names"][0] == "SR_B1"
    assert not (tmp_path / "root" / "cube.zarr.progress").exists()  # markers folded into attrs


def test_rebuild_is_a_no_op(tmp_path: Path, write_catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = load_catalog(path=write_catalog())
    url = build_cube(catalog, str(tmp_path), progress=False)
    import geosoc.data.cube as cube

    monkeypatch.setattr(cube, "_write_chunk", lambda *a: pytest.fail("rewrote a chunk of a complete cube"))
    assert build_cube(catalog, str(tmp_path), progress=False) == url


def test_memory_url_round_trip(write_catalog) -> None:
    catalog = load_catalog(path=write_catalog(climate=False))
    url = build_cube(catalog, "memory://geosoc-test/tiny", progress=False)
    assert url == "memory://geosoc-test/tiny/cube.zarr"
    assert set(open_cube(url).children) == {"imagery"}
    assert_cube_matches_sources(url, catalog)


def test_bounds_override_builds_a_part(tmp_path: Path) -> None:
    catalog = load_catalog("demo", bounds=(4419990, 2809980, 4419990 + 1920, 2809980 + 960))
    url = build_cube(catalog, str(tmp_path), progress=False)
    tree = open_cube(url)
    assert tree["imagery"].to_dataset()["data"].shape == (14, 32, 64)
    assert plan_cube(catalog).layers[0].shape == (14, 32, 64)


def test_dask_distributed_cluster(tmp_path: Path, write_catalog) -> None:
    distributed = pytest.importorskip("distributed")
    catalog = load_catalog(path=write_catalog())
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        url = build_cube(catalog, str(tmp_path), client=client, progress=False)
    assert_cube_matches_sources(url, catalog)


def test_other_catalog_at_same_root_is_refused(tmp_path: Path, write_catalog) -> None:
    build_cube(load_catalog(path=write_catalog()), str(tmp_path), progress=False)
    data = tiny_catalog_dict()
    data["imagery"]["source"]["seed"] = 8
    with pytest.raises(GeosocError, match="different catalog or bounds; remove it or choose another --root"):
        build_cube(load_catalog(path=write_catalog(data, name="other.yaml")), str(tmp_path), progress=False)


def test_unwritable_root_fails_before_any_work(tmp_path: Path, write_catalog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(GeosocError, match=r"a-file/root: cannot write here"):
        build_cube(load_catalog(path=write_catalog()), str(blocker / "root"), progress=False)


def test_interrupted_template_is_rewritten(tmp_path: Path, write_catalog) -> None:
    catalog = load_catalog(path=write_catalog())
    url = build_cube(catalog, str(tmp_path), progress=False)
    group = zarr.open_group(url, mode="r+")
    group.attrs.update({"geosoc_template_complete": False, "geosoc_status": "building"})
    (Path(url) / "imagery" / "data" / "zarr.json").unlink()  # as if killed while writing metadata
    build_cube(catalog, str(tmp_path), progress=False)
    assert_cube_matches_sources(url, catalog)


def _chunk_files(url: str) -> dict[str, int]:
    root = Path(url)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("c/*/*/*") if p.is_file()}


def _markers(url: str) -> set[str]:
    progress = Path(url + ".progress")
    return {"/".join(p.relative_to(progress).parts[1:]) for p in progress.glob("*/*/*")}


def test_resume_removes_chunk_writes_a_kill_left_behind(tmp_path: Path, write_catalog) -> None:
    """Zarr's LocalStore writes `<chunk>.<hex>.partial` and renames it; a kill in between leaves the file inside
    the store. Resuming an unfinished build deletes such files (and only those)."""
    from geosoc.io import progress

    url = build_cube(load_catalog(path=write_catalog()), str(tmp_path), progress=False)
    group = zarr.open_group(url, mode="r+")
    group.attrs["geosoc_status"] = "building"  # as if killed before the end
    chunks = Path(url) / "imagery" / "data" / "c" / "0" / "0"
    leftover = chunks / "1.0123456789abcdef0123456789abcdef.partial"
    leftover.write_bytes(b"half a chunk")
    kept = chunks / "notes.partial"  # not a LocalStore temporary: left alone
    kept.write_bytes(b"")
    assert progress.resumable(url, group.attrs["geosoc_fingerprint"], "refused") is not None
    assert not leftover.exists() and kept.exists()


def test_a_rerun_removes_markers_a_kill_left_after_the_build_completed(tmp_path: Path, write_catalog) -> None:
    url = build_cube(load_catalog(path=write_catalog()), str(tmp_path), progress=False)
    stale = Path(url + ".progress") / "build" / "imagery" / "0.0"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")  # as if killed between the status turning complete and the markers' removal
    before = (Path(url) / "zarr.json").read_bytes()
    build_cube(load_catalog(path=write_catalog()), str(tmp_path), progress=False)
    assert not Path(url + ".progress").exists() and (Path(url) / "zarr.json").read_bytes() == before


def test_kill_9_then_resume_gives_identical_cube(tmp_path: Path, write_catalog, monkeypatch) -> None:
    """SIGKILL the CLI build early, then mid-way at a random moment, then once 250 chunks are done (kills after
    its n-th finished chunk, whatever the machine's load); the re-run finishes without redoing finished work."""
    import random

    from tests.helpers import MARKING_CLI, RandomKiller

    path = write_catalog(size_px=768, chunk=32, climate=True)
    catalog = load_catalog(path=path)
    root = tmp_path / "killed"
    url = str(root / "cube.zarr")
    args = ["build-cube", "--catalog", str(path), "--root", str(root), "--workers", "1", "-q"]
    rng = random.Random(3)
    with RandomKiller(MARKING_CLI) as killer:
        killer.kill_at_step(args, rng.randint(1, 8))
        killer.kill_after_step(args, rng.randint(40, 80), rng.uniform(0, 0.05))
        killer.kill_at_step(args, max(1, 250 - len(_markers(url))) + rng.randint(0, 20))

    attrs = dict(zarr.open_group(url, mode="r").attrs)
    assert attrs["geosoc_status"] == "building"
    done = _markers(url)
    assert len(done) >= 250
    before = _chunk_files(url)
    import geosoc.data.cube as cube

    written: list[str] = []
    real = cube._write_chunk

    def counting(url_, group, reader, window, markers):
        written.append(f"{group}/{window.key}")
        return real(url_, group, reader, window, markers)

    monkeypatch.setattr(cube, "_write_chunk", counting)
    build_cube(catalog, str(root), progress=False)
    total = catalog.config.imagery_grid.n_chunks + catalog.config.climate_grid.n_chunks
    assert not set(written) & done, "a finished chunk was written again"
    assert len(written) == total - len(done)
    after = _chunk_files(url)
    for key in done:
        group, index = key.split("/")
        iy, ix = index.split(".")
        chunk = f"{group}/data/c/0/{iy}/{ix}" if group == "imagery" else f"{group}/data/c/0/0/{iy}/{ix}"
        if chunk in before:  # all-NaN chunks are not stored at all
            assert after[chunk] == before[chunk], f"chunk {chunk} was rewritten"

    reference = build_cube(catalog, str(tmp_path / "reference"), progress=False)
    a, b = open_cube(url), open_cube(reference)
    for group in ("imagery", "climate"):
        np.testing.assert_array_equal(a[group].to_dataset()["data"].values, b[group].to_dataset()["data"].values)
    assert a.attrs["geosoc_status"] == "complete"
    assert _chunk_files(url).keys() == _chunk_files(reference).keys()


def test_edgeroi_cube_equals_source_geotiffs(tmp_path: Path) -> None:
    url = build_cube("edgeroi", str(tmp_path), progress=False)
    data = open_cube(url)["imagery"].to_dataset()["data"]
    assert data.rio.crs.to_epsg() == 28355 and data.shape == (13, 321, 476)

    with rasterio.open(EDGEROI / "edgeroi_grids100m.tif") as src:
        fine = src.read()
        names = list(src.descriptions)
    np.testing.assert_array_equal(data.sel(band=names).values, fine)  # same grid: identical values

    with rasterio.open(EDGEROI / "edgeroi_grids250m.tif") as src:
        coarse = src.read()
        names = list(src.descriptions)
        left, top = src.bounds.left, src.bounds.top
    xs, ys = np.meshgrid(data.x.values, data.y.values)
    rows, cols = np.floor((top - ys) / 250).astype(int), np.floor((xs - left) / 250).astype(int)
    # Pixel centres that fall exactly on a 250 m edge are ties that GDAL may break either way: skip them.
    tie = ((xs - 741400) % 250 == 0) | ((6678100 - ys) % 250 == 0)
    inside = (rows >= 0) & (rows < coarse.shape[1]) & (cols >= 0) & (cols < coarse.shape[2]) & ~tie
    want = coarse[:, rows[inside], cols[inside]]
    got = data.sel(band=names).values[:, inside]
    np.testing.assert_array_equal(got, want)
    assert inside.sum() > 0.6 * inside.size


def test_raster_without_crs_needs_one_in_catalog(tmp_path: Path, write_catalog) -> None:
    tif = tmp_path / "nocrs.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32") as dst:
        dst.write(np.ones((1, 8, 8), np.float32))
    data = tiny_catalog_dict(climate=False)
    data["imagery"]["source"] = {"kind": "raster", "files": [{"path": str(tif)}]}
    with pytest.raises(GeosocError, match=r"nocrs\.tif: raster has no CRS; state it in the catalog as imagery\.source\.files\[0\]\.crs"):
        open_layers(load_catalog(path=write_catalog(data)))


def test_unreadable_raster(tmp_path: Path, write_catalog) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    data = tiny_catalog_dict(climate=False)
    data["imagery"]["source"] = {"kind": "raster", "files": [{"path": str(bad)}]}
    with pytest.raises(GeosocError, match=r"broken\.tif: cannot read raster .*check imagery\.source\.files\[0\]\.path"):
        open_layers(load_catalog(path=write_catalog(data)))


def test_raster_band_count_mismatch(write_catalog) -> None:
    data = tiny_catalog_dict(climate=False)
    data["imagery"]["source"] = {
        "kind": "raster",
        "files": [{"path": str(EDGEROI / "edgeroi_grids250m.tif"), "bands": ["a", "b"]}],
    }
    with pytest.raises(GeosocError, match=r"has 6 bands but imagery\.source\.files\[0\]\.bands lists 2"):
        open_layers(load_catalog(path=write_catalog(data)))


def test_raster_reprojected_across_crs(tmp_path: Path, write_catalog) -> None:
    """A raster in another CRS lands on the region grid; values are sampled, not invented."""
    data = {
        "region": {"name": "edgeroi-geo", "crs": "EPSG:4326", "bounds": [149.75, -30.25, 149.85, -30.15]},
        "imagery": {
            "resolution": 0.005,
            "chunk": 16,
            "source": {"kind": "raster", "files": [{"path": str(EDGEROI / "edgeroi_grids100m.tif")}]},
        },
    }
    catalog = load_catalog(path=write_catalog(data))
    layer = open_layers(catalog)[0]
    values = layer.lazy().values
    assert values.shape == (7, 20, 20)
    with rasterio.open(EDGEROI / "edgeroi_grids100m.tif") as src:
        source_values = set(np.unique(src.read(1)[np.isfinite(src.read(1))]))
    got = values[0][np.isfinite(values[0])]
    assert got.size > 300 and set(np.unique(got)) <= source_values
