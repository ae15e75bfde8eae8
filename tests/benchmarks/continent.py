"""A continent on one machine, rehearsed as users run it (not a test): synthetic Europe
(catalogs/europe-synthetic.yaml) from the catalog to the map through the real commands and Ray jobs.

    python tests/benchmarks/continent.py [--root DIR] [--catalog FILE] [--scale 1] [--labelled 20000]
        [--unlabelled 100000] [--evaluate gbm] [--curve 100,1000,10000] [--curve-seeds 3,3,1] [--window 128]
        [--no-probe] [--no-record]

`--scale F` (0 < F <= 1) rehearses on F of the continent's area (a box of its shape around its centre, written as
a catalog into the root) with F of the labelled and unlabelled samples, everything else as the catalog says
(resolutions, patches, network, epochs): per-cell and per-sample costs are the full run's, fixed costs (start-up,
the curve's small label counts) weigh more. Curve sizes above the labelled count are left out, and said so.

Every step is a subprocess: `geosoc ...` or `ray job submit` to a local Ray head with 2 CPUs that the script starts
(and stops: only its own processes):
1. the plans: `geosoc build-cube --dry-run`, `geosoc sample --dry-run` (the unlabelled and the labelled set) and
   `geosoc predict --dry-run` (the CPU rate of the rates file, 2 actors);
2. `geosoc build-cube` of the map's area (the whole continent);
3. the survey: `--labelled` simulated LUCAS sites (`geosoc.demo.simulated_lucas_table`, written as a LUCAS 2018
   CSV), then `geosoc sample --from-source` of `--unlabelled` random locations and of the survey's sites;
4. `ray job submit jobs/pretrain.py --workers 2`, then `jobs/finetune.py --workers 2`;
5. `geosoc evaluate --models <--evaluate>` (the models that fit the hour) on the whole survey;
6. `ray job submit jobs/predict.py --max-actors 2` of the whole continent, with the COGs (and their overviews), the
   quicklook and the STAC item checked;
7. SSL where the climate varies: for each `--curve` size N, the survey's first N sites cut from the cube
   (`geosoc sample --from-cube`) with the same pretrained encoders, and `geosoc evaluate --models ssl,supervised
   --seeds <--curve-seeds>` (same folds, same ensembles); then the linear probe of the frozen encoders, as
   tests/benchmarks/diagnosis.py does for the demo.

Printed: each step's wall time and peak RSS (the largest process of the step: the command and what it started, or
the Ray workers, actors and job driver of a job; and the sum of their peaks), `uptime` before and after, the plan
beside the measurement with their ratio (printed once the map is done, and again at the end), the map job's
start-up, windows and exports (from its windows' file times), `ray_pipeline_efficiency=` (the whole job's rate over
2 actors x the window compute: start-up and exports included, as maps_scale.py counts it) and
`ray_windows_efficiency=` (the windows' part alone), `read_amplification=` when the map records its reads, and
`continent_ssl_vs_supervised_rmse_ratio_<N>_labels=` for each N. Unless --no-record, the map's rate per actor
while its windows ran and its start-up go into geosoc/maps/rates.json as the CPU entry for this model size and
output resolution (at --scale 1 only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = Path(__file__).resolve().parent  # its siblings (memory, inference, diagnosis), also when imported by a test
for folder in (REPO, BENCHMARKS):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

GEOSOC = Path(sys.executable).with_name("geosoc")
ACTORS = 2
CURVE_MODELS = ("ssl", "supervised")


# --- processes: a step, its time and its memory -----------------------------------------------------------------


@contextlib.contextmanager
def local_head(cpus: int = ACTORS) -> Iterator[dict[str, Any]]:
    """A Ray head of `cpus` CPUs of its own (tests.helpers.start_ray_head, as the suite's ray_head fixture), stopped
    at the end (its processes only)."""
    from tests.helpers import start_ray_head, stop_ray_head

    head = start_ray_head(Path(tempfile.mkdtemp(prefix="geosoc-continent-ray-")), cpus=cpus)
    try:
        yield head
    finally:
        stop_ray_head(head)


def head_processes(head: dict[str, Any]) -> list[Any]:
    """Every process of the head (its daemons, workers, actors and job drivers), as psutil processes."""
    from tests.helpers import ray_processes_under

    return ray_processes_under(Path(head["temp"]), int(head["gcs"].rsplit(":", 1)[1]))


@dataclass
class Run:
    """One step as it ran: wall time, peak RSS of its largest process and the sum of its processes' peaks."""

    step: str
    seconds: float
    peak_mib: float
    sum_mib: float
    output: str
    began: float = 0.0  # time.time() at its start: set beside the files it wrote


class Steps:
    """Runs each step as a subprocess, logging its output, timing it and watching its processes' memory."""

    def __init__(self, root: Path, region: list[str], head: dict[str, Any] | None, log: Any = print,
                 env: dict[str, str] | None = None) -> None:
        self.root, self.region, self.head, self.log = root, region, head, log
        self.env = env or dict(os.environ)
        self.runs: list[Run] = []

    def geosoc(self, step: str, *args: str, root: Path | None = None) -> Run:
        return self.run(step, [str(GEOSOC), *args, *self.region, "--root", str(root or self.root)])

    def job(self, step: str, script: str, *args: str) -> Run:
        """`ray job submit` of one of jobs/, waiting for it (its log streams into this one)."""
        assert self.head is not None, "a Ray job needs a head"
        command = [self.head["ray"], "job", "submit", "--address", self.head["address"], "--working-dir", str(REPO), "--",
                   "python", script, *self.region, "--root", str(self.root), *args]
        for _ in range(30):  # a head that has just started may have no job agent yet
            run = self.run(step, command, env=self.head["env"], ray=True)
            if "No available agent" not in run.output:
                return run
            self.runs.pop()
            time.sleep(1)
        return run

    def run(self, step: str, command: Sequence[str], env: dict[str, str] | None = None, ray: bool = False) -> Run:
        self.log(f"\n$ {' '.join(command)}")
        began, started = time.time(), time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env or self.env, cwd=REPO, start_new_session=True)
        peaks: dict[int, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(process.pid, ray, peaks, stop), daemon=True)
        watcher.start()
        lines = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if not line.startswith("\r"):
                    self.log(line.rstrip())
            process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            raise
        finally:
            stop.set()
            watcher.join()
        seconds = time.perf_counter() - started
        output = "".join(lines)
        if process.returncode != 0 or "Job 'raysubmit" in output and "failed" in output.split("Job 'raysubmit")[-1]:
            raise SystemExit(f"step {step!r} failed (exit {process.returncode}): {' '.join(command)}\n"
                             f"{output[-3000:]}")
        run = Run(step, seconds, max(peaks.values(), default=0.0), sum(peaks.values()), output, began)
        self.runs.append(run)
        self.log(f"[{step}: {seconds:.1f} s, peak RSS {run.peak_mib:,.0f} MiB (its processes together "
                 f"{run.sum_mib:,.0f} MiB)]")
        return run

    def _watch(self, pid: int, ray: bool, peaks: dict[int, float], stop: threading.Event) -> None:
        """Peak RSS of the command and its descendants, and for a Ray job of the head's workers, actors and job
        drivers (not the head's own daemons), polled until `stop`."""
        import psutil
        from memory import vm_hwm_mib

        while not stop.is_set():
            found: list[Any] = []
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                found = [root, *root.children(recursive=True)]
            if ray and self.head is not None:
                for proc in head_processes(self.head):
                    with contextlib.suppress(psutil.Error):
                        cmdline = proc.cmdline()
                        working = cmdline and (cmdline[0].startswith("ray::") or any("jobs/" in c for c in cmdline))
                        if working:
                            found.append(proc)
            for proc in found:
                peak = vm_hwm_mib(proc.pid)
                if peak:
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0.0), peak)
            stop.wait(0.5)


