"""Shared fixtures: tiny catalogs written per test, offline settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EDGEROI = REPO / "geosoc" / "data" / "edgeroi"


def tiny_catalog_dict(size_px: int = 96, chunk: int = 32, climate: bool = True) -> dict[str, Any]:
    """A synthetic region of size_px x size_px pixels at 30 m in EPSG:3035, climate at 960 m."""
    x0, y0 = 4419990, 2824380  # includes a lake: nodata pixels
    side = size_px * 30
    data: dict[str, Any] = {
        "region": {"name": "tiny", "crs": "EPSG:3035", "bounds": [x0, y0, x0 + side, y0 + side]},
        "imagery": {"resolution": 30, "chunk": chunk, "source": {"kind": "synthetic", "seed": 7}},
    }
    if climate:
        data["climate"] = {
            "resolution": 960,
            "chunk": 2,
            "source": {"kind": "synthetic", "seed": 7},
            "variables": ["pr", "tmmx", "swe"],
            "start": "2014-10",
            "end": "2015-01",
        }
    return data


@pytest.fixture
def write_catalog(tmp_path: Path) -> Callable[..., Path]:
    """Write a catalog dict (default: the tiny synthetic region) to a YAML file and return its path."""

    def write(data: dict[str, Any] | None = None, name: str = "tiny.yaml", **kwargs: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data if data is not None else tiny_catalog_dict(**kwargs), sort_keys=False))
        return path

    return write
