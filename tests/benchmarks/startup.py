"""Start-up time of `import geosoc` and `geosoc --help`, against a bare interpreter in the same run (not a test).

    python tests/benchmarks/startup.py [--repeats 7]

Every CLI call, Ray worker and test subprocess pays the package's import, so the package face is lazy
(PEP 562): `import geosoc` loads no xarray, dask, zarr, rasterio or torch. Each command runs `--repeats` times
in a fresh interpreter; the median wall time is printed, with its excess over `python -c pass`. Last lines:
`import_geosoc_s=<x>` and `cli_help_s=<x>` (goal: under 1 s each on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

GEOSOC = str(Path(sys.executable).with_name("geosoc"))


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    bare = median_seconds([sys.executable, "-c", "pass"], args.repeats)
    face = median_seconds([sys.executable, "-c", "import geosoc"], args.repeats)
    cli = median_seconds([GEOSOC, "--help"], args.repeats)
    heavy = median_seconds([sys.executable, "-c", "import geosoc.data.cube, geosoc.maps.inference"], args.repeats)
    print(f"python -c pass:            {bare:6.2f} s")
    print(f"import geosoc:             {face:6.2f} s  ({face - bare:+.2f} s over a bare interpreter)")
    print(f"geosoc --help:             {cli:6.2f} s  ({cli - bare:+.2f} s)")
    print(f"import cube and inference: {heavy:6.2f} s  (what a step that needs them pays; {heavy / face:.1f}x the face)")
    print(f"import_geosoc_s={face:.2f}")
    print(f"cli_help_s={cli:.2f}")


if __name__ == "__main__":
    main()
