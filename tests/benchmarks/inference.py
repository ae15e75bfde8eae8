"""Map throughput and memory of `geosoc.predict`, against the bare model forward in the same run (not a test).

    python tests/benchmarks/inference.py [--size-px 1024] [--resolution 60] [--device cpu|cuda] [--paper]
                                         [--aoa-rows 16000] [--no-s3] [--record [RATES.json]]

1. Throughput. A synthetic cube (14 bands at 30 m, 61 months x 14 climate variables at 4 km) and a fine-tuned
   checkpoint with random weights (the demo's small model, or with --paper the paper-size one: 105 M
   parameters, 64 px patches). Two rates, in cells/s:
   - geosoc: `geosoc.predict(cube, out=...)` end to end: reading windows from Zarr, cutting patches on the
     device, the forward pass, CQR interval, AOA distances, writing the Zarr map and its markers; three ways:
     the cube just written (in the page cache: the old, flattering figure), the same cube with its files
     dropped from the page cache first (cold, as a map of a cube built earlier reads it), and the cube on an
     S3 API server on loopback (moto, in its own process);
   - bare: the model's forward (both branches and head) on batches of the same size already in memory on the
     device, as many cells as the map has.
   The AOA reference holds `--aoa-rows` training embeddings (default 16,000: the training part of a
   LUCAS-size survey; the old figure used 1,000), since every cell's distance is taken to all of them.
   The last line is `inference_efficiency=<geosoc rate / bare rate>` from the cold local cube (goal >= 0.7 on
   CPU, >= 0.8 on a GPU); `inference_efficiency_s3=` follows where the S3 run ran.
   With --record the cold-cube rate is written to the rates file `geosoc predict --dry-run` plans with (default
   geosoc/maps/rates.json), keyed by device name (torch's CUDA name, or cpu), model size and output resolution.
2. Memory. Peak RSS of `predict` over two regions 4x apart in cells, each in a fresh process (goal: growth
   < 1.3x, since nothing holds more than a window).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from memory import report, run_child

X0, Y0 = 4_000_020, 2_800_020  # multiples of 30 in EPSG:3035
SMALL = dict(patch_size=32, image_patch=8, image_dim=64, image_depth=2, image_heads=4, climate_dim=64,
             climate_layers=2, climate_heads=4, climate_feedforward=128, embedding=32)
PAPER = dict(patch_size=64)  # NetworkConfig's defaults are the paper's


def write_catalog(folder: Path, size_px: int, chunk: int = 512) -> Path:
    side = size_px * 30
    data = {
        "region": {"name": "bench", "crs": "EPSG:3035", "bounds": [X0, Y0, X0 + side, Y0 + side]},
        "imagery": {"resolution": 30, "chunk": chunk, "source": {"kind": "synthetic", "seed": 0}},
        "climate": {"resolution": 4000, "chunk": 16, "source": {"kind": "synthetic", "seed": 0}},
    }
    path = folder / f"bench-{size_px}-{chunk}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_checkpoint(cube: str, url: str, paper: bool, aoa_rows: int) -> None:
    """A fine-tuned checkpoint with random weights, normalisation from the cube and an AOA reference."""
    import torch

    from geosoc.data.cube import open_cube
    from geosoc.learn import checkpoint
    from geosoc.learn.models import NetworkConfig, SoilNet
    from geosoc.learn.normalisation import Normalisation
    from geosoc.stats import aoa

    tree = open_cube(cube)
    imagery, climate = tree["imagery"].to_dataset()["data"], tree["climate"].to_dataset()["data"]
    sample = imagery.isel(y=slice(0, 256), x=slice(0, 256)).values
    series = climate.values
    config = NetworkConfig(bands=[str(b) for b in imagery["band"].values], variables=[str(v) for v in climate["variable"].values],
                           months=climate.sizes["time"], **(PAPER if paper else SMALL))
    torch.manual_seed(0)
    model = SoilNet(config)
    norm = Normalisation(band_mean=np.nanmean(sample, axis=(1, 2)).tolist(),
                         band_std=(np.nanstd(sample, axis=(1, 2)) + 1e-6).tolist(),
                         climate_mean=np.nanmean(series, axis=(0, 2, 3)).tolist(),
                         climate_std=(np.nanstd(series, axis=(0, 2, 3)) + 1e-6).tolist(),
                         target_mean=3.0, target_std=0.7)
    checkpoint.save_model(url, model, config, {"stage": "finetune", "normalisation": norm.to_dict(), "units": "g/kg",
                                               "calibration": {"method": "cqr", "level": 0.9, "offset": 0.1}})
    rng = np.random.default_rng(0)
    checkpoint.save_aoa(url, aoa.fit(rng.normal(size=(aoa_rows, 2 * config.embedding)), rng.integers(0, 5, aoa_rows)))


def build(folder: Path, size_px: int, paper: bool, aoa_rows: int, chunk: int = 512) -> tuple[str, str]:
    """The cube (imagery chunks of `chunk` px) and a random-weight checkpoint beside it."""
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube

    root = folder / f"r{size_px}"
    cube = build_cube(load_catalog(path=write_catalog(folder, size_px, chunk)), str(root), progress=False)
    model = str(root / "models" / "finetune")
    make_checkpoint(cube, model, paper, aoa_rows)
    return cube, model


def bare_rate(model_url: str, cells: int, batch: int, device: str) -> float:
    """The model alone on `cells` cells in batches already on the device (4 distinct batches, cycled), doing the
    work a map does: the image branch and head per cell, the climate branch once per batch (a map runs it once
    per climate cell, and a window's cells share a handful of them)."""
    import torch

    from geosoc.learn import checkpoint
    from geosoc.learn.device import precision

    model, _ = checkpoint.load_model(model_url, device)
    config = model.config
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    batches = [{"patch": torch.randn(batch, len(config.bands), config.patch_size, config.patch_size, generator=gen).to(dev),
                "climate": torch.randn(1, config.months, len(config.variables), generator=gen).to(dev)}
               for _ in range(4)]

    def run(n: int) -> None:
        with torch.no_grad(), precision(dev):
            for i in range(n):
                inputs = batches[i % 4]
                shared = model.climate(inputs["climate"]).expand(batch, -1)
                model.quantiles_of(model.features({"patch": inputs["patch"], "climate_embedding": shared}))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    run(2)  # warm-up
    steps = max(1, round(cells / batch))
    start = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - start)


