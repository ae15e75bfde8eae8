"""geosoc: continental soil organic carbon maps with SSL-SoilNet on cloud-native covariate cubes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geosoc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

from geosoc.catalog import load_catalog  # noqa: E402
from geosoc.cube import build_cube, open_cube, plan_cube  # noqa: E402
from geosoc.errors import GeosocError  # noqa: E402

__all__ = ["GeosocError", "__version__", "build_cube", "load_catalog", "open_cube", "plan_cube"]
