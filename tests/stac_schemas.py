"""Offline validation of a STAC item: the core 1.1.0 item schema (pystac's bundled copy) and the extension schemas
kept in `tests/schemas/`. Every schema comes from disk; a reference to any other URI is an error naming it, so a
test can never reach the network."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema.validators
from referencing import Registry, Resource

STAC_VERSION = "1.1.0"
ITEM_SCHEMA = f"https://schemas.stacspec.org/v{STAC_VERSION}/item-spec/json-schema/item.json"
PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
# extension schemas kept in the repo, by URI
EXTENSIONS = {
    PROJECTION: Path(__file__).parent / "schemas" / "projection-v2.0.0.json",
    RASTER: Path(__file__).parent / "schemas" / "raster-v1.1.0.json",
}
# an item using a field with one of these prefixes is checked against that extension's schema even when it does not
# declare it, so the schema's own check (its URI in stac_extensions) reports the omission
PREFIXES = {"proj:": PROJECTION, "raster:": RASTER}
# pystac's bundled core files, each the target of a $ref from item.json (directly or through common.json)
CORE_ITEM_FILES = ("item", "basics", "bands", "common", "data-values", "datetime", "instrument", "licensing", "provider")


class SchemaNotKept(LookupError):
    """A schema this offline validator does not hold."""


def _refuse(uri: str) -> Resource[Any]:
    raise SchemaNotKept(f"schema {uri!r} is not kept offline (pystac's bundled core {STAC_VERSION} schemas or "
                        "tests/schemas/); add it there rather than fetching it")


@cache
def registry() -> Registry[Any]:
    """Every schema the item and extension schemas refer to, from disk; any other URI raises `SchemaNotKept`."""
    bundled = files("pystac.validation.jsonschemas")
    resources: dict[str, dict[str, Any]] = {}
    for name in CORE_ITEM_FILES:
        text = bundled.joinpath(f"stac-spec/v{STAC_VERSION}/{name}.json").read_text()
        resources[f"https://schemas.stacspec.org/v{STAC_VERSION}/item-spec/json-schema/{name}.json"] = json.loads(text)
    for name in ("Feature", "Geometry"):
        resources[f"https://geojson.org/schema/{name}.json"] = json.loads(
            bundled.joinpath(f"geojson/{name}.json").read_text())
    for uri, path in EXTENSIONS.items():
        schema = json.loads(path.read_text())
        assert schema["$id"] == uri, (path, schema["$id"])
        resources[uri] = schema
    return Registry(retrieve=_refuse).with_resources(  # type: ignore[call-arg]  # attrs alias of a private field
        (uri, Resource.from_contents(schema)) for uri, schema in resources.items())


def _validate(instance: dict[str, Any], uri: str) -> None:
    schema = registry().contents(uri)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    cls(schema, registry=registry()).validate(instance)  # raises the best-matching error


def _prefixed_fields(item: dict[str, Any]) -> set[str]:
    keys = set(item.get("properties") or {})
    for asset in (item.get("assets") or {}).values():
        keys |= set(asset)
    return keys


def validate_item(item: dict[str, Any]) -> None:
    """Raise `jsonschema.ValidationError` unless `item` is a valid STAC 1.1.0 item and valid for every extension it
    declares or uses a field of; raise `SchemaNotKept` for a declared extension whose schema is not kept here."""
    if item.get("stac_version") != STAC_VERSION:
        raise SchemaNotKept(f"STAC version {item.get('stac_version')!r}: only the core {STAC_VERSION} schemas are kept")
    _validate(item, ITEM_SCHEMA)
    declared = list(item.get("stac_extensions") or [])
    for uri in declared:
        if uri not in EXTENSIONS:
            raise SchemaNotKept(f"extension {uri!r} is declared but its schema is not kept in tests/schemas/")
    used = {uri for key in _prefixed_fields(item) for prefix, uri in PREFIXES.items() if key.startswith(prefix)}
    for uri in dict.fromkeys([*declared, *sorted(used)]):
        _validate(item, uri)
