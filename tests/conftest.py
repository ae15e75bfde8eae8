"""Shared fixtures: tiny catalogs written per test, offline settings."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EDGEROI = REPO / "geosoc" / "data" / "edgeroi"


def kill_at_random(script: str, args: list[str], rng: random.Random, low: float, high: float) -> None:
    """Run `script` (`python -c`, the repository importable) and SIGKILL it at a random moment, `low` to `high`
    seconds after it prints "ready" (so that kills land in its work, not in its imports)."""
    run = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.stdout is not None and run.stdout.readline().strip() == b"ready"
    time.sleep(rng.uniform(low, high))
    run.send_signal(signal.SIGKILL)
    run.wait()


def files_state(folder: Path) -> dict[str, int | None]:
    """Every path below `folder`, and when each file was last written (to tell that a run wrote nothing)."""
    return {str(p): p.stat().st_mtime_ns if p.is_file() else None for p in folder.rglob("*")}


def tiny_catalog_dict(size_px: int = 96, chunk: int = 32, climate: bool = True) -> dict[str, Any]:
    """A synthetic region of size_px x size_px pixels at 30 m in EPSG:3035, climate at 960 m."""
    x0, y0 = 4419990, 2824380  # includes a lake: nodata pixels
    side = size_px * 30
    data: dict[str, Any] = {
        "region": {"name": "tiny", "crs": "EPSG:3035", "bounds": [x0, y0, x0 + side, y0 + side]},
        "imagery": {"resolution": 30, "chunk": chunk, "source": {"kind": "synthetic", "seed": 7}},
    }
    if climate:
        data["climate"] = {
            "resolution": 960,
            "chunk": 2,
            "source": {"kind": "synthetic", "seed": 7},
            "variables": ["pr", "tmmx", "swe"],
            "start": "2014-10",
            "end": "2015-01",
        }
    return data


@pytest.fixture
def write_catalog(tmp_path: Path) -> Callable[..., Path]:
    """Write a catalog dict (default: the tiny synthetic region) to a YAML file and return its path."""

    def write(data: dict[str, Any] | None = None, name: str = "tiny.yaml", **kwargs: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data if data is not None else tiny_catalog_dict(**kwargs), sort_keys=False))
        return path

    return write


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head():
    """A real local Ray head on loopback, with auth mode set explicitly."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path("/tmp") / f"geosoc-ray-{os.getpid()}"
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # jobs' `python` is the venv's
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    if started.returncode != 0:
        pytest.fail(f"ray start failed: {started.stderr[-2000:]}")
    yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "env": env, "ray": str(ray_bin),
           "temp": str(temp)}
    stop_ray_processes_under(temp)
    shutil.rmtree(temp, ignore_errors=True)


def stop_ray_processes_under(temp: Path) -> None:
    """Stop the head this test started, and only it: the processes whose command line names its --temp-dir
    (GCS, raylet, dashboard, ...) and their descendants (workers). `ray stop` would stop every Ray on the machine."""
    import psutil

    own = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(temp) in part for part in proc.info["cmdline"] or []):
            own.append(proc)
    everything = {p.pid: p for p in own}
    for proc in own:
        try:
            everything.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    for proc in everything.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(everything.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
