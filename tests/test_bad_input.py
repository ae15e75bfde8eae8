"""Bad input over the CLI, as a user (or a hostile one) gives it: exit 1, a last line `error: ...` naming the
input, no traceback, and nothing new or changed on disk. Good but unusual input is accepted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from geosoc.catalog import load_catalog
from geosoc.cli import app
from geosoc.data.cube import build_cube
from geosoc.data.sampling import open_sampleset
from tests.helpers import files_state, tiny_catalog_dict, without_root_rights

MONTHS = ["2010-01", "2010-02"]


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny region (catalog, cube, labelled samples) and input files, good and bad."""
    folder = tmp_path_factory.mktemp("bad-input")
    catalog = folder / "tiny.yaml"
    catalog.write_text(yaml.safe_dump({**tiny_catalog_dict(), "sampling": {"patch_size": 8, "folds": 2,
                                                                           "fold_block_size": 600}}))
    build_cube(load_catalog(path=catalog), str(folder / "root"), progress=False)
    grid = load_catalog(path=catalog).config.imagery_grid
    xs, ys = grid.x_of(np.arange(10, 90, 8)), grid.y_of(np.arange(10, 90, 8))
    (folder / "points.csv").write_text("x,y,soc\n" + "".join(f"{x},{y},{10 + i}\n" for i, (x, y) in
                                                              enumerate(zip(xs, ys))))  # no id column
    header = "x,y,soc," + ",".join(f"pr_{m}" for m in MONTHS)
    (folder / "series.csv").write_text(header + "\n" + "".join(f"{x},{y},{i},1,2\n" for i, (x, y) in
                                                              enumerate(zip(xs, ys))))
    np.save(folder / "objects.npy", np.array([{"a": 1}] * len(xs), dtype=object), allow_pickle=True)
    (folder / "text.npy").write_text("not an array\n")
    (folder / "a-file").write_text("")
    result = CliRunner().invoke(app, [arg.replace("{f}", str(folder)) for arg in [*SAMPLE, "--points",
                                                                                  "{f}/points.csv"]])
    assert result.exit_code == 0, result.output
    return folder


def _damage_cube(folder: Path) -> None:
    (folder / "root" / "cube.zarr" / "zarr.json").write_text("{ damaged")


SAMPLE_TABLE = ["sample-table", "--table", "{f}/series.csv", "--x-col", "x", "--y-col", "y", "--target-col", "soc",
                "--points-crs", "EPSG:3035", "--crs", "EPSG:3035"]
SAMPLE = ["sample", "--catalog", "{f}/tiny.yaml", "--root", "{f}/root", "--x-col", "x", "--y-col", "y",
          "--target-col", "soc", "--points-crs", "EPSG:3035", "-q"]

