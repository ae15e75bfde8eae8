"""geosoc: continental soil organic carbon maps with SSL-SoilNet on cloud-native covariate cubes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geosoc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

from geosoc.catalog import load_catalog
from geosoc.data.cube import build_cube, open_cube, plan_cube
from geosoc.data.sampling import open_sampleset
from geosoc.errors import GeosocError


def load_model(url: str, device: str = "cpu"):
    """A fine-tuned (or pretrained) model and its metadata from a checkpoint URL, without pickle.

    Imports torch on first use only, so the cube and sampling commands start fast.
    """
    from geosoc.learn.checkpoint import load_model as load

    return load(url, device)


def predict(cube, model=None, **options):
    """SOC map of a cube (`soc_mean`, interval bounds, `aoa`, `di`): see `geosoc.maps.inference.predict`."""
    from geosoc.maps.inference import predict as run

    return run(cube, model, **options)


def open_map(url: str):
    """A map written by `predict(..., out=url)` or `geosoc predict`, lazily, with its CRS."""
    from geosoc.maps.inference import open_map as open_

    return open_(url)


def export_maps(ds, folder: str):
    """COGs, quicklook.png and a STAC item.json of a written map, in `folder`."""
    from geosoc.maps.export import export_maps as export

    return export(ds, folder)


__all__ = [
    "GeosocError", "__version__", "build_cube", "export_maps", "load_catalog", "load_model", "open_cube",
    "open_map", "open_sampleset", "plan_cube", "predict",
]
