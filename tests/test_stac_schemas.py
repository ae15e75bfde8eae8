"""The offline STAC validator (`tests/stac_schemas.py`) passes a good item and fails broken ones, without a network."""

from __future__ import annotations

import datetime as dt
from typing import Any

import jsonschema
import pytest
import referencing.exceptions

from tests.stac_schemas import PROJECTION, RASTER, SchemaNotKept, registry, validate_item


def good_item() -> dict[str, Any]:
    """A small item like geosoc's: projection fields in properties, a raster band on a COG asset."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension

    item = pystac.Item(id="tiny", geometry={"type": "Polygon", "coordinates": [[[10, 50], [11, 50], [11, 51], [10, 51], [10, 50]]]},
                       bbox=[10, 50, 11, 51], datetime=dt.datetime(2024, 1, 1, tzinfo=dt.UTC), properties={})
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code, proj.shape = "EPSG:3035", [2, 3]
    proj.transform, proj.bbox = [60.0, 0.0, 4e6, 0.0, -60.0, 3e6], [4e6, 3e6 - 120, 4e6 + 180, 3e6]
    asset = pystac.Asset(href="soc_median.tif", media_type=pystac.MediaType.COG, roles=["data"])
    item.add_asset("soc_median", asset)
    RasterExtension.ext(asset, add_if_missing=True).bands = [RasterBand.create(
        nodata=NoDataStrings.NAN, data_type=DataType.FLOAT32, unit="g/kg", spatial_resolution=60.0)]
    data = item.to_dict(include_self_link=False)
    assert set(data["stac_extensions"]) == {PROJECTION, RASTER}
    return data


def test_a_good_stac_item_validates_offline() -> None:
    validate_item(good_item())
    item = good_item()  # the optional fields too, in their allowed forms
    item["properties"].update({"proj:wkt2": None, "proj:projjson": {"type": "ProjectedCRS"}, "proj:centroid": {"lat": 50.5, "lon": 10.5},
                               "proj:geometry": {"type": "Point", "coordinates": [4e6, 3e6]}})
    item["assets"]["soc_median"]["raster:bands"][0].update({
        "bits_per_sample": 12, "sampling": "area", "scale": 0.1, "offset": -1,
        "statistics": {"minimum": 0, "maximum": 80.5, "mean": 20, "stddev": 4.2, "valid_percent": 97.5},
        "histogram": {"count": 3, "min": 0, "max": 80, "buckets": [5, 10, 2]}})
    validate_item(item)


def _drop_proj_fields(item: dict[str, Any]) -> None:
    for key in [k for k in item["properties"] if k.startswith("proj:")]:
        del item["properties"][key]


def _band(item: dict[str, Any]) -> dict[str, Any]:
    band: dict[str, Any] = item["assets"]["soc_median"]["raster:bands"][0]
    return band


# (how to break a good item, what the error must name: "<JSON path of the bad value>: <message>")
BROKEN = {
    "shape-string": (lambda item: item["properties"].update({"proj:shape": "2x3"}), "$.properties['proj:shape']: '2x3' is not of type 'array'"),
    "data-type-float33": (lambda item: _band(item).update({"data_type": "float33"}), "['raster:bands'][0].data_type: 'float33' is not one of"),
    "projection-undeclared": (lambda item: item["stac_extensions"].remove(PROJECTION), "$.stac_extensions: "),  # proj: fields stay
    "raster-undeclared": (lambda item: item["stac_extensions"].remove(RASTER), "$.stac_extensions: "),  # raster:bands stays
    "no-proj-field": (_drop_proj_fields, "$: "),
    "transform-5": (lambda item: item["properties"].update({"proj:transform": [1, 2, 3, 4, 5]}), "$.properties['proj:transform']: "),
    "bbox-3": (lambda item: item["properties"].update({"proj:bbox": [0, 0, 1]}), "$.properties['proj:bbox']: "),
    "shape-negative": (lambda item: item["properties"].update({"proj:shape": [2, -3]}), "$.properties['proj:shape'][1]: -3 is less than"),
    "code-int": (lambda item: item["properties"].update({"proj:code": 3035}), "$.properties['proj:code']: 3035 is not of type"),
    "centroid-lat": (lambda item: item["properties"].update({"proj:centroid": {"lat": 91, "lon": 0}}), "['proj:centroid'].lat: 91 is greater than"),
    "bands-in-properties": (lambda item: item["properties"].update({"raster:bands": [{"data_type": "uint8"}]}), "$.properties: "),
    "nodata-string": (lambda item: _band(item).update({"nodata": "none"}), "['raster:bands'][0].nodata: 'none' is not valid"),
    "bits-0": (lambda item: _band(item).update({"bits_per_sample": 0}), "[0].bits_per_sample: 0 is less than"),
    "valid-percent": (lambda item: _band(item).update({"statistics": {"valid_percent": 101}}), ".statistics.valid_percent: 101 is greater than"),
    "no-bands": (lambda item: item["assets"]["soc_median"].update({"raster:bands": []}), "['raster:bands']: [] should be non-empty"),
    "core-no-geometry": (lambda item: item.pop("geometry"), "$: 'geometry' is a required property"),  # the core item schema
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_the_stac_validator_fails_a_broken_item(name: str) -> None:
    breaks, expected = BROKEN[name]
    item = good_item()
    breaks(item)
    with pytest.raises(jsonschema.ValidationError) as raised:
        validate_item(item)
    assert expected in f"{raised.value.json_path}: {raised.value.message}"


def test_the_stac_validator_never_fetches_a_schema() -> None:
    item = good_item()
    item["stac_extensions"].append("https://stac-extensions.github.io/eo/v2.0.0/schema.json")
    with pytest.raises(SchemaNotKept, match="eo/v2.0.0"):
        validate_item(item)
    with pytest.raises(referencing.exceptions.Unretrievable, match="example.org") as raised:
        registry().get_or_retrieve("https://example.org/schema.json")
    assert isinstance(raised.value.__cause__, SchemaNotKept) and "example.org" in str(raised.value.__cause__)
