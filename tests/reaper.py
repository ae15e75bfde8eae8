"""Nothing the suite starts outlives it, even where the pytest worker that started it crashes.

A fixture that starts a server in another process (a Ray head, a Ray node, any subprocess server) records its
process ids and temp folder with `record` in a folder of this run, which the controlling pytest process makes at
configure time and hands to its xdist workers (and to every process they start) through RUN_FOLDER_ENV. At the
end of the session the controlling process reaps:

- every recorded process still alive (the same process: its start time is recorded, so a reused pid is spared)
  and its descendants, and removes the recorded temp folders;
- every other process still alive that carries this run's RUN_FOLDER_ENV in its environment (a server nobody
  recorded, a Ray worker whose raylet was killed), after giving it a moment to end by itself.

Processes are found by pid and by the run's own marker, never by name. What had to be stopped is reported at the
end of the run and makes the run fail: a suite that leaves a process running is a failing suite.

`python -m tests.reaper VARIABLE` is the same sweep for a whole CI run (`.ci/run`): it stops every process whose
environment holds VARIABLE with the value this process has, and exits 1 naming them. Standard library and psutil
only: it is imported by every pytest process of the run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest

RUN_FOLDER_ENV = "GEOSOC_TEST_RUN_FOLDER"
GRACE_S = 5  # how long a leftover process of the run may take to end by itself before it is stopped


def record(what: str, pids: Iterable[int], temp: str | Path | None = None) -> None:
    """Note processes this run started (and the temp folder they write to) for the reaper: `what` names them in
    its report. Outside a pytest run of this plugin (no run folder) it does nothing."""
    folder = os.environ.get(RUN_FOLDER_ENV)
    if not folder or not Path(folder).is_dir():
        return
    processes = []
    for pid in pids:
        try:
            processes.append({"pid": pid, "started": psutil.Process(pid).create_time()})
        except psutil.NoSuchProcess:
            continue
    entry = {"what": what, "processes": processes, "temp": str(temp) if temp is not None else None}
    name = f"{os.getpid()}-{uuid.uuid4().hex}.json"
    part = Path(folder, name + ".part")
    part.write_text(json.dumps(entry))
    part.replace(Path(folder, name))  # the reaper never reads half a record


def _same_process(pid: int, started: float) -> psutil.Process | None:
    """The process `pid` if it is still the one that started at `started` (not a later one given its pid)."""
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None


def _with_descendants(processes: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for process in processes:
        found[process.pid] = process
        try:
            found.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:
            pass
    return found


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid} {' '.join(process.cmdline())[:160] or process.name()}"
    except psutil.Error:
        return f"pid {process.pid} (ended)"


def stop(processes: Iterable[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is still alive 5 s later (a stopped process only ends by SIGKILL)."""
    processes = list(processes)
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def carrying(variable: str, value: str) -> list[psutil.Process]:
    """Live processes (of this user) whose environment sets `variable` to `value`, less this process, its
    ancestors (which are the ones asking) and its own multiprocessing helpers (they end with it)."""
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents()), *_own_helpers()}
    found = []
    for process in psutil.process_iter():
        if process.pid in spared:
            continue
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(variable) == value:
                found.append(process)
        except psutil.Error:  # ended meanwhile, or another user's
            continue
    return found


def _own_helpers() -> set[int]:
    """The multiprocessing resource tracker and fork server of this process, where it started them: a pytest run
    without xdist is its own controller, and these live as long as it does."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    return {pid for pid in pids if isinstance(pid, int)}


def _outlasting(variable: str, value: str, grace: float) -> list[psutil.Process]:
    """The processes carrying the marker that are still alive after `grace` seconds (they may be ending)."""
    left = carrying(variable, value)
    if left:
        _, left = psutil.wait_procs(left, timeout=grace)
    return left


def reap(folder: Path, grace: float = GRACE_S) -> list[str]:
    """Stop what the run's records and its marker name that is still alive, remove the recorded temp folders and
    the run folder; return one line per process that had to be stopped."""
    entries = []
    for path in sorted(folder.glob("*.json")):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    stopped: list[str] = []
    for entry in entries:
        alive = [p for p in (_same_process(r["pid"], r["started"]) for r in entry["processes"]) if p is not None]
        everything = _with_descendants(alive)
        stopped += [f"{_describe(p)} ({entry['what']})" for p in everything.values()]
        stop(everything.values())
    leftovers = _outlasting(RUN_FOLDER_ENV, str(folder), grace)
    stopped += [f"{_describe(p)} (not recorded; started by this run)" for p in leftovers]
    stop(leftovers)
    for entry in entries:
        if entry["temp"]:
            shutil.rmtree(entry["temp"], ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return stopped


# --- pytest hooks (tests/conftest.py imports them; `-p tests.reaper` loads them alone) ---------------------------


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # xdist workers have it; a run without xdist is its own controller


def pytest_configure(config: pytest.Config) -> None:
    if _is_controller(config):
        folder = tempfile.mkdtemp(prefix="geosoc-test-run-")
        os.environ[RUN_FOLDER_ENV] = folder  # workers and every process they start inherit it
        config.stash[_FOLDER] = Path(folder)


_FOLDER = pytest.StashKey[Path]()
_STOPPED = pytest.StashKey[list[str]]()


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down and xdist's workers have ended
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if not _is_controller(config) or _FOLDER not in config.stash:
        return
    stopped = reap(config.stash[_FOLDER])
    config.stash[_STOPPED] = stopped
    if stopped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    stopped = config.stash.get(_STOPPED, [])
    if stopped:
        terminalreporter.write_sep("=", f"the run left {_processes(len(stopped))} running: stopped them", red=True)
        for line in stopped:
            terminalreporter.write_line(line)


def _processes(count: int) -> str:
    return f"{count} process" + ("es" if count != 1 else "")


def main(variable: str) -> int:
    """Stop and name every process carrying `variable` with this process's value of it; 1 if there were any."""
    value = os.environ.get(variable)
    if not value:
        print(f"error: {variable} is not set: no run to look for", file=sys.stderr)
        return 2
    leftovers = _outlasting(variable, value, GRACE_S)
    if not leftovers:
        return 0
    named = [_describe(process) for process in leftovers]
    stop(leftovers)
    print(f"error: {_processes(len(leftovers))} of the run outlived it; stopped them:", file=sys.stderr)
    for line in named:
        print(f"  {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.reaper VARIABLE")
    sys.exit(main(sys.argv[1]))