def window_compute(spec: Any, predictor: Any, access: Any, windows: Sequence[Any]) -> tuple[float, float]:
    """Cells/s of `Predictor.predict` on `windows` of the map `spec`, in wall-clock and in CPU time: each window is
    read from `access` into memory before its compute is timed (no I/O timed), after one warm-up window."""
    from geosoc.maps.windows import predict_window, read_window

    predict_window(predictor, read_window(access, spec.grid, windows[0], predictor))
    cells, seconds, cpu = 0, 0.0, 0.0
    for window in windows:
        data = read_window(access, spec.grid, window, predictor)
        started, cpu_started = time.perf_counter(), time.process_time()
        cells += int(np.isfinite(predict_window(predictor, data)["soc_median"]).sum())
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
    return cells / seconds, cells / cpu


def predict_rate(cube: str, model: str, resolution: float, batch: int, device: str, out: str,
                 chunk: int | None = None) -> tuple[float, int]:
    from geosoc.maps.inference import predict

    start = time.perf_counter()
    ds = predict(cube, model, resolution=resolution, out=out, batch_size=batch, device=device, chunk=chunk,
                 progress=False)
    seconds = time.perf_counter() - start
    cells = int(ds["soc_median"].notnull().sum())
    return cells / seconds, cells


def record(model_url: str, args: argparse.Namespace, device: str, rate: float, bare: float) -> None:
    """The measured rate as an entry of the rates file `geosoc predict --dry-run` reads."""
    import datetime as dt

    import torch

    from geosoc.learn import checkpoint
    from geosoc.maps.plan import Rate, rates_file, record_rate

    model, _ = checkpoint.load_model(model_url, "cpu")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    command = (f"tests/benchmarks/inference.py --device {device}{' --paper' if args.paper else ''} --resolution "
               f"{args.resolution:g} (batch {args.batch}, {args.size_px} px cube of 30 m on local disk, cold)")
    entry = Rate(name, sum(p.numel() for p in model.parameters()), args.resolution, round(rate), round(bare),
                 dt.date.today().isoformat(), command)
    path = Path(args.record) if args.record else rates_file()
    record_rate(entry, path)
    print(f"recorded in {path}: {entry}")


def drop_from_page_cache(folder: str) -> None:
    """Evict a folder's files from the page cache (posix_fadvise DONTNEED: no root needed), so they are read
    from the disk again. Dirty pages are not dropped: written-back first."""
    os.sync()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@contextmanager
