"""Catalog loading: every shipped catalog validates; every mistake names file, key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from geosoc.catalog import CLIMATE_VARIABLES, IMAGERY_BANDS, ModelConfig, known_regions, load_catalog
from geosoc.errors import GeosocError
from geosoc.learn.sizing import PAPER_FROM, resolve_model
from tests.helpers import tiny_catalog_dict


@pytest.mark.parametrize("region", ["demo", "edgeroi", "europe", "conus"])
def test_shipped_catalogs_load(region: str) -> None:
    loaded = load_catalog(region)
    assert loaded.config.region.name == region
    assert region in known_regions()


def test_paper_defaults_in_europe() -> None:
    config = load_catalog("europe").config
    assert config.region.crs == "EPSG:3035" and config.imagery.resolution == 30
    assert config.climate is not None and config.climate.variables == list(CLIMATE_VARIABLES)
    assert len(config.climate.months) == 61  # 2010-01 .. 2015-01
    paper = resolve_model(config.model, config.sampling.unlabelled)  # 100,000 unlabelled: the paper's network
    assert paper.image.dim == 768 and paper.image.depth == 12 and paper.image.heads == 12
    assert paper.climate.dim == 512 and paper.climate.layers == 6 and paper.climate.feedforward == 2048
    assert paper.embedding == 128 and config.training.pretrain.temperature == 0.5
    assert load_catalog("conus").config.region.crs == "EPSG:5070"


def test_model_size_from_data_size() -> None:
    """Sizes a catalog leaves unset: small for a survey, the paper's for a continental sample; set ones win."""
    unset = load_catalog("conus").config.model
    survey = resolve_model(unset, 6_000)
    assert (survey.climate.dim, survey.climate.layers, survey.climate.heads, survey.climate.feedforward,
            survey.image.dim, survey.image.depth, survey.embedding) == (64, 2, 4, 128, 64, 2, 32)
    assert resolve_model(unset, PAPER_FROM).climate.dim == 512 and resolve_model(unset, PAPER_FROM - 1) == survey
    explicit = ModelConfig.model_validate({"climate": {"dim": 96, "heads": 8}, "embedding": 16})
    for samples in (100, 1_000_000):
        resolved = resolve_model(explicit, samples)
        assert (resolved.climate.dim, resolved.climate.heads, resolved.embedding) == (96, 8, 16)
        assert resolved.climate.layers == (2 if samples < PAPER_FROM else 6)  # unset: by data size
    with pytest.raises(GeosocError, match=r"model.climate: dim 90 is not a multiple of heads 4"):
        resolve_model(ModelConfig.model_validate({"climate": {"dim": 90}}), 6_000)


def test_bounds_override_and_grids() -> None:
    loaded = load_catalog("europe", bounds=(3_999_990, 2_999_970, 4_002_990, 3_001_470))
    grid = loaded.config.imagery_grid
    assert grid.shape == (50, 100)
    assert loaded.config.climate_grid.resolution == 4000


def expect_error(write_catalog, data, *fragments: str) -> str:
    path = write_catalog(data)
    with pytest.raises(GeosocError) as info:
        load_catalog(path=path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_region() -> None:
    with pytest.raises(GeosocError, match=r"unknown region 'atlantis'.*known regions: conus, demo, edgeroi, europe"):
        load_catalog("atlantis")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GeosocError, match=r"nope\.yaml: cannot read catalog"):
        load_catalog(path=tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("region:\n  name: x\n  bounds: [1, 2\nimagery: {}\n")
    with pytest.raises(GeosocError, match=r"bad\.yaml: not valid YAML at line \d+, column \d+"):
        load_catalog(path=path)


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(GeosocError, match="expected a mapping"):
        load_catalog(path=path)


def test_unknown_key_lists_allowed(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["imagery"]["resolutoin"] = 30
    expect_error(write_catalog, data, "imagery:", "unknown key 'resolutoin'", "allowed: resolution, chunk, source")


def test_missing_key(write_catalog) -> None:
    data = tiny_catalog_dict()
    del data["region"]["crs"]
    expect_error(write_catalog, data, "region.crs: required key is missing")


def test_bad_source_kind(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["imagery"]["source"]["kind"] = "sentinel"
    expect_error(write_catalog, data, "imagery.source", "'sentinel'", "'synthetic', 'earthengine', 'raster'")


def test_source_without_kind(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["imagery"]["source"] = {"seed": 1}
    expect_error(write_catalog, data, "imagery.source: missing key 'kind'; allowed kinds: synthetic, earthengine, raster")


def test_bad_crs(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["region"]["crs"] = "EPSG:99999999"
    expect_error(write_catalog, data, "region.crs", "'EPSG:99999999' is not a CRS")


def test_bounds_reversed(write_catalog) -> None:
    data = tiny_catalog_dict()
    b = data["region"]["bounds"]
    data["region"]["bounds"] = [b[2], b[1], b[0], b[3]]
    expect_error(write_catalog, data, "region:", "min < max")


def test_bounds_in_degrees_outside_crs_area(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["region"]["bounds"] = [5.0, 45.0, 10.0, 50.0]
    expect_error(write_catalog, data, "outside the area of use of EPSG:3035", "not degrees")


def test_negative_resolution(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["imagery"]["resolution"] = -30
    expect_error(write_catalog, data, "imagery.resolution", "greater than 0", "(got -30)")


def test_unknown_band(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["imagery"]["bands"] = ["SR_B1", "SR_B9"]
    expect_error(write_catalog, data, "imagery:", "['SR_B9'] unknown", f"allowed: {', '.join(IMAGERY_BANDS)}")


def test_unknown_climate_variable(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["climate"]["variables"] = ["pr", "rain"]
    expect_error(write_catalog, data, "climate.variables", "['rain'] unknown", "allowed: aet, def")


def test_bad_month(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["climate"]["start"] = "2010/01"
    expect_error(write_catalog, data, "climate.start", "'2010/01' is not a month written YYYY-MM")


def test_months_out_of_order(write_catalog) -> None:
    data = tiny_catalog_dict()
    data["climate"]["start"], data["climate"]["end"] = "2015-01", "2010-01"
    expect_error(write_catalog, data, "climate:", "end 2010-01 is before start 2015-01")


def test_climate_months_inclusive(write_catalog) -> None:
    config = load_catalog(path=write_catalog()).config
    assert [m.isoformat() for m in config.climate.months] == ["2014-10-01", "2014-11-01", "2014-12-01", "2015-01-01"]


def test_region_name_must_match(write_catalog) -> None:
    with pytest.raises(GeosocError, match="region.name is 'tiny', expected 'demo'"):
        load_catalog("demo", path=write_catalog())
