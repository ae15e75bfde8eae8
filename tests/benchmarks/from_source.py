"""Patches at points straight from the sources, against building the cube and cutting them (not a timed test).

    python tests/benchmarks/from_source.py [--size-px 2048] [--points 4000] [--patch 32]
                                           [--scale-points 100000] [--workers 2]

1. Both routes on the same points, in one run. A synthetic region of size-px x size-px pixels at 30 m (14 bands,
   climate at 4 km, 256 px chunks), `--points` random pixel centres in it, `--patch` px patches:
   - cube route: `build_cube` of the whole region, then `sample_points` (cut from the cube);
   - source route: `sample_from_source` of the same points (each window read from the synthetic layers).
   Both write the SampleSet; the two are checked equal. Rates are points per second of the whole route.
2. Scale: `--scale-points` random locations from the sources over Europe's bounds, CRS and land mask (the
   synthetic landscape: 163k x 137k px at 30 m, a cube no one builds here), streamed into the SampleSet by a
   process per core, in a fresh process whose peak memory is measured (and the largest worker's); `--scale-points
   0` leaves it out.

Last lines: `from_source_patches_per_s=<rate at scale>`, `cube_route_patches_per_s=<rate of part 1's cube
route>`, `source_route_patches_per_s=<rate of part 1's source route>`.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from memory import report, run_child

X0, Y0 = 4_000_020, 2_800_020  # multiples of 30 in EPSG:3035


def region_catalog(folder: Path, size_px: int, patch: int) -> Path:
    side = size_px * 30
    data = {
        "region": {"name": "bench", "crs": "EPSG:3035", "bounds": [X0, Y0, X0 + side, Y0 + side]},
        "imagery": {"resolution": 30, "chunk": 256, "source": {"kind": "synthetic", "seed": 0}},
        "climate": {"resolution": 4000, "chunk": 64, "source": {"kind": "synthetic", "seed": 0},
                    "start": "2010-01", "end": "2015-01"},
        "sampling": {"patch_size": patch, "fold_block_size": 50_000},
    }
    path = folder / f"bench-{size_px}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def europe_catalog(folder: Path, patch: int) -> Path:
    """Europe's region (bounds, CRS, land mask) with the synthetic landscape instead of Earth Engine."""
    from geosoc.catalog import CATALOG_DIR

    data = yaml.safe_load((CATALOG_DIR / "europe.yaml").read_text())
    data["region"]["mask"] = str(CATALOG_DIR / data["region"]["mask"])
    data["imagery"]["source"] = {"kind": "synthetic", "seed": 0}
    data["climate"]["source"] = {"kind": "synthetic", "seed": 0}
    data.pop("embeddings")  # the synthetic embedding writes its COGs of the whole region first
    data["sampling"]["patch_size"] = patch
    path = folder / "europe-synthetic.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def same_points(folder: Path, size_px: int, n: int, patch: int, workers: int) -> tuple[float, float]:
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube
    from geosoc.data.from_source import sample_from_source
    from geosoc.data.points import Points, lonlat
    from geosoc.data.sampling import open_sampleset, sample_points

    catalog = load_catalog(path=region_catalog(folder, size_px, patch))
    grid = catalog.config.imagery_grid
    rng = np.random.default_rng(0)
    x, y = grid.x_of(rng.integers(0, grid.width, n)), grid.y_of(rng.integers(0, grid.height, n))
    points = Points(np.array([f"p{i}" for i in range(n)], dtype=object), x, y, *lonlat(x, y, grid.crs),
                    np.full(n, 10.0), "g/kg", "bench")
    sampling = catalog.config.sampling
    print(f"region: {grid.height} x {grid.width} px (14 bands, {grid.height * grid.width * 14 * 4 / 2**30:.2f} GiB "
          f"of imagery), {n:,} random points, {patch} px patches, {workers} workers")

    start = time.perf_counter()
    cube = build_cube(catalog, str(folder / "cube-root"), workers=workers, progress=False)
    built = time.perf_counter() - start
    cut = sample_points(cube, points, str(folder / "cut.zarr"), patch, fold_block_size=sampling.fold_block_size,
                        folds=sampling.folds, workers=workers)
    cube_s = time.perf_counter() - start
    print(f"cube route:   {cube_s:8.1f} s ({built:.1f} s building the cube, {cube_s - built:.1f} s cutting): "
          f"{n / cube_s:,.0f} patches/s")

    start = time.perf_counter()
    read = sample_from_source(catalog, str(folder / "read.zarr"), points, root=str(folder / "source-root"),
                              workers=workers)
    source_s = time.perf_counter() - start
    print(f"source route: {source_s:8.1f} s: {n / source_s:,.0f} patches/s "
          f"({cube_s / source_s:.2f}x the cube route's rate)")
    a, b = open_sampleset(cut.url), open_sampleset(read.url)
    for name in ("patch", "climate", "x", "y"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    print("the two SampleSets are equal, cell for cell")
    return n / cube_s, n / source_s


def scale_child(folder: str, n: int, patch: int, workers: int) -> None:
    from geosoc.catalog import load_catalog
    from geosoc.data.from_source import sample_from_source

    catalog = load_catalog(path=europe_catalog(Path(folder), patch))
    start = time.perf_counter()
    result = sample_from_source(catalog, str(Path(folder) / "unlabelled.zarr"), n_random=n, seed=0,
                                kind="unlabelled", workers=workers, root=folder)
    seconds = time.perf_counter() - start
    worker_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report(seconds=seconds, count=result.samples, worker_peak_rss_mib=worker_mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-px", type=int, default=2048)
    parser.add_argument("--points", type=int, default=4_000)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--scale-points", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scale_child(args.child, args.scale_points, args.patch, args.workers)
        return

    folder = Path(tempfile.mkdtemp(prefix="geosoc-from-source-bench-"))
    rate = None
    try:
        cube_rate, source_rate = same_points(folder, args.size_px, args.points, args.patch, args.workers)
        if args.scale_points:
            rate = scale(folder / "scale", args.scale_points, args.patch, args.workers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if rate is not None:
        print(f"from_source_patches_per_s={rate:.1f}")
    print(f"cube_route_patches_per_s={cube_rate:.1f}")
    print(f"source_route_patches_per_s={source_rate:.1f}")


def scale(folder: Path, n: int, patch: int, workers: int) -> float:
    """Part 2, in a fresh process: its rate."""
    folder.mkdir()
    print(f"scale: {n:,} random locations over Europe's land (synthetic), {patch} px patches, from the sources, "
          f"{workers} worker processes")
    child = run_child(__file__, ["--child", str(folder), "--scale-points", str(n), "--patch", str(patch),
                                 "--workers", str(workers)])
    rate = child["count"] / child["seconds"]
    patches_gib = child["count"] * 14 * patch**2 * 4 / 2**30
    print(f"  {child['count']:,} samples in {child['seconds']:.0f} s: {rate:,.0f} patches/s; {patches_gib:.2f} GiB of "
          f"patches; peak RSS {child['peak_rss_mib']:,.0f} MiB (driver), {child['worker_peak_rss_mib']:,.0f} MiB "
          "(largest worker)")
    return float(rate)


if __name__ == "__main__":
    main()