def s3_copy(cube: str) -> Iterator[str]:
    """The cube on an S3 API server on loopback (moto, its own process: it does not share predict's GIL)."""
    import socket

    import fsspec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    # What FSSPEC_S3_ENDPOINT_URL sets for a user, set here after fsspec's import (it reads the variable then).
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {**(saved_conf or {}), "endpoint_url": endpoint}
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        for _ in range(100):  # until the server answers
            try:
                fs.mkdir("bench")
                break
            except Exception:  # not listening yet
                time.sleep(0.2)
        fs.put(cube, "bench/cube.zarr", recursive=True)
        yield "s3://bench/cube.zarr"
    finally:
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, default=1024, help="cube side in 30 m pixels")
    parser.add_argument("--resolution", type=float, default=60.0, help="output cell size (m)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default=None)
    parser.add_argument("--paper", action="store_true", help="the paper-size model (64 px patches)")
    parser.add_argument("--chunk", type=int, help="output cells per window side (default: geosoc's)")
    parser.add_argument("--aoa-rows", type=int, default=16_000, help="embeddings in the AOA reference")
    parser.add_argument("--no-s3", action="store_true", help="skip the run from an S3 server on loopback")
    parser.add_argument("--record", nargs="?", const="", metavar="RATES",
                        help="write the cold-cube rate to RATES (default: the rates file geosoc plans with)")
    parser.add_argument("--memory-run", nargs=2, metavar=("CUBE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_run:
        folder = Path(tempfile.mkdtemp(prefix="geosoc-infer-mem-"))
        try:
            predict_rate(*args.memory_run, args.resolution, args.batch, device, str(folder / "soc.zarr"), args.chunk)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        report()
        return

    folder = Path(tempfile.mkdtemp(prefix="geosoc-infer-bench-"))
    try:
        cube, model = build(folder, args.size_px, args.paper, args.aoa_rows)
        rate = lambda source, out: predict_rate(source, model, args.resolution, args.batch, device,  # noqa: E731
                                                str(folder / out), args.chunk)
        warm, cells = rate(cube, "warm.zarr")
        drop_from_page_cache(cube)
        ours, _ = rate(cube, "cold.zarr")
        on_s3 = None
        if not args.no_s3:
            with s3_copy(cube) as remote:
                on_s3, _ = rate(remote, "s3.zarr")
        bare = bare_rate(model, cells, args.batch, device)
        print(f"model: {'paper-size' if args.paper else 'demo-size'} on {device}; cube {args.size_px} x "
              f"{args.size_px} px; map at {args.resolution:g} m: {cells:,} cells with data; batch {args.batch}; "
              f"AOA reference {args.aoa_rows:,} rows")
        print(f"geosoc.predict, cube in page cache (old figure): {warm:10,.0f} cells/s")
        print(f"geosoc.predict, cold local cube:                 {ours:10,.0f} cells/s  (read, cut, forward, "
              "interval, AOA, write)")
        if on_s3 is not None:
            print(f"geosoc.predict, cube on S3 (loopback moto):      {on_s3:10,.0f} cells/s")
        print(f"bare forward:                                    {bare:10,.0f} cells/s  (batches already on the device)")
        if args.record is not None:
            record(model, args, device, ours, bare)
        half = args.size_px // 2
        small_cube, small_model = build(folder, half, args.paper, args.aoa_rows)
        # same windows (64 cells a side) for both: 4x the cells is 4x the windows, not bigger ones
        coarse = ["--resolution", str(args.resolution * 2), "--batch", str(args.batch), "--device", device,
                  "--chunk", "64"]
        small = run_child(__file__, [*coarse, "--memory-run", small_cube, small_model])["peak_rss_mib"]
        large = run_child(__file__, [*coarse, "--memory-run", cube, model])["peak_rss_mib"]
        print(f"peak RSS: {half} px cube {small:,.0f} MiB; {args.size_px} px cube (4x cells) {large:,.0f} MiB; "
              f"growth {large / small:.2f}x (goal < 1.3x)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"inference_efficiency_warm={warm / bare:.3f}")
    print(f"inference_efficiency={ours / bare:.3f}")
    if on_s3 is not None:
        print(f"inference_efficiency_s3={on_s3 / bare:.3f}")


if __name__ == "__main__":
    main()
