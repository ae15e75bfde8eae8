"""One writer per artefact: a second run is refused clearly; a lock a killed run left is taken over."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geosoc.errors import GeosocError
from geosoc.io import locks


def test_a_second_writer_is_refused_and_the_lock_is_released_after(tmp_path: Path) -> None:
    url = str(tmp_path / "thing.zarr")
    with locks.exclusive(url, "build-cube"):
        with pytest.raises(GeosocError, match=r"thing.zarr: another run \(build-cube, pid \d+ on .*\) is writing it"):
            with locks.exclusive(url, "build-cube"):
                pass
    assert not Path(locks.lock_url(url)).exists()
    with locks.exclusive(url, "build-cube"):  # free again
        pass


def _plant(url: str, **holder: object) -> None:
    Path(locks.lock_url(url)).write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "work": "sample",
                                                     "renewed": time.time(), **holder}))


def test_a_lock_whose_run_is_gone_is_taken_over(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    _plant(url, host=socket.gethostname(), pid=int(dead.stdout))  # this machine, a process that has ended
    with locks.exclusive(url, "sample"):
        pass
    _plant(url, renewed=time.time() - locks.LEASE_S - 1)  # another machine, not renewed within the lease
    with locks.exclusive(url, "sample"):
        pass
    _plant(url)  # another machine, renewed just now: its run is alive
    with pytest.raises(GeosocError, match="on elsewhere"):
        with locks.exclusive(url, "sample"):
            pass


def test_the_holder_renews_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks, "RENEW_S", 0.05)
    url = str(tmp_path / "m.zarr")
    with locks.exclusive(url, "predict"):
        first = json.loads(Path(locks.lock_url(url)).read_text())["renewed"]
        time.sleep(0.3)
        assert json.loads(Path(locks.lock_url(url)).read_text())["renewed"] > first


def test_two_builds_of_one_cube_at_once(tmp_path: Path, write_catalog) -> None:
    """Started together: one builds, the other stops with one clear line (or, started after the first ended,
    finds the cube complete); the cube is whole either way."""
    from geosoc.data.cube import open_cube

    catalog = write_catalog(size_px=384, chunk=32)
    command = [sys.executable, "-m", "geosoc.cli", "build-cube", "--catalog", str(catalog), "--root",
               str(tmp_path / "root"), "--workers", "1", "-q"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes in ([0, 0], [0, 1]), outputs
    for run, (_, err) in zip(runs, outputs):
        assert "Traceback" not in err, err
        if run.returncode == 1:
            assert err.strip().splitlines()[-1].startswith("error: ") and "is writing it" in err
    tree = open_cube(str(tmp_path / "root" / "cube.zarr"))
    assert tree.attrs["geosoc_status"] == "complete"
    assert not (tmp_path / "root" / "cube.zarr.lock").exists()