# --- the plans, as the dry runs compute them ----------------------------------------------------------------------


@dataclass
class Figure:
    """One planned figure beside the measured one."""

    step: str
    what: str
    planned: float | None
    measured: float | None
    unit: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.planned is None or self.measured is None or self.measured == 0:
            return None
        return self.planned / self.measured


@dataclass
class Plans:
    cube: Any
    unlabelled: Any
    labelled: Any
    map: Any
    rate: float
    rate_how: str
    startup: float


def plans(catalog: Path, root: Path, survey: Path, unlabelled: int, window: int | None, fmt: str) -> Plans:
    """What the dry runs printed, at full precision: the same functions `--dry-run` calls (the commands
    themselves run as steps beside it)."""
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import plan_cube
    from geosoc.data.from_source import plan_points
    from geosoc.data.points import PRESETS, read_points
    from geosoc.data.sampling import samples_url
    from geosoc.maps.plan import choose_rate, choose_startup, load_rates, plan_from_catalog

    loaded = load_catalog(path=catalog)
    config = loaded.config
    points = read_points(survey, config.region.crs, fmt, PRESETS[fmt], config.imagery_grid.bounds, "fail")
    cube = plan_cube(loaded, str(root))
    random = plan_points(loaded, samples_url(str(root), "unlabelled"), None, unlabelled, seed=0,
                         min_spacing=config.sampling.min_spacing, root=str(root))
    labelled = plan_points(loaded, samples_url(str(root), "labelled"), points, root=str(root))
    mapped = plan_from_catalog(loaded, chunk=window)
    rates = load_rates()
    rate, how = choose_rate(rates, "cpu", mapped.parameters, mapped.grid.resolution)
    startup = choose_startup(rates, "cpu", mapped.parameters, mapped.grid.resolution)[0]
    return Plans(cube, random, labelled, mapped, rate, how, startup)


