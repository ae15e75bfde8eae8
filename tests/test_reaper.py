"""The reaper (tests/reaper.py): a server that a crashed pytest worker leaves running is stopped by the controlling
pytest process at the end of the run, its temp folder removed, and the run fails saying so; a run whose tests stop
what they start passes. Each case is a pytest run of a tiny test file with the reaper's hooks alone."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import psutil

from tests.helpers import REPO, run_guarded

# A test file for the inner runs: `start` launches a server (an HTTP server on loopback, a process of its own
# session, as `ray start` leaves its daemons) and writes its pid and start time where the outer test reads them.
INNER = '''
import json, os, signal, subprocess, sys, tempfile
from pathlib import Path

import psutil

from tests.reaper import record

SEEN = Path(os.environ["REAPER_TEST_SEEN"])


def start(name, recorded=True):
    temp = tempfile.mkdtemp(prefix="geosoc-reaper-test-")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", temp],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if recorded:
        record(name, [server.pid], temp)
    (SEEN / name).write_text(json.dumps({"pid": server.pid, "started": psutil.Process(server.pid).create_time(),
                                         "temp": temp}))
    return server


def test_crashes_leaving_servers():
    start("recorded")
    start("unrecorded", recorded=False)
    os.kill(os.getpid(), signal.SIGKILL)  # the pytest worker dies: no fixture teardown, nothing stopped


def test_leaves_a_server():
    start("left")


def test_stops_its_server():
    server = start("stopped")
    server.terminate()
    server.wait()
'''


def _inner_run(tmp_path: Path, test: str, *pytest_args: str) -> tuple[int, str, dict[str, dict]]:
    """Run one test of INNER under pytest with the reaper's hooks (and `pytest_args`); its exit status, output,
    and the servers it started."""
    import json

    (tmp_path / "test_inner.py").write_text(INNER)
    seen = tmp_path / "seen"
    seen.mkdir()
    # only xdist and the reaper: the plugins installed beside them (zarr's, hypothesis's) take seconds to load
    env = {**os.environ, "PYTHONPATH": str(REPO), "REAPER_TEST_SEEN": str(seen), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = run_guarded([sys.executable, "-m", "pytest", "-p", "xdist.plugin", "-p", "tests.reaper", "-p",
                        "no:cacheprovider", "-q", *pytest_args, f"test_inner.py::{test}"], cwd=tmp_path, env=env)
    servers = {p.name: json.loads(p.read_text()) for p in seen.iterdir()}
    return done.returncode, done.stdout + done.stderr, servers


def _running(server: dict) -> bool:
    try:
        process = psutil.Process(server["pid"])
        return abs(process.create_time() - server["started"]) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_servers_a_crashed_worker_left_are_stopped_and_reported(tmp_path: Path) -> None:
    code, output, servers = _inner_run(tmp_path, "test_crashes_leaving_servers", "-n", "1", "--max-worker-restart=0")
    assert set(servers) == {"recorded", "unrecorded"}, output
    try:
        assert code != 0 and "crashed" in output, output
        for name, server in servers.items():
            assert not _running(server), f"the {name} server outlived the run"
            assert f"pid {server['pid']} " in output, output  # reported
        assert not Path(servers["recorded"]["temp"]).exists()  # its temp folder removed
        assert "the run left 2 processes running: stopped them" in output, output
    finally:  # should the reaper have failed, this test stops what it started
        for server in servers.values():
            if _running(server):
                psutil.Process(server["pid"]).kill()
            shutil.rmtree(server["temp"], ignore_errors=True)  # the unrecorded server's: the reaper cannot know it


def test_a_run_whose_tests_pass_fails_when_it_leaves_a_server_running(tmp_path: Path) -> None:
    code, output, servers = _inner_run(tmp_path, "test_leaves_a_server")
    try:
        assert code == 1 and "1 passed" in output, output
        assert "the run left 1 process running: stopped them" in output and "(left)" in output, output
        assert not _running(servers["left"])
    finally:
        if _running(servers["left"]):
            psutil.Process(servers["left"]["pid"]).kill()


def test_a_run_that_stops_what_it_starts_passes(tmp_path: Path) -> None:
    code, output, servers = _inner_run(tmp_path, "test_stops_its_server", "-n", "1")  # xdist's workers end unflagged
    assert code == 0 and "processes running" not in output, output
    assert not _running(servers["stopped"])
