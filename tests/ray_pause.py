"""A Ray `worker_process_setup_hook` for kill tests of Ray jobs. Standard library only: Ray runs it in every
process of the job (controller, workers, idle ones), where importing tests.helpers (torch, geosoc) would cost
seconds each on a busy machine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

PAUSE_ENV = "GEOSOC_TEST_PAUSE"  # {"at": a file, "marks": a folder}
HANG_GUARD_S = 120  # the test says `go` within seconds of `paused`: this only ends a wait a failed test left


def pause_at_first_publish() -> None:
    """Kill a worker of a Ray job (processes a test cannot fork or patch) at a known moment, whatever the
    machine's load: the process that first moves a file into place at $GEOSOC_TEST_PAUSE's "at" (a checkpoint's
    config.json: the epoch is published) writes `paused` in its "marks" folder and waits until `go` appears
    there (at most HANG_GUARD_S). Once: the workers Ray starts again after the kill find `paused` and go on."""
    where = os.environ.get(PAUSE_ENV)
    if not where:
        return
    places = json.loads(where)
    at, marks = os.path.normpath(places["at"]), Path(places["marks"])
    replace = os.replace

    def replacing(source: Any, target: Any, **kwargs: Any) -> None:
        replace(source, target, **kwargs)
        if os.path.normpath(target) == at:
            _pause_once(marks)

    os.replace = replacing  # type: ignore[assignment]


def _pause_once(marks: Path) -> None:
    """Say `paused` and wait for `go`, the first time only (in any process: the marker is made exclusively)."""
    try:
        (marks / "paused").open("x").close()
    except FileExistsError:
        return
    for _ in range(HANG_GUARD_S * 10):
        if (marks / "go").exists():
            return
        time.sleep(0.1)
