"""Maps: predict equals the model cell by cell, windows tile once, resume after kill -9, Ray actors that die,
COG/STAC exports, the area of applicability, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from geosoc.data.sampling import _extract_group, climate_at, open_sampleset
from geosoc.learn import checkpoint
from geosoc.learn.normalisation import Normalisation
from geosoc.maps.inference import map_spec, open_map, predict


@pytest.fixture
def region(trained_region: tuple[Path, str]) -> tuple[Path, str]:
    """The session's trained region: these tests only read it (maps go to their own folders)."""
    return trained_region


def per_cell(root: str, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The model applied to each cell's patch one at a time, through the training code's own normalisation."""
    from geosoc.data.cube import group_grid, open_cube
    from geosoc.stats.calibration import widen

    model, meta = checkpoint.load_model(f"{root}/models/finetune")
    norm = Normalisation.from_dict(meta["normalisation"])
    reference = checkpoint.load_aoa(f"{root}/models/finetune")
    tree = open_cube(f"{root}/cube.zarr")
    grid, cgrid = group_grid(tree["imagery"].to_dataset()), group_grid(tree["climate"].to_dataset())
    url = f"{root}/cube.zarr"
    out: dict[str, list[float]] = {"soc_median": [], "soc_q05": [], "soc_q95": [], "di": []}
    offset = meta["calibration"]["offset"]
    for xi, yi in zip(x, y):
        r, c = grid.rowcol(np.array([xi]), np.array([yi]))
        part = _extract_group(url, grid.shape, np.array([0]), r, c, 8)
        if not part.centre_valid[0]:
            for values in out.values():
                values.append(np.nan)
            continue
        batch = {"patch": part.patches, "climate": climate_at(url, cgrid, np.array([xi]), np.array([yi]))}
        with torch.no_grad():
            inputs = norm.inputs(batch, torch.device("cpu"))
            features = model.features(inputs)
            z = model.quantiles_of(features)[0].numpy()
        lower, upper = widen(z[:1], z[2:], z[1:2], offset)
        decoded = norm.decode_target(np.array([lower[0], z[1], upper[0]]))
        scaled = (features[0].numpy() - reference.mean) / reference.std
        di = np.sqrt(((reference.embeddings - scaled) ** 2).sum(axis=1)).min() / reference.mean_distance
        for name, value in zip(out, (decoded[1], decoded[0], decoded[2], di)):
            out[name].append(float(value))
    return {k: np.array(v) for k, v in out.items()}


def test_predict_equals_the_model_cell_by_cell(region: tuple[Path, str]) -> None:
    _, root = region
    ds = predict(f"{root}/cube.zarr", resolution=60, chunk=7).compute()  # lazy; 7-cell windows: ragged edges
    assert set(ds.data_vars) == {"soc_median", "soc_q05", "soc_q95", "aoa", "di"}
    assert ds.rio.crs.to_epsg() == 3035 and ds["soc_median"].attrs["units"] == "g/kg"
    x, y = np.meshgrid(ds.x.values, ds.y.values)
    rng = np.random.default_rng(0)
    pick = rng.choice(x.size, 120, replace=False)
    want = per_cell(root, x.ravel()[pick], y.ravel()[pick])
    for name, values in want.items():
        got = ds[name].values.ravel()[pick]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(values), err_msg=name)
        atol = 1e-4 if name == "di" else 2e-5  # DI ~0 at training points: float32 noise of the embeddings
        np.testing.assert_allclose(got, values, rtol=2e-4, atol=atol, equal_nan=True, err_msg=name)
    assert np.isnan(want["soc_median"]).any() and not np.isnan(want["soc_median"]).all()  # the lake: no data
    finite = np.isfinite(ds["soc_median"].values)
    assert (ds["soc_q05"].values[finite] <= ds["soc_median"].values[finite]).all()
    assert (ds["soc_median"].values[finite] <= ds["soc_q95"].values[finite]).all()


def test_the_climate_branch_runs_only_for_the_series_of_cells_with_data(region: tuple[Path, str]) -> None:
    """A coastal window's sea cells have climate series but no patch: their series are not embedded (that the cells
    with data get the model's own outputs is test_predict_equals_the_model_cell_by_cell's, over a lake)."""
    from geosoc.maps.predictor import load_predictor
    from geosoc.maps.windows import CubeAccess, predict_window, read_window

    _, root = region
    spec = map_spec(f"{root}/cube.zarr", resolution=60, chunk=16)
    predictor = load_predictor(spec.model, "cpu")
    window = next(iter(spec.grid.windows()))
    data = read_window(CubeAccess.open(spec.cube), spec.grid, window, predictor)
    assert data.climate is not None and data.climate_of is not None and len(data.climate) > 1
    seen: list[int] = []
    encoder = predictor.members[0].model.climate
    assert encoder is not None
    hook = encoder.register_forward_hook(lambda _module, args, _out: seen.append(len(args[0])))
    try:
        half = predictor.patch // 2
        sea = data.climate_of == data.climate_of[0]  # every cell of one climate series loses its centre pixel
        data.block[:, data.top[sea] + half, data.left[sea] + half] = np.nan
        coastal = predict_window(predictor, data)
    finally:
        hook.remove()
    assert sum(seen) == len(data.climate) - 1
    land = ~sea.reshape(window.shape)
    assert np.isnan(coastal["soc_median"][~land]).all() and np.isfinite(coastal["soc_median"][land]).all()


def test_windows_tile_the_output_exactly_once(region: tuple[Path, str]) -> None:
    _, root = region
    for chunk in (5, 7, 16, 64):
        grid = map_spec(f"{root}/cube.zarr", resolution=60, chunk=chunk).grid
        hits = np.zeros(grid.shape, dtype=int)
        for window in grid.windows():
            hits[window.rows, window.cols] += 1
        assert (hits == 1).all()


def test_written_map_equals_lazy_map_and_reruns_do_nothing(region: tuple[Path, str], tmp_path: Path) -> None:
    _, root = region
    out = str(tmp_path / "soc.zarr")
    lazy = predict(f"{root}/cube.zarr", resolution=60, chunk=9).compute()
    written = predict(f"{root}/cube.zarr", resolution=60, chunk=9, out=out, progress=False)
    for name in lazy.data_vars:
        np.testing.assert_array_equal(written[name].values, lazy[name].values)
    assert written.attrs["geosoc_status"] == "complete" and not Path(out + ".progress").exists()
    stamp = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}
    predict(f"{root}/cube.zarr", resolution=60, chunk=9, out=out, progress=False)
    assert stamp == {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}
    with pytest.raises(Exception, match="holds a map of another model, cube, grid or map layout"):
        predict(f"{root}/cube.zarr", resolution=90, chunk=9, out=out, progress=False)


def test_aoa_true_at_training_points_false_far_outside(region: tuple[Path, str], tmp_path: Path) -> None:
    """A map at the cube's resolution: the cells of training samples have DI ~0; cells whose covariates, imagery
    and climate both, were pushed far outside the training range are outside the AOA."""
    _, root = region
    alien = tmp_path / "alien"
    shutil.copytree(root, alien)
    cube = zarr.open_group(str(alien / "cube.zarr"), mode="r+")
    imagery = cube["imagery/data"]
    # One chunk far outside anything seen in training: mirrored and stretched 20-fold. (A constant offset of
    # thousands is no test: a ViT's layer norms map every such patch to one fixed, arbitrary embedding.)
    imagery[:, :32, :32] = imagery[:, :32, :32] * -20
    # ... and the climate cells under it alike: the climate half of the features would otherwise stay familiar.
    half = abs(float(cube["climate/x"][1] - cube["climate/x"][0])) / 2
    chunk_right, chunk_bottom = float(cube["imagery/x"][31]) + 15, float(cube["imagery/y"][31]) - 15
    cols = np.flatnonzero(cube["climate/x"][:] - half < chunk_right)
    rows = np.flatnonzero(cube["climate/y"][:] + half > chunk_bottom)
    climate = cube["climate/data"]
    block = climate[:, :, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    climate[:, :, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = block * -20
    changed_right = float(cube["climate/x"][cols.max()]) + half  # where some feature changed: above-left of this
    changed_bottom = float(cube["climate/y"][rows.max()]) - half
    ds = predict(str(alien / "cube.zarr"), resolution=30, chunk=32).compute()
    reference = checkpoint.load_aoa(f"{root}/models/finetune")
    assert reference is not None and reference.threshold > 0
    outside = ds["aoa"].values[4:28, 4:28]  # patches wholly inside the changed chunk
    assert np.nanmax(outside) == 0 and np.nanmin(ds["di"].values[4:28, 4:28]) > reference.threshold
    samples = open_sampleset(f"{root}/samples/labelled.zarr")
    fold, xs, ys = samples.fold.values, samples.x.values, samples.y.values
    halo = 4 * 30  # half a patch: a sample's patch may reach into the changed part from this far
    near = (xs < changed_right + halo) & (ys > changed_bottom - halo)
    keep = (fold != 0) & ~near  # trained on, away from the change
    rows_at = np.searchsorted(-ds.y.values, -ys[keep])
    cols_at = np.searchsorted(ds.x.values, xs[keep])
    assert keep.sum() >= 20
    assert np.allclose(ds.x.values[cols_at], xs[keep]) and np.allclose(ds.y.values[rows_at], ys[keep])
    at_points = ds["aoa"].values[rows_at, cols_at]
    assert np.nanmin(at_points) == 1 and np.nanmax(ds["di"].values[rows_at, cols_at]) < 1e-3


def _chunk_mtimes(url: str) -> dict[str, int]:
    return {str(p.relative_to(url)): p.stat().st_mtime_ns for p in Path(url).rglob("c/*/*") if p.is_file()}


def _marked(url: str) -> set[str]:
    return {p.name for p in Path(url + ".progress").glob("*/*")}


def test_kill_9_then_resume_gives_identical_map(region: tuple[Path, str], tmp_path: Path) -> None:
    import random

    from tests.helpers import MARKING_CLI, RandomKiller, run_guarded

    path, root = region
    work = tmp_path / "root"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("maps"))
    out = str(work / "maps" / "soc.zarr")
    command = [sys.executable, "-m", "geosoc.cli", "predict", "--catalog", str(path), "--root", str(work),
               "--resolution", "30", "--chunk", "12", "--no-export", "-q"]  # 64 windows
    with RandomKiller(MARKING_CLI) as killer:  # killed right after its n-th window, whatever the machine's load
        written = killer.kill_at_step(command[3:], random.Random(4).randint(16, 48))
    done = _marked(out)
    assert len(written) <= len(done) < 8 * 8
    assert zarr.open_group(out, mode="r").attrs["geosoc_status"] == "writing"
    before = _chunk_mtimes(out)
    resumed = run_guarded(command, progress=lambda: len(_marked(out)))
    assert resumed.returncode == 0, resumed.stderr
    after = _chunk_mtimes(out)
    for key in done:
        iy, ix = key.split(".")
        for name in ("soc_median", "aoa"):
            chunk = f"{name}/c/{iy}/{ix}"
            if chunk in before:
                assert after[chunk] == before[chunk], f"{chunk} was rewritten"
    undisturbed = tmp_path / "undisturbed"  # same command, same threads: the same numbers to the last bit
    shutil.copytree(root, undisturbed, ignore=shutil.ignore_patterns("maps"))
    command[command.index("--root") + 1] = str(undisturbed)
    fresh = str(undisturbed / "maps" / "soc.zarr")
    assert run_guarded(command, progress=lambda: len(_marked(fresh))).returncode == 0
    reference = open_map(str(undisturbed / "maps" / "soc.zarr"))
    got = open_map(out)
    assert got.attrs["geosoc_status"] == "complete"
    for name in reference.data_vars:
        np.testing.assert_array_equal(got[name].values, reference[name].values)


def test_cog_and_stac_exports_validate(region: tuple[Path, str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio
    import rioxarray  # noqa: F401  (the .rio accessor)
    from rio_cogeo.cogeo import cog_validate

    from geosoc.maps import export
    from tests.stac_schemas import PROJECTION, RASTER, validate_item

    _, root = region
    ds = predict(f"{root}/cube.zarr", resolution=60, out=str(tmp_path / "maps" / "soc.zarr"), progress=False)
    ds.attrs["depth"] = "0-20 cm"  # what catalog sampling.depth puts there
    titles: list[str] = []
    drawn = export.quicklook
    monkeypatch.setattr(export, "quicklook", lambda ds, url, title: titles.append(title) or drawn(ds, url, title))
    assets = export.export_maps(ds, str(tmp_path / "maps"))
    assert titles == ["tiny: soil organic carbon at 0-20 cm, imagery 2015-01-01 to 2015-12-31"]
    for name in ("soc_median", "soc_q05", "soc_q95", "aoa"):
        valid, errors, _ = cog_validate(assets[name])
        assert valid, (name, errors)
        with rasterio.open(assets[name]) as src:
            assert src.crs.to_epsg() == 3035
            values = src.read(1)
            expected = ds[name].values
            if name == "aoa":
                expected = np.where(np.isnan(expected), 255, expected).astype(np.uint8)
            np.testing.assert_array_equal(values, expected)
            assert tuple(src.transform)[:6] == tuple(ds.rio.transform())[:6]
            # band metadata, as QGIS and gdalinfo show it
            assert src.descriptions[0] == ds[name].attrs["long_name"]
            assert (src.units[0] or "") == ("" if name == "aoa" else "g/kg")
            assert src.nodata == 255 if name == "aoa" else np.isnan(src.nodata)
    # plain xarray + rioxarray see the CRS (CF grid_mapping) and what x and y are
    plain = xr.open_zarr(str(tmp_path / "maps" / "soc.zarr"), decode_coords="all", consolidated=False)
    assert plain.rio.crs.to_epsg() == 3035 and plain["soc_median"].rio.crs.to_epsg() == 3035
    assert plain.x.attrs["standard_name"] == "projection_x_coordinate" and plain.y.attrs["axis"] == "Y"
    assert plain["soc_median"].attrs["units"] == "g/kg" and "median" in plain["soc_median"].attrs["long_name"]
    item = json.loads(Path(assets["stac"]).read_text())
    # core 1.1.0 item, projection v2.0.0 and raster v1.1.0 schemas, all from disk (tests/stac_schemas.py)
    assert item["stac_version"] == "1.1.0" and set(item["stac_extensions"]) == {PROJECTION, RASTER}
    validate_item(item)
    assert item["properties"]["proj:code"] == "EPSG:3035" and item["properties"]["geosoc:depth"] == "0-20 cm"
    assert item["properties"]["proj:shape"] == [ds.sizes["y"], ds.sizes["x"]]
    assert set(item["assets"]) == {"soc_median", "soc_q05", "soc_q95", "aoa", "quicklook", "zarr"}
    assert all((tmp_path / "maps" / a["href"]).exists() for a in item["assets"].values())
    (self_link,) = [link for link in item["links"] if link["rel"] == "self"]
    assert self_link["href"] == str(tmp_path / "maps" / "item.json")
    # the cube named relative to the item, not by this machine's path
    assert item["properties"]["geosoc:cube"] == os.path.relpath(f"{root}/cube.zarr", tmp_path / "maps")
    bands = {key: item["assets"][key]["raster:bands"][0] for key in ("soc_median", "aoa")}
    assert bands["soc_median"]["nodata"] == "nan" and bands["soc_median"]["unit"] == "g/kg"
    assert bands["soc_median"]["data_type"] == "float32" and bands["aoa"] == {
        "nodata": 255, "data_type": "uint8", "spatial_resolution": 60.0}
    png = Path(assets["quicklook"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_dry_run_and_errors(region: tuple[Path, str], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from geosoc.cli import app

    path, root = region
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--catalog", str(path), "--root", root, "--dry-run"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # long paths wrap at the terminal's width
    assert "nothing written" in out and "bound by" in out
    assert not Path(root, "maps").exists()
    result = runner.invoke(app, ["predict", "--catalog", str(path), "--root", root, "--resolution", "10"])
    assert result.exit_code == 1 and "finer than the cube's 30" in result.output
    empty = tmp_path / "empty"
    shutil.copytree(root, empty, ignore=shutil.ignore_patterns("models"))
    result = runner.invoke(app, ["predict", "--catalog", str(path), "--root", str(empty)])
    assert result.exit_code == 1 and "models/finetune: no model here; make it with `geosoc finetune`" in result.output


@pytest.mark.parametrize("case", ["truncated weights", "config not JSON", "weights of another shape"])
def test_a_damaged_checkpoint_stops_predict_and_finetune_before_they_write(case: str, region: tuple[Path, str],
                                                                            tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from geosoc.cli import app
    from tests.helpers import TAMPERING, files_state

    path, root = region
    copy = tmp_path / "root"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("maps"))
    damage = TAMPERING[case][0]
    damage(str(copy / "models" / "finetune"))
    damage(str(copy / "models" / "finetune" / "last"))
    before = files_state(copy)
    for command in (["predict", "-q"], ["finetune", "--test-fold", "0"]):
        result = CliRunner().invoke(app, [*command, "--catalog", str(path), "--root", str(copy)])
        assert result.exit_code == 1, result.output
        message = result.output.strip().splitlines()[-1]
        assert message.startswith("error: ") and "models/finetune" in message and "Traceback" not in result.output
    assert files_state(copy) == before  # nothing written, nothing changed


@pytest.fixture(scope="module")
def one_thread_map(trained_region: tuple[Path, str]) -> xr.Dataset:
    """The region's map at 30 m in 16-cell windows by the local engine on one torch thread, as a one-CPU Ray actor
    computes it: the Ray maps below must equal it to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return predict(f"{trained_region[1]}/cube.zarr", resolution=30, chunk=16).compute()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_ray_actor_killed_mid_run_gives_identical_map(ray_head, region: tuple[Path, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      one_thread_map: xr.Dataset) -> None:
    """On the session's real Ray head, one map actor is SIGKILLed mid-run: the map equals an undisturbed one."""
    import ray

    from tests.helpers import ray_actor_pids

    _, root = region
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address=ray_head["gcs"], log_to_driver=False)
    try:
        options: dict[str, Any] = dict(resolution=30, chunk=16, engine="ray", max_actors=2, progress=False)  # 36 windows
        out = str(tmp_path / "killed.zarr")
        killed: list[int] = []

        def kill_an_actor() -> None:
            pids = ray_actor_pids(Path(ray_head["temp"]), "WindowWorker")
            assert pids, "no map actor to kill"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        _once_windows_are_written(monkeypatch, out, 2, kill_an_actor)
        got = predict(f"{root}/cube.zarr", out=out, **options)
        assert killed, "no actor was killed"
        assert got.attrs["geosoc_status"] == "complete"
        for name in one_thread_map.data_vars:  # an undisturbed map, to the bit
            np.testing.assert_array_equal(got[name].values, one_thread_map[name].values)
    finally:
        ray.shutdown()


