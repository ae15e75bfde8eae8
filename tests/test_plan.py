"""`geosoc predict --dry-run`: a map planned from the catalog alone (no cube, no model): cells inside the mask,
windows, bytes read, and the compute and reading bounds from measured rates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin
from typer.testing import CliRunner

from geosoc.catalog import load_catalog
from geosoc.cli import app
from geosoc.errors import InputError
from geosoc.maps.plan import Rate, choose_rate, load_rates, plan_from_catalog, record_rate
from tests.helpers import tiny_catalog_dict


def _words(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines at the terminal's width


def test_europe_dry_run_works_from_a_fresh_clone_with_no_data(tmp_path: Path) -> None:
    root = tmp_path / "nothing-here"
    result = CliRunner().invoke(app, ["predict", "--region", "europe", "--root", str(root), "--dry-run",
                                      "--resolution", "250"])
    assert result.exit_code == 0, result.output
    out = _words(result.output)
    assert "planned from its catalog (no cube or model needed); nothing written" in out
    assert "inside region.mask (masks/europe-land.tif)" in out and "not made yet: `geosoc finetune`" in out
    assert "104.9 M parameters" in out and "measured on NVIDIA H200" in out
    assert "reads (decoded bytes" in out and "TiB" in out and "MB/s per actor assumed" in out
    assert "on 1 actor: compute" in out and "on 8 actors: compute" in out and "bound by compute" in out
    assert not root.exists()  # nothing written
    coarse = _words(CliRunner().invoke(app, ["predict", "--region", "europe", "--root", str(root),
                                             "--dry-run"]).output)
    assert "bound by reading" in coarse  # at 1 km a cell's share of whole cube chunks outweighs its compute


def test_the_mask_decides_which_cells_and_windows_count(tmp_path: Path) -> None:
    """A mask whose west half is inside: half the cells and the west windows count, and only they read."""
    data = tiny_catalog_dict(size_px=96, chunk=32)
    xmin, ymin, xmax, ymax = data["region"]["bounds"]
    mask = tmp_path / "west.tif"
    inside = np.zeros((96, 96), dtype=np.uint8)
    inside[:, :48] = 1
    with rasterio.open(mask, "w", driver="GTiff", height=96, width=96, count=1, dtype="uint8", crs="EPSG:3035",
                       transform=from_origin(xmin, ymax, 30, 30)) as dst:
        dst.write(inside, 1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**data, "region": {**data["region"], "mask": "west.tif"}}))
    plan = plan_from_catalog(load_catalog(path=path), resolution=30, chunk=16)  # 96 x 96 cells, 6 x 6 windows
    assert plan.cells_in_bounds == 96 * 96 and plan.cells_inside == 96 * 48
    assert plan.windows == 36 and plan.windows_inside == 18
    path.write_text(yaml.safe_dump(data))
    whole = plan_from_catalog(load_catalog(path=path), resolution=30, chunk=16)
    assert whole.cells_inside == whole.cells_in_bounds and whole.windows_inside == 36
    assert plan.imagery_bytes * 2 == whole.imagery_bytes  # symmetric halves of the grid read alike


@pytest.mark.parametrize("resolution,chunk,patch", [(60, 8, 8), (90, 5, 64), (30, 16, 1), (300, 3, 64)])
def test_chunks_read_are_those_each_windows_block_touches(resolution: float, chunk: int, patch: int) -> None:
    """The plan's count, window by window, equals the cube chunks under the block `read_window` reads (every
    cell's pixel plus the patch halo, clipped to the cube)."""
    from geosoc.maps.inference import output_grid
    from geosoc.maps.plan import _chunks_read

    cube = load_catalog("demo").config.imagery_grid
    grid = output_grid(cube, resolution, 14, patch, None, chunk)
    counted = _chunks_read(grid, cube, cube.chunks, patch)
    for window in grid.windows():
        x, y = np.meshgrid(grid.x_of(np.arange(window.cols.start, window.cols.stop)),
                           grid.y_of(np.arange(window.rows.start, window.rows.stop)))
        rows, cols = cube.rowcol(x.ravel(), y.ravel())
        spans = []
        for pixels, n, size in ((rows, cube.height, cube.chunks[0]), (cols, cube.width, cube.chunks[1])):
            first = min(max(int(pixels.min()) - patch // 2, 0), n - 1)
            last = min(max(int(pixels.max()) - patch // 2 + patch - 1, 0), n - 1)
            spans.append(last // size - first // size + 1)
        assert counted[window.index] == spans[0] * spans[1], window


def test_rates_come_from_the_file_with_a_stated_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rates.json"
    gpu = Rate("NVIDIA H200", 100_000_000, 60.0, 10_000.0, 12_000.0, "2026-11", "bench")
    record_rate(gpu, path)
    record_rate(Rate("cpu", 1_000_000, 60.0, 900.0, 1000.0, "2026-11", "bench"), path)
    record_rate(Rate("NVIDIA H200", 100_000_000, 60.0, 11_000.0, 12_000.0, "2026-12", "bench"), path)  # replaces
    monkeypatch.setenv("GEOSOC_RATES", str(path))
    rates = load_rates()
    assert [(r.device, r.cells_per_s) for r in rates] == [("cpu", 900.0), ("NVIDIA H200", 11_000.0)]
    rate, how = choose_rate(rates, None, 100_000_000, 250)
    assert rate == 11_000 and "measured on NVIDIA H200" in how and "scaled" not in how
    rate, how = choose_rate(rates, "cpu", 2_000_000, 60)
    assert rate == 450 and "scaled to 2.0 M parameters" in how
    rate, how = choose_rate(rates, "NVIDIA B200", 100_000_000, 60)
    assert rate == 11_000 and "nothing measured on 'NVIDIA B200'" in how
    path.write_text(json.dumps({"rate": []}))
    with pytest.raises(InputError, match="rates.json: not a rates file"):
        load_rates()
