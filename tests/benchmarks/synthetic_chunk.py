"""Memory and time of one chunk of the synthetic source, read in blocks (as the source reads) and whole, each in a
fresh process (not a timed test).

    python tests/benchmarks/synthetic_chunk.py [--catalog geosoc/catalogs/europe-synthetic.yaml] [--chunk 4 4]

For the imagery, true SOC and climate layers of the catalog (a synthetic source), one chunk (its chunk row and
column) is read twice in a child process: timed, then under tracemalloc (the peak of what NumPy allocates). The
baseline is the same landscape with one block for the whole window, so the ratios are what blocking saves; both
give the same bits (checked here too). The last line is `synthetic_chunk_peak_ratio=<blocked / whole>` for the
imagery.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from memory import report, run_child

REPO = Path(__file__).resolve().parents[2]
WHOLE = 1 << 40  # block_pixels: the whole window in one block


def child(catalog: str, layer_name: str, row: int, col: int, block_pixels: int) -> None:
    from geosoc.catalog import IMAGERY_BANDS, SyntheticSource, load_catalog
    from geosoc.sources.synthetic import Landscape

    config = load_catalog(path=catalog).config
    climate = config.climate
    if not isinstance(config.imagery.source, SyntheticSource) or climate is None:
        raise SystemExit(f"{catalog}: expected imagery from a synthetic source and a climate section")
    landscape = Landscape(config.imagery.source.seed, block_pixels)
    grid = config.climate_grid if layer_name == "climate" else config.imagery_grid
    assert grid is not None
    n = grid.chunks[0]
    rows, cols = slice(row * n, min((row + 1) * n, grid.height)), slice(col * n, min((col + 1) * n, grid.width))
    reads: dict[str, Callable[[], np.ndarray]] = {
        "imagery": lambda: landscape.imagery(grid, rows, cols, config.imagery.bands or IMAGERY_BANDS),
        "soc": lambda: landscape.true_soc(grid, rows, cols),
        "climate": lambda: landscape.climate(grid, rows, cols, climate.months, climate.variables),
    }
    start = time.perf_counter()
    out = reads[layer_name]()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    reads[layer_name]()
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    report(seconds=seconds, traced_mib=traced, output_mib=out.nbytes / 2**20, shape=list(out.shape),
           digest=hashlib.sha256(out.tobytes()).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", default=str(REPO / "geosoc" / "catalogs" / "europe-synthetic.yaml"))
    parser.add_argument("--chunk", type=int, nargs=2, default=(4, 4), metavar=("ROW", "COL"))
    args = parser.parse_args()
    from geosoc.sources.synthetic import BLOCK_PIXELS

    ratio = float("nan")
    print(f"{'layer':8} {'blocks':>8} {'shape':>20} {'seconds':>8} {'traced MiB':>11} {'peak RSS MiB':>13}")
    for layer_name in ("imagery", "soc", "climate"):
        runs = {}
        for label, pixels in (("whole", WHOLE), ("blocked", BLOCK_PIXELS)):
            runs[label] = run_child(__file__, ["--child", args.catalog, layer_name, *map(str, args.chunk), str(pixels)])
            r = runs[label]
            print(f"{layer_name:8} {label:>8} {str(tuple(r['shape'])):>20} {r['seconds']:8.2f} {r['traced_mib']:11.1f}"
                  f" {r['peak_rss_mib']:13.0f}")
        if runs["whole"]["digest"] != runs["blocked"]["digest"]:
            raise SystemExit(f"{layer_name}: blocked and whole reads differ")
        if layer_name == "imagery":
            ratio = runs["blocked"]["traced_mib"] / runs["whole"]["traced_mib"]
    print(f"synthetic_chunk_peak_ratio={ratio:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
