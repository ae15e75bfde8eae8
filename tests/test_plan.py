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
from geosoc.maps.plan import Rate, choose_rate, choose_startup, load_rates, plan_from_catalog, record_rate
from tests.helpers import tiny_catalog_dict, western_half_mask


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
    assert "reads (decoded bytes" in out and "GiB" in out and "MB/s per actor assumed" in out
    assert "read amplification 1.19 on 1 actor, 1.19 on 8" in out  # 4 GiB of chunks per process: strips 3 wide
    assert "start-up of a Ray map job" in out
    assert "on 1 actor: start-up" in out and "on 8 actors: start-up" in out and "bound by compute" in out
    assert not root.exists()  # nothing written
    coarse = _words(CliRunner().invoke(app, ["predict", "--region", "europe", "--root", str(root),
                                             "--dry-run"]).output)
    assert "bound by reading" in coarse  # at 1 km a cell's share of whole cube chunks outweighs its compute


def test_the_mask_decides_which_cells_and_windows_count(tmp_path: Path) -> None:
    """A mask whose west half is inside: half the cells and the west windows count, and only the chunks a build
    writes, those that may hold a pixel inside it, are decoded."""
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
    tile = whole.reads.groups[0].tile_bytes  # chunks of 32 px: 3 x 3, the western two columns inside the mask
    assert (plan.decoded()["imagery"], whole.decoded()["imagery"]) == (6 * tile, 9 * tile)
    assert plan.needed_bytes < whole.needed_bytes


@pytest.mark.parametrize("masked", [False, True])
def test_the_plan_decodes_what_a_map_decodes(trained_region: tuple[Path, str], tmp_path: Path, masked: bool) -> None:
    """The dry run's decoded bytes are what the engine's chunk caches count on a small map, to the byte (the map's
    `geosoc_reads` attr); with a mask, the chunks a build never wrote count as nothing in both."""
    from geosoc.data.cube import build_cube
    from geosoc.maps.inference import predict

    path, root = trained_region
    data = yaml.safe_load(path.read_text())
    cube = f"{root}/cube.zarr"
    if masked:
        data["region"]["mask"] = western_half_mask(tmp_path, data["region"]["bounds"])
    catalog = tmp_path / "tiny.yaml"
    catalog.write_text(yaml.safe_dump(data))
    if masked:
        cube = build_cube(load_catalog(path=catalog), str(tmp_path / "root"), progress=False)
    ds = predict(cube, f"{root}/models/finetune", resolution=60, chunk=7, out=str(tmp_path / "soc.zarr"),
                 progress=False)
    reads = ds.attrs["geosoc_reads"]
    plan = plan_from_catalog(load_catalog(path=catalog), resolution=60, chunk=7)
    assert reads["windows"] == plan.windows == 49 and reads["strip"] == plan.strip
    assert reads["cache_bytes"] == plan.cache_bytes
    assert reads["decoded_bytes"] == plan.read_bytes() > 0
    assert plan.needed_bytes <= plan.read_bytes() <= 1.5 * plan.needed_bytes
    tile = plan.reads.groups[0].tile_bytes
    assert plan.decoded()["imagery"] == (6 if masked else 9) * tile  # the 3 x 3 chunks, or the 2 columns in the mask


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
    assert choose_startup(rates, "cpu", 2_000_000, 60) == (0.0, "not measured (none in the rates file): left out")
    record_rate(Rate("cpu", 2_000_000, 4000.0, 800.0, 0.0, "2026-12", "continent", 43.5), path)
    record_rate(Rate("cpu", 2_000_000, 60.0, 800.0, 0.0, "2026-12", "continent", 11.0), path)
    record_rate(Rate("NVIDIA H200", 2_000_000, 4000.0, 9_000.0, 0.0, "2026-12", "continent", 60.0), path)
    rates = load_rates()
    assert choose_startup(rates, "cpu", 2_000_000, 3000) == (43.5, "44 s measured on cpu (output cells of 4000)")
    assert choose_startup(rates, "cpu", 2_000_000, 30)[0] == 11.0  # the nearest resolution's
    assert choose_startup(rates, "NVIDIA B200", 2_000_000, 4000)[0] == 43.5  # no entry there: any device's nearest
    path.write_text(json.dumps({"rate": []}))
    with pytest.raises(InputError, match="rates.json: not a rates file"):
        load_rates()
