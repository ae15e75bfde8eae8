"""Peak memory of a benchmark, measured in a fresh child process: the child prints `report(...)` last, the
parent reads it with `run_child(...)`."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def vm_hwm_mib(pid: int | str = "self") -> float:
    """A process's peak RSS so far (VmHWM: the kernel keeps it, so no polling can miss a peak); 0 once it is gone
    or where /proc has no such field."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not getrusage: Linux carries ru_maxrss over from the parent across exec,
    so a child started by a large parent would report the parent's peak."""
    return vm_hwm_mib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(**values: Any) -> None:
    """The child's last line: its values and its peak RSS, as JSON."""
    print(json.dumps({**values, "peak_rss_mib": peak_rss_mib()}))


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """Run `script` with `args` in a fresh interpreter and return what its `report` printed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])
