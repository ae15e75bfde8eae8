"""The synthetic continent (catalogs/europe-synthetic.yaml): Europe's frame with the synthetic landscape, its survey
drawn the way LUCAS is, and a small version of it through every step of tests/benchmarks/continent.py: the dry
runs, the cube, sampling from the sources, `ray job submit` pretraining and fine-tuning, `geosoc evaluate`, the Ray
map with its exports, and the ssl/supervised curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from geosoc.catalog import CATALOG_DIR, SyntheticSource, load_catalog

SHIPPED = CATALOG_DIR / "europe-synthetic.yaml"


def test_the_synthetic_continent_has_europes_frame() -> None:
    """Bounds, CRS, land mask, periods and climate variables are the Earth Engine Europe's; only the source, the
    resolutions and the sizes differ (they are what a 2-core machine runs in about an hour)."""
    ours, europe = load_catalog("europe-synthetic").config, load_catalog("europe").config
    assert ours.region.model_dump(exclude={"name"}) == europe.region.model_dump(exclude={"name"})
    assert ours.imagery.period == europe.imagery.period
    assert ours.climate is not None and europe.climate is not None
    assert (ours.climate.start, ours.climate.end, ours.climate.variables) == (
        europe.climate.start, europe.climate.end, europe.climate.variables)
    assert isinstance(ours.imagery.source, SyntheticSource) and isinstance(ours.climate.source, SyntheticSource)
    assert ours.sampling.unlabelled == 100_000 and ours.sampling.depth == europe.sampling.depth
    assert ours.embeddings is None
    # the small network, set: the size rule would give 100,000 samples the paper's, which a CPU cannot train
    assert ours.model.image.dim == 64 and ours.model.climate.dim == 64
    assert ours.sampling.patch_size % ours.model.image.patch == 0


def test_the_simulated_survey_is_drawn_as_lucas_is(tmp_path: Path) -> None:
    """Sites are nodes of the 2 km grid on land (inside the mask, not on open water at the site nor at its pixel),
    the table reads back as a LUCAS 2018 file with every row valid, and OC is the true SOC times a ~10 % error."""
    from geosoc.data.points import PRESETS, read_points
    from geosoc.demo import LAB_ERROR, LUCAS_GRID, simulated_lucas_table
    from geosoc.sources.from_catalog import open_layers
    from geosoc.sources.synthetic import WATER, Landscape

    loaded = load_catalog("europe-synthetic")
    config = loaded.config
    table = simulated_lucas_table(loaded, 400, seed=3)
    assert len(table) == 400 and list(table.columns) == ["POINTID", "TH_LONG", "TH_LAT", "OC"]
    assert table.equals(simulated_lucas_table(loaded, 400, seed=3))  # seeded
    csv = tmp_path / "lucas.csv"
    table.to_csv(csv, index=False)
    points = read_points(csv, config.region.crs, "lucas2018", PRESETS["lucas2018"], config.imagery_grid.bounds)
    assert len(points) == 400 and not points.problems
    assert np.allclose(points.x / LUCAS_GRID, np.round(points.x / LUCAS_GRID), atol=1e-3)  # grid nodes
    assert np.allclose(points.y / LUCAS_GRID, np.round(points.y / LUCAS_GRID), atol=1e-3)
    inside = open_layers(loaded)[0].reader.inside
    grid = config.imagery_grid
    rows, cols = grid.rowcol(points.x, points.y)
    assert inside(grid.x_of(cols), grid.y_of(rows)).all()
    landscape = Landscape(0)
    assert (landscape.fields(points.x, points.y, config.region.crs)["land_cover"] != WATER).all()
    error = np.log(points.target / landscape.soc_at(points.x, points.y, config.region.crs))
    assert abs(error.mean()) < 0.03 and 0.7 * LAB_ERROR < error.std() < 1.3 * LAB_ERROR
    assert 12 < np.median(points.target) < 35  # LUCAS-like: a median about 20 g/kg


def test_a_continental_cog_has_overviews(tmp_path: Path) -> None:
    """A map wider than a COG tile (512 px) gets overviews down to one tile, averaged (SOC) or nearest (AOA): what a
    viewer of a continental map reads first. A map of one tile needs none."""
    import rasterio
    import xarray as xr
    from rasterio.transform import from_origin

    from geosoc.maps.export import write_cog

    values = np.random.default_rng(0).gamma(2.0, 10.0, size=(1100, 1300)).astype(np.float32)
    values[:100, :200] = np.nan
    transform = from_origin(2_500_000, 5_500_000, 4000, 4000)
    for name, data in (("soc_median", values), ("aoa", (values > 20).astype(np.float32))):
        url = write_cog(xr.DataArray(data, dims=("y", "x"), name=name), str(tmp_path / f"{name}.tif"), "EPSG:3035",
                        transform)
        with rasterio.open(url) as src:
            assert src.overviews(1) == [2, 4], name
            assert min(src.height, src.width) // 4 < 512
    small = write_cog(xr.DataArray(values[:300, :300], dims=("y", "x"), name="soc_median"),
                      str(tmp_path / "small.tif"), "EPSG:3035", transform)
    with rasterio.open(small) as src:
        assert src.overviews(1) == []


def small_continent(folder: Path) -> Path:
    """The shipped catalog at a tiny size: a 480 x 320 km part of it (central Europe, some sea), imagery at 10 km,
    climate at 40 km, 8 px patches, the map at 20 km, one epoch of pretraining and two of fine-tuning."""
    data: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    data["region"]["bounds"] = [4_000_000, 2_600_000, 4_480_000, 2_920_000]
    data["region"]["mask"] = str((SHIPPED.parent / data["region"]["mask"]).resolve())
    data["imagery"].update(resolution=10_000, chunk=16)
    data["climate"].update(resolution=40_000, chunk=4)
    data["sampling"].update(patch_size=8, unlabelled=300, min_spacing=10_000)
    data["training"]["pretrain"]["epochs"] = 1
    data["training"]["finetune"]["epochs"] = 2
    data["predict"]["resolution"] = 20_000
    path = folder / "europe-synthetic-small.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow  # four Ray jobs and an evaluation end to end: 170-400 s on 2 cores
def test_a_small_continent_runs_every_step_end_to_end(ray_head: dict[str, Any], tmp_path: Path) -> None:
    """tests/benchmarks/continent.py's rehearsal on the small continent, the Ray jobs on the session's head: every
    step runs as a user runs it; the plans' chunks, samples, SampleSet sizes and the labelled sample's windows and
    bytes read are what the steps wrote and read, the map's cells and windows what it planned; the map's exports,
    the evaluation and the ssl/supervised ratio are there."""
    from tests.benchmarks.continent import print_outcome, rehearse

    catalog = small_continent(tmp_path)
    root = tmp_path / "root"
    lines: list[str] = []
    outcome = rehearse(catalog, root, ray_head, labelled=120, unlabelled=300, evaluate=(), curve=[60], curve_seeds=[1],
                       window=8, log=lines.append)
    print_outcome(outcome, [])  # each step's time and memory, the plan against measurement (shown with -s)
    steps = [run.step for run in outcome.runs]
    assert steps == ["plan cube", "plan unlabelled", "plan labelled", "plan map", "cube", "sample unlabelled",
                     "sample labelled", "pretrain", "finetune", "map", "sample 60 labels", "evaluate 60 labels"]
    assert all(run.seconds > 0 and run.peak_mib > 0 for run in outcome.runs)
    by_name = {(f.step, f.what): f for f in outcome.figures}
    for key in [("cube", "imagery chunks"), ("cube", "climate chunks"), ("cube", "imagery bytes (uncompressed)"),
                ("sample unlabelled", "samples"), ("sample labelled", "samples"),
                ("sample unlabelled", "SampleSet bytes"), ("sample labelled", "SampleSet bytes"),
                ("sample labelled", "imagery windows"), ("sample labelled", "imagery bytes read"),
                ("sample labelled", "climate windows"), ("sample labelled", "climate bytes read"), ("map", "windows")]:
        assert by_name[key].ratio == 1.0, (key, by_name[key])
    assert by_name[("sample labelled", "samples")].measured == 120
    random_reads = by_name[("sample unlabelled", "imagery windows")]  # plus the windows in flight when N is reached
    assert random_reads.ratio is not None and 0.5 < random_reads.ratio <= 1.0, random_reads
    cells = by_name[("map", "cells")]
    assert cells.ratio is not None and 0.9 < cells.ratio < 1.1, cells  # the mask sampled on a lattice
    assert by_name[("map", "bytes decoded")].measured
    maps = root / "maps"
    assert {"soc_median.tif", "soc_q05.tif", "soc_q95.tif", "aoa.tif", "quicklook.png", "item.json"} <= {
        p.name for p in maps.iterdir()}
    assert "predict finished: " in "\n".join(lines) and "pretrain finished: " in "\n".join(lines)
    assert (root / "curve" / "labels-60" / "evaluation" / "summary.json").exists()
    assert np.isfinite(outcome.ratios[60]) and outcome.ratios[60] > 0
    assert any(line.startswith("continent_ssl_vs_supervised_rmse_ratio_60_labels=") for line in outcome.lines)
    assert any(line.startswith("ray_pipeline_efficiency=") for line in outcome.lines)


def test_the_small_continent_is_derived_from_the_shipped_one(tmp_path: Path) -> None:
    """Only sizes change between the shipped continent and the small one: what the rehearsal checks in the suite is
    the shipped catalog's frame and settings."""
    small = load_catalog(path=small_continent(tmp_path)).config
    shipped = load_catalog("europe-synthetic").config
    assert small.region.crs == shipped.region.crs and Path(small.region.mask or "").name == "europe-land.tif"
    assert small.model == shipped.model and small.climate is not None and shipped.climate is not None
    assert small.climate.variables == shipped.climate.variables and small.climate.months == shipped.climate.months
    assert small.training.finetune.patience == shipped.training.finetune.patience
