"""What geosoc leaves in a log and in the stores it publishes: progress as whole lines off a terminal (no
carriage-return frames), and consolidated Zarr metadata, so plain `xr.open_zarr` opens cubes, SampleSets and
maps without a warning."""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import pytest
import xarray as xr
from tqdm.auto import tqdm

from geosoc.io import bars
from tests.helpers import REPO, copy_region, run_guarded


def test_off_a_terminal_a_bar_is_a_line_at_each_tenth(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(bars, "LOG_CHECK_S", 0.0)  # tqdm asks at every update whether a line is due
    with bars.progress_bar(total=250, desc="build-cube", unit="chunk") as bar:
        for i in range(250):
            bar.update(1)
            if i == 100:
                tqdm.write("a line of its own", file=log)
    with bars.progress_bar(total=50, desc="epoch", leave=False) as batches:  # a vanishing bar: not in a log
        batches.update(50)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert "a line of its own" in lines
    progress = [line for line in lines if line.startswith("build-cube:")]
    assert [line.split()[1] for line in progress] == [f"{p}%" for p in range(0, 101, 10)]
    assert progress[-1].startswith("build-cube: 100% 250/250 [")
    assert not any(line.startswith("epoch") for line in lines)


def test_a_command_writing_to_a_log_writes_lines(tmp_path: Path, write_catalog) -> None:
    """`geosoc build-cube` with its output redirected (as in CI, nohup or a Ray job): no bar frames."""
    catalog = write_catalog()
    done = run_guarded([sys.executable, "-m", "geosoc.cli", "build-cube", "--catalog", str(catalog), "--root",
                        str(tmp_path / "root"), "--workers", "1"], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "60"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "\r" not in done.stdout
    assert "build-cube: 100%" in done.stderr
    assert all(len(line) < 200 for line in done.stderr.splitlines())


def open_quietly(url: str, **kwargs: object) -> xr.Dataset:
    """`xr.open_zarr` as a user calls it (consolidated metadata looked for), any warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(url, **kwargs)


def test_published_stores_open_in_plain_xarray_without_a_warning(trained_region: tuple[Path, str],
                                                                 tmp_path: Path) -> None:
    from geosoc.catalog import load_catalog
    from geosoc.maps.inference import map_region

    catalog, root = copy_region(trained_region, tmp_path, leave_out=("maps",))
    map_region(load_catalog(path=catalog).config, root, progress=False, export=False)
    assert "soc_median" in open_quietly(f"{root}/maps/soc.zarr")
    assert "patch" in open_quietly(f"{root}/samples/labelled.zarr")
    assert "data" in open_quietly(f"{root}/cube.zarr", group="imagery")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(xr.open_datatree(f"{root}/cube.zarr", engine="zarr").children) >= {"imagery", "climate"}
