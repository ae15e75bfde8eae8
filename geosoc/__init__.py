"""geosoc: continental soil organic carbon maps with SSL-SoilNet on cloud-native covariate cubes.

The public names load their modules on first use (PEP 562), so `import geosoc`, the CLI's start and every Ray
worker pay for xarray, dask, zarr, rasterio or torch only when a step needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from geosoc.errors import GeosocError
from geosoc.version import __version__

if TYPE_CHECKING:
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube, open_cube, plan_cube
    from geosoc.data.sampling import open_sampleset
    from geosoc.learn.checkpoint import load_model
    from geosoc.maps.export import export_maps
    from geosoc.maps.inference import open_map, predict

_LAZY = {
    "load_catalog": "geosoc.catalog",
    "build_cube": "geosoc.data.cube",
    "open_cube": "geosoc.data.cube",
    "plan_cube": "geosoc.data.cube",
    "open_sampleset": "geosoc.data.sampling",
    "load_model": "geosoc.learn.checkpoint",  # a model and its metadata from a checkpoint URL, without pickle
    "predict": "geosoc.maps.inference",  # SOC map of a cube: median, interval bounds, aoa, di
    "open_map": "geosoc.maps.inference",  # a written map, lazily, with its CRS
    "export_maps": "geosoc.maps.export",  # COGs, quicklook.png and a STAC item.json of a written map
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'geosoc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "GeosocError", "__version__", "build_cube", "export_maps", "load_catalog", "load_model", "open_cube",
    "open_map", "open_sampleset", "plan_cube", "predict",
]