def _once_windows_are_written(monkeypatch: pytest.MonkeyPatch, out: str, windows: int,
                              act: Callable[[], None]) -> None:
    """Run `act` once, in the map's driver, at the first result it collects once `windows` windows of `out` are
    written: mid-run whatever the machine's load (it has collected at most that many results), where a thread
    polling beside the map could come too late."""
    from geosoc.maps import ray_engine

    result = ray_engine._result
    acted: list[bool] = []

    def collecting(ref: Any, task_error: type[Exception]) -> Any:
        got = result(ref, task_error)
        if not acted and len(_marked(out)) >= windows:
            acted.append(True)
            act()
        return got

    monkeypatch.setattr(ray_engine, "_result", collecting)


def _wait_while(job: threading.Thread, condition: Callable[[], object], out: str) -> None:
    """Wait until `condition()` holds; fail if the map job ended first (so the wait cannot outlive the job), or
    once no window of `out` has been written for PROGRESS_GUARD_S (a job held up would otherwise hang the suite)."""
    from tests.helpers import wait_with_progress

    def done() -> bool:
        assert job.is_alive(), "the map finished or failed before the awaited moment"
        return bool(condition())

    wait_with_progress(done, lambda: len(_marked(out)), f"the map {out}")


@pytest.mark.slow
def test_ray_job_submit_predict(ray_head, trained_region: tuple[Path, str], tmp_path: Path) -> None:
    """`ray job submit` of jobs/predict.py: Ray actors on the real head write the map and its exports."""
    from tests.helpers import copy_region, submit_job

    catalog, root = copy_region(trained_region, tmp_path)
    done = submit_job(ray_head, ["--", "python", "jobs/predict.py", "--catalog", str(catalog), "--root", root,
                                 "--max-actors", "1"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "predict finished: " in done.stdout
    assert "map actor 1 of 1 up" in done.stdout + done.stderr  # geosoc's own log lines reach the job's log
    maps = Path(root) / "maps"
    assert {"soc_median.tif", "aoa.tif", "quicklook.png", "item.json"} <= {p.name for p in maps.iterdir()}
    assert zarr.open_group(str(maps / "soc.zarr"), mode="r").attrs["geosoc_status"] == "complete"


def test_ray_map_grows_onto_a_node_that_joins_after_it_started(ray_cluster, region: tuple[Path, str],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture,
                                                              one_thread_map: xr.Dataset) -> None:
    """An autoscaling cluster in small (Ray's own multi-node harness): `max_actors=2` of 2 CPUs each on a 2-CPU
    head, so one actor starts and one waits. A second node joins while the map runs; with the first actor stopped
    (SIGSTOP) the map goes on only through the actor that started on the new node. The map is complete and equals
    the local engine's."""
    import logging

    from tests.helpers import ray_actor_pids, wait_with_progress

    _, root = region
    out = str(tmp_path / "grown.zarr")
    stopped: list[int] = []
    caplog.set_level(logging.INFO, logger="geosoc.maps.ray_engine")

    def stop_the_actor() -> None:
        (first,) = ray_actor_pids(ray_cluster.temp, "WindowWorker")
        os.kill(first, signal.SIGSTOP)
        stopped.append(first)

    _once_windows_are_written(monkeypatch, out, 3, stop_the_actor)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["ds"] = predict(f"{root}/cube.zarr", out=out, resolution=30, chunk=16, engine="ray", max_actors=2,
                                   cpus_per_actor=2, progress=False)  # 36 windows
        except BaseException as error:  # raised in the test below
            result["error"] = error

    job = threading.Thread(target=run, daemon=True)
    job.start()
    try:
        _wait_while(job, lambda: stopped, out)
        before = len(_marked(out))
        ray_cluster.add_node(num_cpus=2)
        _wait_while(job, lambda: len(_marked(out)) > before + 3, out)  # written by the second actor only
    finally:
        for pid in stopped:  # the map ends whatever happened, before the cluster goes
            os.kill(pid, signal.SIGCONT)
        wait_with_progress(lambda: not job.is_alive(), lambda: len(_marked(out)), f"the map {out} to end")
    if "error" in result:
        raise result["error"]
    assert result["ds"].attrs["geosoc_status"] == "complete"
    assert "map actor 2 of 2 up" in caplog.text
    for name in one_thread_map.data_vars:  # its actors have two torch threads: equal up to rounding
        np.testing.assert_allclose(result["ds"][name].values, one_thread_map[name].values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizing,resources,windows,expected", [
    (dict(max_actors=8, gpus_per_actor=1), {"CPU": 4}, 100, (8, 1.0, 1.0)),  # the autoscaler brings the GPUs
    (dict(max_actors=8), {"CPU": 4}, 5, (5, 0.0, 1.0)),  # never more actors than windows
    (dict(), {"CPU": 16, "GPU": 2}, 100, (2, 1.0, 1.0)),  # nothing asked: what is up now
    (dict(cpus_per_actor=2), {"CPU": 7}, 100, (3, 0.0, 2.0)),
    (dict(), {}, 100, (1, 0.0, 1.0)),
])
def test_a_ray_map_asks_for_what_the_user_asked(sizing: dict[str, Any], resources: dict[str, float], windows: int,
                                                expected: tuple[int, float, float]) -> None:
    from geosoc.maps.ray_engine import actor_count, actor_shape
    from geosoc.maps.windows import RaySizing

    asked = RaySizing(**sizing)
    assert (actor_count(asked, resources, windows)[0], *actor_shape(asked, resources)) == expected


def test_an_error_in_a_map_actor_ends_the_job_with_its_own_line(ray_head, region: tuple[Path, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged cube chunk is met by an actor, not the driver: `geosoc predict --engine ray` still ends with the
    one line that names it (the actor's error raised as itself), as the local engine does."""
    import ray
    from typer.testing import CliRunner

    from geosoc.cli import app
    from tests.helpers import copy_region

    catalog, root = copy_region(region, tmp_path, leave_out=("maps",))
    chunk = max((p for p in Path(root, "cube.zarr/imagery/data/c").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:-1])
    monkeypatch.setenv("RAY_ADDRESS", ray_head["gcs"])  # the CLI's ray.init() joins the session's head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        result = CliRunner().invoke(app, ["predict", "--catalog", str(catalog), "--root", root, "--engine", "ray",
                                          "--max-actors", "1", "--no-export", "-q"])
    finally:
        ray.shutdown()
    assert result.exit_code == 1, result.output[-3000:]
    assert result.output.strip().splitlines()[-1].startswith(f"error: {chunk}: this stored chunk is damaged")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("target,folder,expected", [
    ("/data/region/cube.zarr", "/data/region/maps", "../cube.zarr"),
    ("s3://soil/demo/models/finetune", "s3://soil/demo/maps", "../models/finetune"),
    ("s3://other/demo/cube.zarr", "s3://soil/demo/maps", "s3://other/demo/cube.zarr"),  # another bucket: its URL
    ("gs://soil/demo/cube.zarr", "s3://soil/demo/maps", "gs://soil/demo/cube.zarr"),
    ("", "s3://soil/demo/maps", ""),
])
def test_the_stac_item_names_what_it_came_from_relative_to_itself(target: str, folder: str, expected: str) -> None:
    from geosoc.maps.export import relative_to

    assert relative_to(target, folder) == expected


@pytest.mark.parametrize("length,bar", [(0.56, 0.5), (3.1, 2), (7.9, 5), (10, 10), (1234, 1000)])
def test_the_quicklook_scale_bar_has_a_round_length(length: float, bar: float) -> None:
    from geosoc.maps.export import _round_length

    assert _round_length(length) == bar


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA device")]),
])
def test_the_mapped_interval_at_a_sample_is_the_calibrated_one(region: tuple[Path, str], device: str) -> None:
    """Calibration (training's `forward_all`, which the CQR offset and the AOA reference come from) and the map's
    predictor compute a sample's quantiles on one numeric path: bf16 autocast on CUDA, fp32 on the CPU."""
    from geosoc.data.streaming import SampleData
    from geosoc.learn.training import forward_all
    from geosoc.maps.predictor import Predictor
    from geosoc.stats.calibration import interval

    _, root = region
    model_url = f"{root}/models/finetune"
    model, meta = checkpoint.load_model(model_url, device=device)
    norm = Normalisation.from_dict(meta["normalisation"])
    data = SampleData(f"{root}/samples/labelled.zarr")
    samples = np.arange(16)
    z, _ = forward_all(model, data, samples, norm, torch.device(device), batch_size=1, workers=0)  # as one-cell maps
    lower, median, upper = interval(torch.from_numpy(z), model.config.quantiles, meta["calibration"]["offset"])
    calibrated = {"soc_q05": norm.decode_target(lower), "soc_median": norm.decode_target(median),
                  "soc_q95": norm.decode_target(upper)}
    predictor = Predictor(model_url, device)
    rows = data.rows(samples)
    for i in range(len(samples)):  # each sample's patch as a one-cell window, its climate series beside it
        mapped = predictor.predict(rows["patch"][i], np.array([0]), np.array([0]), rows["climate"][i : i + 1])
        for name, values in calibrated.items():
            # bf16 against fp32 differs by ~1e-3..1e-2; the same path only by kernel noise
            np.testing.assert_allclose(mapped[name][0], float(values[i]), rtol=1e-6 if device == "cpu" else 1e-4,
                                       err_msg=name)