CASES: dict[str, tuple[list[str], str, Callable[[Path], None] | None]] = {
    "patches of Python objects": ([*SAMPLE_TABLE, "--out", "{f}/o.zarr", "--patches", "{f}/objects.npy"],
                                  "objects.npy: not a NumPy .npy array (--patches)", None),
    "patches that are text": ([*SAMPLE_TABLE, "--out", "{f}/o.zarr", "--patches", "{f}/text.npy"],
                              "text.npy: not a NumPy .npy array (--patches)", None),
    "patches missing": ([*SAMPLE_TABLE, "--out", "{f}/o.zarr", "--patches", "{f}/none.npy"],
                        "none.npy: no such file (--patches)", None),
    "unknown SampleSet CRS": ([*SAMPLE_TABLE[:-1], "EPSG:999999", "--out", "{f}/o.zarr"],
                              "'EPSG:999999' is not a CRS pyproj knows", None),
    "unknown points CRS": ([*SAMPLE_TABLE[:10], "EPSG:999999", *SAMPLE_TABLE[11:], "--out", "{f}/o.zarr"],
                           "series.csv: the coordinates' CRS (--points-crs): 'EPSG:999999'", None),
    "SampleSet under a file": ([*SAMPLE_TABLE, "--out", "{f}/a-file/o.zarr"], "a-file: cannot write here", None),
    "samples into a root under a file": ([*SAMPLE[:4], "{f}/a-file/root", *SAMPLE[5:], "--points",
                                          "{f}/points.csv"], "a-file/root: cannot write here (", None),
    "models under a file (finetune)": (["finetune", "--catalog", "{f}/tiny.yaml", "--root", "{f}/root", "-q"],
                                       "root/models: cannot write here",  # the lock models/finetune.lock goes first
                                       lambda folder: (folder / "root" / "models").write_text("")),
    "damaged cube metadata (sample)": ([*SAMPLE, "--points", "{f}/points.csv"],
                                       "cube.zarr: its Zarr metadata is damaged", _damage_cube),
    "damaged cube metadata (build-cube)": (["build-cube", "--catalog", "{f}/tiny.yaml", "--root", "{f}/root", "-q"],
                                           "cube.zarr: its Zarr metadata is damaged", _damage_cube),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(case: str, region: Path, tmp_path: Path) -> None:
    folder = tmp_path / "f"
    shutil.copytree(region, folder)
    args, message, prepare = CASES[case]
    if prepare is not None:
        prepare(folder)
    before = files_state(folder)
    result = CliRunner().invoke(app, [arg.replace("{f}", str(folder)) for arg in args])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.output, result.output
    assert files_state(folder) == before


@pytest.mark.parametrize("command", ["sample", "finetune"])
def test_a_read_only_root_fails_before_any_work(command: str, region: Path) -> None:
    """Run as an unprivileged user (root writes into read-only folders), in a folder that user can read."""
    folder = Path(tempfile.mkdtemp(prefix="geosoc-read-only-"))
    try:
        folder.chmod(0o755)
        shutil.copytree(region, folder / "f")
        for path in (folder / "f", *(folder / "f").rglob("*")):  # readable by all, writable by its owner (root)
            path.chmod(0o755 if path.is_dir() else 0o644)
        home = folder / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)  # the user's own HOME (caches), not the read-only target
        target = folder / "f" / "root" / ("samples" if command == "sample" else "models")
        target.mkdir(exist_ok=True)
        target.chmod(0o555)
        args = [*SAMPLE, "--points", "{f}/points.csv"] if command == "sample" else [
            "finetune", "--catalog", "{f}/tiny.yaml", "--root", "{f}/root", "-q"]  # the region's labelled samples
        before = files_state(folder / "f")
        done = subprocess.run([*without_root_rights(target), sys.executable, "-m", "geosoc.cli",
                               *(arg.replace("{f}", str(folder / "f")) for arg in args)],
                              capture_output=True, text=True, cwd=folder, env={**os.environ, "HOME": str(home)})
        assert done.returncode == 1 and "cannot write here" in done.stderr, done.stdout + done.stderr
        assert files_state(folder / "f") == before
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_points_without_ids_are_named_by_their_line_and_a_table_without_targets_is_unlabelled(region: Path,
                                                                                               tmp_path: Path) -> None:
    folder = tmp_path / "f"
    shutil.copytree(region, folder)
    result = CliRunner().invoke(app, [arg.replace("{f}", str(folder)) for arg in [*SAMPLE, "--points",
                                                                                  "{f}/points.csv"]])
    assert result.exit_code == 0, result.output
    ids = open_sampleset(str(folder / "root" / "samples" / "labelled.zarr"))["sample_id"].values
    assert set(ids) <= {f"row{line}" for line in range(2, 12)} and len(ids) > 5
    table = folder / "no-target.csv"
    table.write_text("x,y,pr_2010-01,pr_2010-02\n1,2,3,4\n5,6,7,8\n")
    result = CliRunner().invoke(app, ["sample-table", "--table", str(table), "--x-col", "x", "--y-col", "y",
                                      "--points-crs", "EPSG:3035", "--crs", "EPSG:3035", "--out",
                                      str(folder / "u.zarr")])
    assert result.exit_code == 0, result.output
    assert open_sampleset(str(folder / "u.zarr")).attrs["kind"] == "unlabelled"


def test_dropped_rows_of_a_table_are_reported(region: Path, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("x,y,soc,pr_2010-01\n1,2,3,4\n5,,7,8\n9,10,-1,12\n")
    result = CliRunner().invoke(app, ["sample-table", "--table", str(table), "--x-col", "x", "--y-col", "y",
                                      "--target-col", "soc", "--points-crs", "EPSG:3035", "--crs", "EPSG:3035",
                                      "--on-error", "drop", "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    assert "2 problem(s), rows dropped" in result.output and "row 3: x/y: missing coordinate" in result.output
    assert "row 4: soc: negative SOC" in result.output
    assert json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["kind"] == "labelled"


DAMAGED = {  # what is damaged: (the array whose chunk is cut short, the command that reads it, first step)
    "cube": ("cube.zarr/imagery/data", ["predict", "--no-export", "-q"], None),
    "SampleSet": ("samples/labelled.zarr/patch", ["finetune", "--fresh", "--epochs", "1", "-q"], None),
    "map": ("maps/soc.zarr/soc_median", ["predict", "-q"], ["predict", "--no-export", "-q"]),
}


@pytest.mark.parametrize("what", list(DAMAGED))
def test_a_damaged_chunk_is_one_error_naming_it(what: str, trained_region: tuple[Path, str], tmp_path: Path) -> None:
    """An object that lost its last byte (as one GCS emulator did to uploads ending in \\r) is named, not a zstd
    traceback."""
    from tests.helpers import copy_region

    catalog, root = copy_region(trained_region, tmp_path)
    array, command, first = DAMAGED[what]
    where = ["--catalog", str(catalog), "--root", root]
    if first is not None:
        assert CliRunner().invoke(app, [first[0], *where, *first[1:]]).exit_code == 0
    chunk = max((p for p in Path(root, array, "c").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[:-1])
    result = CliRunner().invoke(app, [command[0], *where, *command[1:]])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {chunk}: this stored chunk is damaged"), result.output[-3000:]
    assert "Traceback" not in result.output
