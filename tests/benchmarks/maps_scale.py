"""How a Ray map scales with actors, and how much of the bare model's speed the pipeline keeps (not a test).

    python tests/benchmarks/maps_scale.py [--size-px 1024] [--cube-chunk 256] [--resolution 60] [--chunk 32]
                                          [--device cpu|cuda]

A synthetic region (the cube and random-weight checkpoint of `inference.py`; 1024 px at 60 m in 32-cell windows:
256 windows, the cube in chunks of 256 px as the demo's: 4 x 4 chunks, so that two actors can each have chunks of
their own, as every actor of a continental map does) is mapped through `geosoc.predict(engine="ray")` on a local Ray
head this script starts (and stops), with 1 and then 2 actors of one CPU each (with --device cuda: 1 actor of one
GPU, the figures for the README).
Printed, against rates measured in the same run with one actor's threads:
- the bare forward (the network alone on batches in memory: image branch and head per cell, climate branch once
  per batch, as a map runs it) and the window compute (`Predictor.predict` on 32 windows already read: the forward
  plus the calibrated interval and the AOA distances to every training embedding; measured before the maps and
  after them, and their mean used: this machine's speed drifts by 10-25 % over minutes), and their ratio;
- `ray_scaling_2_actors=<time with 1 actor / time with 2>` (ideal 2);
- `ray_pipeline_efficiency=<end-to-end cells/s / (actors x window compute cells/s)>` with 2 actors (goal >= 0.85
  on CPU): what reading, writing, actor start-up and Ray cost on top of the compute a map cannot avoid;
- `ray_forward_efficiency=<end-to-end cells/s / (actors x bare forward cells/s)>`: the same against the network
  alone, so the AOA and interval count as overhead too;
- `ray_cpu_efficiency=<the window compute's CPU seconds for the map's cells / the CPU seconds the actor processes
  used>` with 2 actors: the same question asked of CPU time, which other processes on the machine disturb less
  than wall-clock time;
- `read_amplification=<cube bytes the actors decoded (the map's geosoc_reads attr) / the bytes the patches need
  (every stored pixel under some patch, once)>` with 2 actors (goal <= 1.5), and with 1;
- peak RSS of each actor process.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from inference import bare_rate, build, window_compute
from memory import vm_hwm_mib


def actor_peaks(stop: threading.Event, peaks: dict[int, float], cpu: dict[int, float]) -> None:
    """Peak RSS (MiB, the kernel's VmHWM) and CPU seconds (user + system) of every map actor process on this
    machine, until `stop`. The machine's processes are scanned for new actors once a second and the actors read
    twice a second: scanning every process ten times a second took about 5 % of a core from the map measured."""
    import psutil

    actors: dict[int, psutil.Process] = {}
    scanned = 0.0
    while not stop.is_set():
        if time.monotonic() - scanned >= 1.0:
            scanned = time.monotonic()
            for proc in psutil.process_iter(["cmdline"]):
                if proc.pid not in actors and (proc.info["cmdline"] or [""])[0].startswith("ray::WindowWorker"):
                    actors[proc.pid] = proc
        for pid, proc in list(actors.items()):
            try:
                times = proc.cpu_times()
            except psutil.Error:  # gone: its last reading stands
                del actors[pid]
                continue
            peaks[pid] = max(peaks.get(pid, 0.0), vm_hwm_mib(pid))
            cpu[pid] = max(cpu.get(pid, 0.0), times.user + times.system)
        stop.wait(0.5)


@dataclass
class Run:
    seconds: float
    cells: int
    peaks: list[float]
    cpu_seconds: float  # of the actor processes (up to their last poll)
    decoded_bytes: int


def timed_map(cube: str, model: str, out: str, args: argparse.Namespace, actors: int) -> Run:
    from geosoc.maps.inference import predict

    stop, peaks, cpu = threading.Event(), {}, {}
    watcher = threading.Thread(target=actor_peaks, args=(stop, peaks, cpu), daemon=True)
    watcher.start()
    gpus = 1.0 if args.device == "cuda" else 0.0
    start = time.perf_counter()
    ds = predict(cube, model, resolution=args.resolution, chunk=args.chunk, out=out, engine="ray",
                 batch_size=args.batch, max_actors=actors, gpus_per_actor=gpus, cpus_per_actor=1, progress=False)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    return Run(seconds, int(ds["soc_median"].notnull().sum()), sorted(peaks.values()), sum(cpu.values()),
               int(ds.attrs["geosoc_reads"]["decoded_bytes"]))


def needed_bytes(cube: str, model: str, args: argparse.Namespace) -> int:
    """What the map's patches need from the cube: every pixel under some patch (and climate cell), once."""
    from geosoc.maps.inference import map_spec
    from geosoc.maps.predictor import load_predictor
    from geosoc.maps.windows import CubeAccess

    spec = map_spec(cube, model, resolution=args.resolution, chunk=args.chunk, batch_size=args.batch)
    reads = CubeAccess.open(cube).reads(spec.grid, load_predictor(model, "cpu", args.batch))
    return sum(reads.needed_bytes().values())


def window_compute_rate(cube: str, model: str, args: argparse.Namespace, windows: int = 32) -> tuple[float, float]:
    """Cells/s of `Predictor.predict` on the map's first `windows` windows, in wall-clock and in CPU time."""
    from geosoc.maps.inference import map_spec
    from geosoc.maps.predictor import load_predictor
    from geosoc.maps.windows import CubeAccess

    spec = map_spec(cube, model, resolution=args.resolution, chunk=args.chunk, batch_size=args.batch)
    predictor = load_predictor(model, args.device, args.batch)
    return window_compute(spec, predictor, CubeAccess.open(cube), list(spec.grid.windows())[:windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, default=1024)
    parser.add_argument("--cube-chunk", type=int, default=256, help="the cube's imagery chunk, px")
    parser.add_argument("--resolution", type=float, default=60.0)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paper", action="store_true", help="the paper-size model")
    args = parser.parse_args()
    import ray
    import torch

    folder = Path(tempfile.mkdtemp(prefix="geosoc-maps-scale-"))
    ray.init(num_cpus=2, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=True)
    try:
        cube, model = build(folder, args.size_px, args.paper, 16_000, args.cube_chunk)
        torch.set_num_threads(1)  # what one CPU actor has
        before = window_compute_rate(cube, model, args)  # and again after the maps: this machine's speed drifts
        counts = [1] if args.device == "cuda" else [1, 2]
        runs = {n: timed_map(cube, model, str(folder / f"map-{n}.zarr"), args, n) for n in counts}
        cells = runs[1].cells
        bare = bare_rate(model, cells, args.batch, args.device)
        after = window_compute_rate(cube, model, args)
        compute, compute_cpu = ((a + b) / 2 for a, b in zip(before, after, strict=True))
        needed = needed_bytes(cube, model, args)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    windows = math.ceil(args.size_px * 30 / args.resolution / args.chunk) ** 2
    print(f"model: {'paper-size' if args.paper else 'demo-size'} on {args.device}; {cells:,} cells with data in "
          f"{windows} windows; batch {args.batch}; cube chunks of {args.cube_chunk} px")
    print(f"bare forward, one actor's threads:   {bare:10,.0f} cells/s")
    print(f"window compute, one actor's threads: {compute:10,.0f} cells/s (forward + interval + AOA: "
          f"{compute / bare:.2f} of the bare forward; {before[0]:,.0f} before the maps, {after[0]:,.0f} after)")
    for n, run in runs.items():
        print(f"{n} actor{'s' if n > 1 else ' '}: {run.seconds:6.1f} s, {cells / run.seconds:10,.0f} cells/s, "
              f"{run.cpu_seconds:6.1f} CPU s; {run.decoded_bytes / 2**20:,.1f} MiB decoded "
              f"(read amplification {run.decoded_bytes / needed:.2f}); peak RSS per actor "
              f"{', '.join(f'{p:,.0f}' for p in run.peaks)} MiB")
    top = max(runs)
    if 2 in runs:
        print(f"ray_scaling_2_actors={runs[1].seconds / runs[2].seconds:.2f}")
    print(f"ray_forward_efficiency={cells / runs[top].seconds / (top * bare):.2f}")
    print(f"ray_cpu_efficiency={cells / compute_cpu / runs[top].cpu_seconds:.2f}")
    print(f"read_amplification={runs[top].decoded_bytes / needed:.2f}")
    print(f"ray_pipeline_efficiency={cells / runs[top].seconds / (top * compute):.2f}")


if __name__ == "__main__":
    main()
