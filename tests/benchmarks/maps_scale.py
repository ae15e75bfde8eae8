"""How a Ray map scales with actors, and how much of the bare model's speed the pipeline keeps (not a test).

    python tests/benchmarks/maps_scale.py [--size-px 1024] [--resolution 60] [--chunk 32] [--device cpu|cuda]

A synthetic region (the cube and random-weight checkpoint of `inference.py`; 1024 px at 60 m in 32-cell windows:
256 windows) is mapped through `geosoc.predict(engine="ray")` on a local Ray head this script starts (and stops),
with 1 and then 2 actors of one CPU each (with --device cuda: 1 actor of one GPU, the figures for the README).
Printed, against rates measured in the same run with one actor's threads:
- the bare forward (the network alone on batches in memory: image branch and head per cell, climate branch once
  per batch, as a map runs it) and the window compute (`Predictor.predict` on windows already read: the forward
  plus the calibrated interval and the AOA distances to every training embedding), and their ratio;
- `ray_scaling_2_actors=<time with 1 actor / time with 2>` (ideal 2);
- `ray_pipeline_efficiency=<end-to-end cells/s / (actors x window compute cells/s)>` with 2 actors (goal >= 0.85
  on CPU): what reading, writing, actor start-up and Ray cost on top of the compute a map cannot avoid;
- `ray_forward_efficiency=<end-to-end cells/s / (actors x bare forward cells/s)>`: the same against the network
  alone, so the AOA and interval count as overhead too;
- peak RSS of each actor process.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from inference import bare_rate, build


def actor_peaks(stop: threading.Event, peaks: dict[int, float]) -> None:
    """Peak RSS (MiB) of every map actor process on this machine, polled until `stop`."""
    import psutil

    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline", "memory_info"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::WindowWorker") and proc.info["memory_info"]:
                peaks[proc.pid] = max(peaks.get(proc.pid, 0.0), proc.info["memory_info"].rss / 2**20)
        stop.wait(0.2)


def timed_map(cube: str, model: str, out: str, args: argparse.Namespace, actors: int) -> tuple[float, int, list[float]]:
    from geosoc.maps.inference import predict

    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=actor_peaks, args=(stop, peaks), daemon=True)
    watcher.start()
    gpus = 1.0 if args.device == "cuda" else 0.0
    start = time.perf_counter()
    ds = predict(cube, model, resolution=args.resolution, chunk=args.chunk, out=out, engine="ray",
                 batch_size=args.batch, max_actors=actors, gpus_per_actor=gpus, cpus_per_actor=1, progress=False)
    seconds = time.perf_counter() - start
    stop.set()
    watcher.join()
    return seconds, int(ds["soc_median"].notnull().sum()), sorted(peaks.values())


def window_compute_rate(cube: str, model: str, args: argparse.Namespace, windows: int = 16) -> float:
    """Cells/s of `Predictor.predict` on `windows` windows read into memory first (no I/O timed)."""
    from geosoc.maps.inference import map_spec
    from geosoc.maps.predictor import load_predictor
    from geosoc.maps.windows import CubeAccess, predict_window, read_window

    spec = map_spec(cube, model, resolution=args.resolution, chunk=args.chunk, batch_size=args.batch)
    predictor = load_predictor(model, args.device, args.batch)
    access = CubeAccess.open(cube)
    data = [read_window(access, spec.grid, w, predictor) for w in list(spec.grid.windows())[:windows]]
    predict_window(predictor, data[0])  # warm-up
    start = time.perf_counter()
    cells = sum(int(np.isfinite(predict_window(predictor, d)["soc_median"]).sum()) for d in data)
    return cells / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, default=1024)
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
        cube, model = build(folder, args.size_px, args.paper, 16_000)
        counts = [1] if args.device == "cuda" else [1, 2]
        runs = {n: timed_map(cube, model, str(folder / f"map-{n}.zarr"), args, n) for n in counts}
        torch.set_num_threads(1)  # what one CPU actor has
        cells = runs[1][1]
        bare = bare_rate(model, cells, args.batch, args.device)
        compute = window_compute_rate(cube, model, args)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    windows = math.ceil(args.size_px * 30 / args.resolution / args.chunk) ** 2
    print(f"model: {'paper-size' if args.paper else 'demo-size'} on {args.device}; {cells:,} cells with data in "
          f"{windows} windows; batch {args.batch}")
    print(f"bare forward, one actor's threads:   {bare:10,.0f} cells/s")
    print(f"window compute, one actor's threads: {compute:10,.0f} cells/s (forward + interval + AOA: "
          f"{compute / bare:.2f} of the bare forward)")
    for n, (seconds, _, peaks) in runs.items():
        print(f"{n} actor{'s' if n > 1 else ' '}: {seconds:6.1f} s, {cells / seconds:10,.0f} cells/s; peak RSS per "
              f"actor {', '.join(f'{p:,.0f}' for p in peaks)} MiB")
    top = max(runs)
    if 2 in runs:
        print(f"ray_scaling_2_actors={runs[1][0] / runs[2][0]:.2f}")
    print(f"ray_forward_efficiency={cells / runs[top][0] / (top * bare):.2f}")
    print(f"ray_pipeline_efficiency={cells / runs[top][0] / (top * compute):.2f}")


if __name__ == "__main__":
    main()
