"""Patch extraction at points: geosoc versus the loop a user would write, in one run (not a timed test).

    python tests/benchmarks/sampling.py [--points 5000] [--size-px 4480] [--patch 64]

Builds a synthetic cube (14 bands, 4480 x 4480 px = 1.05 GiB uncompressed, 512 px chunks), draws random
points, and times, every one on all the points:
- geosoc: `extract_patches` (points grouped by chunk, one window read per group, vectorised gather, Dask
  threads), and, for context, `sample_points` (the same plus writing the SampleSet to Zarr);
- vectorized isel: the baseline a user who knows xarray writes, one `cube.isel(y=rows, x=cols)` with
  DataArray indexers of shape (point, py) and (point, px), computed by dask;
- per-point loop: `cube.isel(y=slice, x=slice).values` per point (the first thing a user tries).
Peak memory of the geosoc extraction is measured in a fresh process. Last lines: `sampling_speedup=<x>`
(against the vectorized isel) and `sampling_speedup_vs_loop=<x>`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from memory import report, run_child


def build(folder: Path, size_px: int) -> str:
    from cube_write import write_catalog  # the same synthetic benchmark region (this folder is on sys.path)

    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube

    return build_cube(load_catalog(path=write_catalog(folder, size_px, 512)), str(folder / "root"), progress=False)


def random_xy(grid, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, grid.height, n), rng.integers(0, grid.width, n)
    return grid.x_of(cols), grid.y_of(rows)


def geosoc_extract(url: str, n: int, patch: int, workers: int) -> tuple[float, int]:
    from geosoc.data.cube import group_grid, open_cube
    from geosoc.data.sampling import extract_patches

    grid = group_grid(open_cube(url)["imagery"].to_dataset())
    x, y = random_xy(grid, n)
    start = time.perf_counter()
    count = sum(len(part.indices) for part in extract_patches(url, grid, x, y, patch, workers=workers))
    return time.perf_counter() - start, count


def memory_child(url: str, n: int, patch: int, workers: int) -> None:
    seconds, count = geosoc_extract(url, n, patch, workers)
    report(seconds=seconds, count=count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=5_000)
    parser.add_argument("--size-px", type=int, default=4480)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child, args.points, args.patch, args.workers)
        return

    from geosoc.data.cube import group_grid, open_cube
    from geosoc.data.points import Points
    from geosoc.data.sampling import sample_points

    folder = Path(tempfile.mkdtemp(prefix="geosoc-sampling-bench-"))
    try:
        url = build(folder, args.size_px)
        data = open_cube(url)["imagery"].to_dataset()["data"]
        print(f"cube: {data.shape} float32 = {data.nbytes / 2**30:.3f} GiB uncompressed, chunks {data.data.chunksize}; "
              f"{args.points:,} random points, {args.patch} px patches")

        child = run_child(__file__, ["--child", url, "--points", str(args.points), "--patch", str(args.patch),
                                     "--workers", str(args.workers)])
        geosoc_s = child["seconds"]
        print(f"geosoc extract_patches:  {geosoc_s:8.2f} s for {child['count']:,} points "
              f"({child['count'] / geosoc_s:,.0f} points/s); peak RSS {child['peak_rss_mib']:,.0f} MiB")

        grid = group_grid(open_cube(url)["imagery"].to_dataset())
        x, y = random_xy(grid, args.points)
        ids = np.array([str(i) for i in range(args.points)], dtype=object)
        points = Points(ids, x, y, x * 0, y * 0, np.full(args.points, 10.0), "g/kg", "bench")
        start = time.perf_counter()
        sample_points(url, points, str(folder / "samples.zarr"), args.patch, fold_block_size=50_000, folds=5,
                      workers=args.workers)
        print(f"geosoc sample_points:    {time.perf_counter() - start:8.2f} s (extraction + writing the SampleSet)")

        half = args.patch // 2
        rows, cols = grid.rowcol(x, y)
        offsets = np.arange(args.patch) - half  # clipped at the edges (geosoc pads with NaN): same work
        along_y = xr.DataArray(np.clip(rows[:, None] + offsets, 0, grid.height - 1), dims=("point", "py"))
        along_x = xr.DataArray(np.clip(cols[:, None] + offsets, 0, grid.width - 1), dims=("point", "px"))
        start = time.perf_counter()
        patches = data.isel(y=along_y, x=along_x).values
        vectorized_s = time.perf_counter() - start
        print(f"vectorized isel:         {vectorized_s:8.2f} s for {len(patches[0]):,} points "
              f"({args.points / vectorized_s:,.0f} points/s)")
        del patches
        start = time.perf_counter()
        for i in range(args.points):
            _ = data.isel(y=slice(max(rows[i] - half, 0), rows[i] - half + args.patch),
                          x=slice(max(cols[i] - half, 0), cols[i] - half + args.patch)).values
        loop_s = time.perf_counter() - start
        print(f"per-point isel loop:     {loop_s:8.2f} s for {args.points:,} points "
              f"({args.points / loop_s:,.0f} points/s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"sampling_speedup={vectorized_s / geosoc_s:.1f}")
    print(f"sampling_speedup_vs_loop={loop_s / geosoc_s:.1f}")


if __name__ == "__main__":
    main()
