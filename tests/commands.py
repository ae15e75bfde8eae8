"""Running geosoc's commands the way a user does, many in one interpreter, and what every writing command needs:
the demo region's small part, points and a climate table in it, and the list of writing commands itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geosoc.sources.synthetic import Landscape

STEPS = """
import json, os, sys
from typer.testing import CliRunner
from geosoc.cli import app
plan = json.loads(sys.argv[1])
for step in plan["steps"]:
    os.environ.update(step["env"])
    result = CliRunner().invoke(app, step["args"])
    print(json.dumps({"step": step["args"][0], "exit_code": result.exit_code, "output": result.output}), flush=True)
    if result.exit_code != 0 and not plan["keep_going"]:
        break
"""


def run_commands(steps: list[tuple[list[str], dict[str, str]]], env: dict[str, str] | None = None,
                 keep_going: bool = False, wrap: list[str] | None = None,
                 cwd: str | None = None) -> list[dict[str, Any]]:
    """CLI commands (args, extra environment) in order, in one fresh interpreter (`env` added to this one's
    environment; `wrap`: a prefix such as a user switch): the commands' own code paths, one interpreter start
    instead of one per command. The first that fails ends the run, unless `keep_going` (each is expected to fail
    on its own)."""
    plan = json.dumps({"steps": [{"args": args, "env": extra} for args, extra in steps], "keep_going": keep_going})
    done = subprocess.run([*(wrap or []), sys.executable, "-c", STEPS, plan], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, cwd=cwd)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(results) == len(steps), done.stdout[-3000:] + done.stderr[-3000:]
    return results


def one_error_line(result: dict[str, Any]) -> str:
    """A failed command's single output line, which must be its error (no traceback, no other line)."""
    lines = result["output"].strip().splitlines()
    assert result["exit_code"] == 1 and len(lines) == 1 and lines[0].startswith("error: "), (
        f"{result['step']}: {result['output'][-2000:]}")
    return lines[0]


# The shipped demo catalog on a small part of its region.
DEMO_PART = ("4419990", "2809980", "4423830", "2813820")  # the demo region's south-west 3.84 km: 128 x 128 px
MAP_PART = ("4420950", "2810940", "4422870", "2812860")  # its middle: 8 x 8 cells of the demo's 240 m map


def demo_points(folder: Path, n: int = 40) -> Path:
    """Labelled points inside DEMO_PART (a patch's width from its edges), SOC from the demo landscape's truth (none
    in water, where there is no soil)."""
    rng = np.random.default_rng(3)
    x0, y0, x1, y1 = (float(v) for v in DEMO_PART)
    x, y = rng.uniform(x0 + 480, x1 - 480, 4 * n), rng.uniform(y0 + 480, y1 - 480, 4 * n)
    soc = Landscape(0).soc_at(x, y, "EPSG:3035")
    land = np.flatnonzero(np.isfinite(soc))[:n]
    path = folder / "demo-points.csv"
    pd.DataFrame({"site": range(len(land)), "x": x[land], "y": y[land], "soc": soc[land]}).to_csv(path, index=False)
    return path


def climate_table(folder: Path) -> Path:
    """A small point table with climate columns (what `sample-table` reads)."""
    rng = np.random.default_rng(0)
    x0, y0 = (float(v) for v in DEMO_PART[:2])
    data: dict[str, Any] = {"x": x0 + rng.uniform(0, 3800, 12), "y": y0 + rng.uniform(0, 3800, 12),
                            "soc": rng.uniform(5, 50, 12)}
    for month in ("2014-12", "2015-01"):
        data[f"pr_{month}"] = rng.uniform(0, 90, 12)
    path = folder / "climate.csv"
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def writing_commands(root: str, folder: Path) -> list[list[str]]:
    """Every command that writes, aimed at `root` (sample-table at a SampleSet under it); its inputs in `folder`."""
    demo = ["--region", "demo", "--root", root]
    return [
        ["build-cube", *demo, "--bounds", *DEMO_PART, "-q"],
        ["sample", *demo, "--random", "10", "-q"],
        ["sample", *demo, "--points", str(demo_points(folder)), "--x-col", "x", "--y-col", "y", "--target-col",
         "soc", "--points-crs", "EPSG:3035", "-q"],
        ["sample-table", "--table", str(climate_table(folder)), "--out", f"{root}/samples/labelled.zarr", "--x-col",
         "x", "--y-col", "y", "--target-col", "soc", "--points-crs", "EPSG:3035", "--crs", "EPSG:3035"],
        ["pretrain", *demo, "--epochs", "1", "-q"],
        ["finetune", *demo, "--epochs", "1", "-q"],
        ["fit-tabular", *demo, "--model", "rf"],
        ["predict", *demo, "--bounds", *MAP_PART, "-q"],
        ["evaluate", *demo, "--models", "rf", "-q"],
        ["demo", "--root", root, "-q"],
    ]
