"""Cube-write throughput and memory, measured against a baseline in the same run (not a timed test).

    python tests/benchmarks/cube_write.py [--size-px 4480] [--chunk 512] [--workers 2]

1. Throughput. The same synthetic imagery (14 bands, float32, >= 1 GiB uncompressed) is written twice with the
   same chunks, codec (Zarr v3 defaults: bytes + zstd) and thread count:
   - geosoc: `build_cube` (template, per-chunk tasks, completion markers, progress bookkeeping);
   - raw: a plain `dask.array.to_zarr` of the same lazily computed dask array.
   Both compute the same values, so the ratio is geosoc's overhead. For context the script also writes an
   already-materialised copy with `to_zarr` (pure write speed, no landscape to compute).
2. Memory. Peak RSS of complete builds of two sizes 4x apart (in pixels), each in a fresh process; the growth
   should stay well under 4x because nothing holds more than chunk size x workers.

The last line is `cube_write_ratio=<geosoc throughput / raw throughput>` (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from memory import report, run_child

X0, Y0 = 4_000_020, 2_800_020  # multiples of 30 in EPSG:3035


def write_catalog(folder: Path, size_px: int, chunk: int) -> Path:
    side = size_px * 30
    data = {
        "region": {"name": "bench", "crs": "EPSG:3035", "bounds": [X0, Y0, X0 + side, Y0 + side]},
        "imagery": {"resolution": 30, "chunk": chunk, "source": {"kind": "synthetic", "seed": 0}},
    }
    path = folder / f"bench-{size_px}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def throughput(size_px: int, chunk: int, workers: int, folder: Path) -> float:
    import dask
    import dask.array as da
    import numpy as np

    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube
    from geosoc.sources.from_catalog import open_layers

    catalog = load_catalog(path=write_catalog(folder, size_px, chunk))
    layer = open_layers(catalog)[0]
    nbytes = layer.nbytes
    print(f"cube: imagery {layer.shape} float32 = {nbytes / 2**30:.3f} GiB uncompressed, chunks {layer.chunk_shape}")

    start = time.perf_counter()
    build_cube(catalog, str(folder / "geosoc"), workers=workers, progress=False)
    geosoc_s = time.perf_counter() - start

    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=workers):
        da.to_zarr(layer.lazy().data, str(folder / "raw.zarr"), component="data", zarr_format=3)
    raw_s = time.perf_counter() - start

    materialised = da.from_array(np.asarray(layer.lazy().data.compute()), chunks=layer.chunk_shape)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=workers):
        da.to_zarr(materialised, str(folder / "write-only.zarr"), component="data", zarr_format=3)
    write_only_s = time.perf_counter() - start

    gib = nbytes / 2**30
    print(f"geosoc build_cube:          {geosoc_s:7.2f} s  {gib / geosoc_s:6.3f} GiB/s")
    print(f"raw dask.array.to_zarr:     {raw_s:7.2f} s  {gib / raw_s:6.3f} GiB/s  (same lazy array)")
    print(f"write-only (materialised):  {write_only_s:7.2f} s  {gib / write_only_s:6.3f} GiB/s  (context only)")
    return raw_s / geosoc_s


def peak_memory_child(size_px: int, chunk: int, workers: int, folder: Path) -> None:
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube

    catalog = load_catalog(path=write_catalog(folder, size_px, chunk))
    build_cube(catalog, str(folder / f"mem-{size_px}"), workers=workers, progress=False)
    report()


def peak_memory(size_px: int, chunk: int, workers: int, folder: Path) -> float:
    child = run_child(__file__, ["--memory-child", "--size-px", str(size_px), "--chunk", str(chunk),
                                 "--workers", str(workers), "--folder", str(folder)])
    return float(child["peak_rss_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, default=4480, help="side of the square cube in pixels")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        peak_memory_child(args.size_px, args.chunk, args.workers, args.folder)
        return

    folder = Path(tempfile.mkdtemp(prefix="geosoc-bench-"))
    try:
        small, large = args.size_px // 2, args.size_px
        mem_small = peak_memory(small, args.chunk, args.workers, folder)
        mem_large = peak_memory(large, args.chunk, args.workers, folder)
        print(f"peak RSS: {small}x{small} px build {mem_small:,.0f} MiB; {large}x{large} px (4x pixels) "
              f"{mem_large:,.0f} MiB; growth {mem_large / mem_small:.2f}x (goal < 1.3x)")
        ratio = throughput(args.size_px, args.chunk, args.workers, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"cube_write_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