# --- what happened --------------------------------------------------------------------------------------------


def _attrs(url: Path) -> dict[str, Any]:
    import zarr

    return dict(zarr.open_group(str(url), mode="r").attrs)


def cube_measured(root: Path) -> dict[str, dict[str, int]]:
    """Per group: chunks written and their bytes as stored uncompressed (float32), from the completion record and
    the arrays' chunk grid; and the bytes on disk."""
    import zarr

    url = root / "cube.zarr"
    record = _attrs(url)["geosoc_chunks"]
    out = {}
    for group, counts in record.items():
        array = zarr.open_array(str(url / group / "data"), mode="r")
        leading = int(__import__("math").prod(array.shape[:-2]))
        height, width = array.shape[-2:]
        ch, cw = array.chunks[-2:]
        written = 0
        for iy in range(-(-height // ch)):
            for ix in range(-(-width // cw)):
                key_parts = (0,) * (array.ndim - 2) + (iy, ix)
                if _chunk_stored(url / group / "data", key_parts):
                    written += leading * min(ch, height - iy * ch) * min(cw, width - ix * cw) * 4
        disk = sum(p.stat().st_size for p in (url / group).rglob("*") if p.is_file())
        out[group] = {"chunks": counts["complete"], "bytes": written, "disk": disk}
    return out


def _chunk_stored(array: Path, key: tuple[int, ...]) -> bool:
    return (array / "c" / "/".join(map(str, key))).exists()


def sampleset_measured(url: Path) -> dict[str, Any]:
    """Samples and the bytes a SampleSet holds (uncompressed), as `plan_points` counts them, and the windows and
    bytes its run read from each group of the sources (its `reads` attribute)."""
    import xarray as xr

    ds = xr.open_zarr(str(url), consolidated=False)
    nbytes = sum(int(ds[name].nbytes) for name in ("patch", "climate", "embedding") if name in ds)
    return {"samples": int(ds.sizes["sample"]), "bytes": nbytes, "reads": ds.attrs.get("reads", {})}


def map_measured(root: Path) -> dict[str, Any]:
    import numpy as np
    import zarr

    group = zarr.open_group(str(root / "maps" / "soc.zarr"), mode="r")
    median = group["soc_median"]
    per_window = {}
    written = [f.stat().st_mtime for f in (root / "maps" / "soc.zarr" / "soc_median" / "c").rglob("*") if f.is_file()]
    ch, cw = median.chunks  # the map's windows
    for iy in range(-(-median.shape[0] // ch)):
        for ix in range(-(-median.shape[1] // cw)):
            block = median[iy * ch : (iy + 1) * ch, ix * cw : (ix + 1) * cw]
            per_window[(iy * ch, ix * cw)] = int(np.isfinite(block).sum())
    cells, windows = sum(per_window.values()), sum(1 for n in per_window.values() if n)
    attrs = dict(group.attrs)
    reads = attrs.get("geosoc_reads") or {}
    return {"cells": cells, "windows": windows, "decoded_bytes": reads.get("decoded_bytes"), "per_window": per_window,
            "first_written": min(written), "last_written": max(written)}


def map_phases(mapped: Run, measured: dict[str, Any]) -> dict[str, float]:
    """The map job's wall time in three parts, from its windows' file times: start-up (`ray job submit` to the
    first window written: the job, actors and model loads), windows (to the last, plus the first one's share), and
    after them (the COGs with overviews, the quicklook, the STAC item)."""
    windows = max(measured["windows"], 1)
    span = measured["last_written"] - measured["first_written"]
    each = span / max(windows - 1, 1) * ACTORS  # an actor's time per window
    startup = max(measured["first_written"] - mapped.began - each, 0.0)
    after = mapped.began + mapped.seconds - measured["last_written"]
    return {"start-up": startup, "windows": mapped.seconds - startup - after, "after": after}


def cog_overviews(path: Path) -> list[int]:
    import rasterio

    with rasterio.open(path) as src:
        return list(src.overviews(1))


# --- the rehearsal ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    runs: list[Run]
    figures: list[Figure]
    ratios: dict[int, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)  # the `name=value` lines
    map_rate: float = 0.0  # cells/s per actor while the windows ran
    map_startup: float = 0.0  # seconds before the first window


def survey_table(catalog: Path, n: int, out: Path) -> int:
    """The simulated LUCAS survey as a LUCAS 2018 CSV (what a user of the real continent has)."""
    from geosoc.catalog import load_catalog
    from geosoc.demo import simulated_lucas_table

    table = simulated_lucas_table(load_catalog(path=catalog), n, seed=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    return len(table)


def rehearse(catalog: Path, root: Path, head: dict[str, Any], *, labelled: int, unlabelled: int, evaluate: Sequence[str],
             curve: Sequence[int], curve_seeds: Sequence[int], window: int | None, log: Any = print) -> Outcome:
    """Every step on `catalog` under `root`, the Ray jobs on `head`."""
    region = ["--catalog", str(catalog)]
    steps = jobs = Steps(root, region, head, log)
    fmt = "lucas2018"
    survey = root / "survey" / "lucas-simulated.csv"
    window_args = ["--chunk", str(window)] if window else []
    started = time.perf_counter()
    sites = survey_table(catalog, labelled, survey)
    log(f"survey: {sites:,} simulated LUCAS sites -> {survey} ({time.perf_counter() - started:.1f} s)")

    # 1. the plans, as users print them; the same figures at full precision for the table
    steps.geosoc("plan cube", "build-cube", "--dry-run")
    steps.geosoc("plan unlabelled", "sample", "--random", str(unlabelled), "--dry-run")
    steps.geosoc("plan labelled", "sample", "--points", str(survey), "--format", fmt, "--dry-run")
    steps.geosoc("plan map", "predict", "--dry-run", "--gpu", "cpu", *window_args)
    plan = plans(catalog, root, survey, unlabelled, window, fmt)

    # 2-4. the cube of the map's area, the samples, training on Ray
    cube = steps.geosoc("cube", "build-cube", "-q")
    random = steps.geosoc("sample unlabelled", "sample", "--random", str(unlabelled), "--from-source", "-q")
    lab = steps.geosoc("sample labelled", "sample", "--points", str(survey), "--format", fmt, "--from-source", "-q")
    jobs.job("pretrain", "jobs/pretrain.py", "--workers", str(ACTORS))
    jobs.job("finetune", "jobs/finetune.py", "--workers", str(ACTORS))
    if evaluate:
        steps.geosoc("evaluate", "evaluate", "--models", ",".join(evaluate), "-q")

    # 6. the map of the whole continent, and its exports
    mapped = jobs.job("map", "jobs/predict.py", "--max-actors", str(ACTORS), *window_args)
    maps = root / "maps"
    overviews = {tif.name: cog_overviews(tif) for tif in sorted(maps.glob("*.tif"))}
    item = json.loads((maps / "item.json").read_text())
    log(f"COG overviews (decimation factors): {overviews}")
    log(f"quicklook: {maps / 'quicklook.png'} ({(maps / 'quicklook.png').stat().st_size:,} B); STAC item "
        f"{item['id']} with assets {sorted(item['assets'])}")

    measured = map_measured(root)
    phases = map_phases(mapped, measured)
    outcome = Outcome(steps.runs, _figures(plan, root, cube, random, lab, measured, phases))
    rate = measured["cells"] / (phases["windows"] * ACTORS)
    outcome.map_rate, outcome.map_startup = rate, phases["start-up"]
    compute = window_compute_rate(root, window, measured["per_window"])
    outcome.lines += [
        "map job: " + ", ".join(f"{name} {seconds:,.1f} s" for name, seconds in phases.items())
        + " (from its windows' file times)",
        f"map_cells_per_s_per_actor={rate:.0f}  (the job's cells / the windows' part of its wall time / {ACTORS} "
        f"actors; the plan used {plan.rate:,.0f}: {plan.rate_how})",
        f"window_compute_cells_per_s={compute:.0f}  (Predictor.predict on windows already read, one thread)",
        f"ray_pipeline_efficiency={measured['cells'] / (mapped.seconds * ACTORS) / compute:.3f}  (the whole job's "
        f"rate, start-up and exports included, over {ACTORS} x the window compute)",
        f"ray_windows_efficiency={rate / compute:.3f}  (the rate of its windows' part over {ACTORS} x the window "
        "compute)"]
    if measured["decoded_bytes"]:
        outcome.lines.append(f"read_amplification={measured['decoded_bytes'] / plan.map.needed_bytes:.3f}  "
                             f"(decoded bytes the map records / the bytes its patches need)")
    log("\nso far (the learning curve comes next; everything is printed again at the end):")
    print_outcome(outcome, [], log)

    # 7. SSL against supervised where the climate varies
    for n, seeds in zip(curve, curve_seeds, strict=True):
        outcome.ratios[n] = learning_curve_point(steps, catalog, root, survey, n, seeds, fmt, log)
        outcome.lines.append(f"continent_ssl_vs_supervised_rmse_ratio_{n}_labels={outcome.ratios[n]:.3f}")
    return outcome


def window_compute_rate(root: Path, window: int | None, per_window: dict[tuple[int, int], int],
                        windows: int = 24) -> float:
    """Cells/s of `Predictor.predict` with one thread (what one CPU actor has) on up to `windows` of the map's
    windows with data, every k-th of them (the busiest alone overstate the rate of coastal ones), as
    tests/benchmarks/maps_scale.py measures it."""
    import torch
    from inference import window_compute

    from geosoc.maps.inference import map_spec
    from geosoc.maps.predictor import load_predictor
    from geosoc.maps.windows import CubeAccess

    cube, model = str(root / "cube.zarr"), str(root / "models" / "finetune")
    spec = map_spec(cube, model, chunk=window)
    with_data = [w for w in spec.grid.windows() if per_window.get((w.rows.start, w.cols.start), 0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return window_compute(spec, load_predictor(model, "cpu"), CubeAccess.open(cube),
                              with_data[:: -(-len(with_data) // windows)])[0]
    finally:
        torch.set_num_threads(threads)


def learning_curve_point(steps: Steps, catalog: Path, root: Path, survey: Path, n: int, seeds: int, fmt: str,
                         log: Any) -> float:
    """ssl and supervised on the survey's first `n` sites (a random subset: the table is in random order), cut from
    the continent's cube, with the continent's pretrained encoders, in the same folds with ensembles of `seeds`."""
    import pandas as pd

    curve_root = root / "curve" / f"labels-{n}"
    (curve_root / "models").mkdir(parents=True, exist_ok=True)
    for shared in ("cube.zarr", "models/pretrain"):
        link = curve_root / shared
        if not link.exists():
            link.symlink_to(root / shared, target_is_directory=True)
    table = curve_root / "survey.csv"
    pd.read_csv(survey).head(n).to_csv(table, index=False)
    steps.geosoc(f"sample {n} labels", "sample", "--points", str(table), "--format", fmt, "--from-cube", "-q",
                 root=curve_root)
    steps.geosoc(f"evaluate {n} labels", "evaluate", "--models", ",".join(CURVE_MODELS), "--seeds", str(seeds),
                 "-q", root=curve_root)
    summary = json.loads((curve_root / "evaluation" / "summary.json").read_text())
    pooled = {m: summary["models"][m]["pooled"] for m in CURVE_MODELS}
    log(f"{n} labels: " + ", ".join(f"{m} pooled R² {p['r2']:.3f} RMSE {p['rmse']:.2f}" for m, p in pooled.items()))
    return float(pooled["ssl"]["rmse"] / pooled["supervised"]["rmse"])


def _figures(plan: Plans, root: Path, cube: Run, random: Run, lab: Run, on_map: dict[str, Any],
             phases: dict[str, float]) -> list[Figure]:
    figures = []
    built = cube_measured(root)
    for layer in plan.cube.layers:
        got = built.get(layer.group, {})
        figures += [Figure("cube", f"{layer.group} chunks", layer.chunks, got.get("chunks")),
                    Figure("cube", f"{layer.group} bytes (uncompressed)", layer.nbytes, got.get("bytes"), "B",
                           f"on disk {got.get('disk', 0) / 2**20:,.0f} MiB")]
    figures.append(Figure("cube", "time", getattr(plan.cube, "estimated_seconds", None), cube.seconds, "s",
                          "the plan gives no time for a synthetic source"))
    for name, points_plan, run in (("unlabelled", plan.unlabelled, random), ("labelled", plan.labelled, lab)):
        got = sampleset_measured(root / "samples" / f"{name}.zarr")
        figures += [Figure(f"sample {name}", "samples", points_plan.points, got["samples"]),
                    Figure(f"sample {name}", "SampleSet bytes", points_plan.sampleset_bytes, got["bytes"], "B")]
        for reads in points_plan.reads:
            read = got["reads"].get(reads.group, {})
            figures += [Figure(f"sample {name}", f"{reads.group} windows", reads.windows, read.get("windows")),
                        Figure(f"sample {name}", f"{reads.group} bytes read", reads.nbytes, read.get("bytes"), "B")]
        figures.append(Figure(f"sample {name}", "time", getattr(points_plan, "estimated_seconds", None), run.seconds,
                              "s", "the plan gives no time for a synthetic source"))
    m = plan.map
    figures += [Figure("map", "cells", m.cells_inside, on_map["cells"]),
                Figure("map", "windows", m.windows_inside, on_map["windows"]),
                Figure("map", "bytes decoded", m.read_bytes(ACTORS), on_map["decoded_bytes"], "B",
                       "" if on_map["decoded_bytes"] else "the map does not record its reads"),
                Figure("map", "start-up", plan.startup, phases["start-up"], "s",
                       "the job submitted to its first window written"),
                Figure("map", "time", plan.startup + max(m.compute_seconds(plan.rate, ACTORS),
                                                         m.read_seconds(500.0, ACTORS)),
                       phases["start-up"] + phases["windows"], "s",
                       f"{plan.rate:,.0f} cells/s per actor from the rates file; exports apart"),
                Figure("map", "exports", None, phases["after"], "s", "COGs, quicklook, STAC item: not planned")]
    return figures


# --- printing -----------------------------------------------------------------------------------------------------


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{value:,.0f} s"
    return f"{value:,.0f}"


def print_outcome(outcome: Outcome, load: Sequence[str], log: Any = print) -> None:
    log("\nsteps (wall time; peak RSS of the largest process, and of its processes together):")
    for run in outcome.runs:
        log(f"  {run.step:<28} {run.seconds:8.1f} s   {run.peak_mib:8,.0f} MiB   {run.sum_mib:8,.0f} MiB")
    log(f"  {'total':<28} {sum(r.seconds for r in outcome.runs):8.1f} s")
    log("\nplan against measurement (planned / measured):")
    log(f"  {'step':<18} {'figure':<32} {'planned':>14} {'measured':>14} {'ratio':>7}  note")
    for f in outcome.figures:
        ratio = f"{f.ratio:.3f}" if f.ratio is not None else "-"
        flag = " *" if f.ratio is not None and not 0.75 <= f.ratio <= 1.25 else ""
        log(f"  {f.step:<18} {f.what:<32} {_value(f.planned, f.unit):>14} {_value(f.measured, f.unit):>14} "
            f"{ratio:>7}{flag}  {f.note}")
    log("  (* outside +-25 %)")
    for line in outcome.lines:
        log(line)
    for moment in load:
        log(f"uptime: {moment}")


def record_map_rate(plan_map: Any, rate: float, startup: float) -> None:
    from geosoc.maps.plan import Rate, record_rate

    record_rate(Rate("cpu", plan_map.parameters, float(plan_map.grid.resolution), round(rate), 0.0,
                     time.strftime("%Y-%m-%d"), "tests/benchmarks/continent.py (jobs/predict.py, 2 CPU actors of one "
                     "core, synthetic Europe, cube on local disk; windows from the first written to the last)",
                     round(startup, 1)))


def scaled_catalog(catalog: Path, scale: float, folder: Path) -> Path:
    """`catalog` on `scale` of its area: a box of the region's shape around its centre, its sides whole multiples
    of the coarsest resolution (imagery, climate, map), every other setting as it is; the mask's path made
    absolute (the copy lives in `folder`)."""
    import math

    import yaml

    data: dict[str, Any] = yaml.safe_load(catalog.read_text())
    region = data["region"]
    x0, y0, x1, y1 = region["bounds"]
    step = max(int(data["imagery"]["resolution"]), int(data.get("climate", {}).get("resolution", 0)),
               int(data.get("predict", {}).get("resolution", 0)))
    side = math.sqrt(scale)
    width, height = (max(step, round((b - a) * side / step) * step) for a, b in ((x0, x1), (y0, y1)))
    left = round(((x0 + x1) / 2 - width / 2) / step) * step
    bottom = round(((y0 + y1) / 2 - height / 2) / step) * step
    region["bounds"] = [left, bottom, left + width, bottom + height]
    if region.get("mask"):
        region["mask"] = str((catalog.parent / region["mask"]).resolve())
    region["name"] = f"{region['name']}-scale-{scale:g}"
    path = folder / f"{region['name']}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="keep the artefacts here (default: a temporary folder, removed at the end)")
    parser.add_argument("--catalog", default=str(REPO / "catalogs" / "europe-synthetic.yaml"))
    parser.add_argument("--scale", type=float, default=1.0, help="the fraction of the continent's area rehearsed "
                        "(and of --labelled and --unlabelled), 0 < F <= 1")
    parser.add_argument("--labelled", type=int, help="simulated LUCAS sites (default: 20,000 x --scale)")
    parser.add_argument("--unlabelled", type=int, help="default: the catalog's sampling.unlabelled x --scale")
    parser.add_argument("--evaluate", default="gbm", help="models of `geosoc evaluate` on the whole survey ('' none)")
    parser.add_argument("--curve", default="100,1000,10000", help="label counts of the ssl/supervised curve")
    parser.add_argument("--curve-seeds", default="3,3,1", help="ensemble members of both networks, per label count "
                        "(one number: every count)")
    parser.add_argument("--window", type=int, default=128, help="map cells per window side")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument("--no-record", action="store_true", help="leave the rates file as it is")
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale: a fraction of the continent's area, 0 < F <= 1; got {args.scale:g}")
    curve = [int(n) for n in args.curve.split(",") if n]
    seeds = [int(n) for n in args.curve_seeds.split(",")]
    seeds = seeds * len(curve) if len(seeds) == 1 or not curve else seeds
    if len(seeds) != len(curve):
        parser.error(f"--curve-seeds: one number, or one per label count of --curve ({len(curve)})")

    from geosoc.catalog import load_catalog

    root = Path(args.root).resolve() if args.root else Path(tempfile.mkdtemp(prefix="geosoc-continent-"))
    root.mkdir(parents=True, exist_ok=True)
    catalog = Path(args.catalog).resolve()
    if args.scale < 1:
        catalog = scaled_catalog(catalog, args.scale, root / "catalog")
    config = load_catalog(path=catalog).config
    labelled = args.labelled or round(20_000 * args.scale)
    unlabelled = args.unlabelled or round(config.sampling.unlabelled * args.scale)
    left_out = [n for n in curve if n > labelled]
    seeds = [k for n, k in zip(curve, seeds, strict=True) if n <= labelled]
    curve = [n for n in curve if n <= labelled]
    load = [f"before: {uptime()}"]
    print(f"catalog {catalog} (bounds {list(config.region.bounds)}, scale {args.scale:g}); root {root}; {labelled:,} "
          f"labelled, {unlabelled:,} unlabelled; {os.cpu_count()} CPUs", flush=True)
    if left_out:
        print(f"the curve at {', '.join(map(str, left_out))} labels is not measured: more than the {labelled:,} "
              "labelled sites of this scale", flush=True)
    try:
        with local_head() as head:
            outcome = rehearse(catalog, root, head, labelled=labelled, unlabelled=unlabelled,
                               evaluate=[m for m in args.evaluate.split(",") if m],
                               curve=curve, curve_seeds=seeds,
                               window=args.window, log=lambda line: print(line, flush=True))
        if not args.no_probe:
            from diagnosis import probes

            probes(str(root), config)
        load.append(f"after: {uptime()}")
        print_outcome(outcome, load, lambda line: print(line, flush=True))
        if args.scale < 1 and not args.no_record:
            print("not recorded in geosoc/maps/rates.json: a partial scale's map (--scale 1 records it)")
        elif not args.no_record:
            mapped = plans(catalog, root, root / "survey" / "lucas-simulated.csv", unlabelled, args.window,
                           "lucas2018").map
            record_map_rate(mapped, outcome.map_rate, outcome.map_startup)
            print(f"recorded: {outcome.map_rate:,.0f} cells/s per CPU actor and {outcome.map_startup:.0f} s of "
                  f"start-up for {mapped.parameters:,} parameters at {mapped.grid.resolution:g} in "
                  "geosoc/maps/rates.json")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
