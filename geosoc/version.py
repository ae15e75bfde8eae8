"""The installed geosoc version, stamped into every artefact's metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("geosoc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
