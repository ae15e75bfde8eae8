"""GDAL's own way to a raster at any fsspec URL, with the settings fsspec uses: no Python file object under GDAL.

rasterio's `opener=` hands GDAL Python file objects through a plugin that keeps its open files per thread context;
under Dask's threads it lost track of them (`I/O error`, or a segfault on a freed object). GDAL's network readers
are thread-safe, so each URL goes to the reader that fits it, set up as fsspec's filesystem for that URL is:

- `s3://`: GDAL's /vsis3/, with the endpoint, region, credentials and requester-pays setting s3fs resolved
  (its credentials come from botocore's own search: environment, profiles, roles);
- `gs://`: GDAL's /vsicurl/ on the JSON API's media URL at gcsfs's endpoint, with the authorisation header and
  billing project gcsfs sends (GDAL's /vsigs/ speaks the XML API and searches credentials its own way);
- `http(s)://`: /vsicurl/; a local path as it is;
- any other filesystem (memory://, ...): the file read whole into GDAL's memory (/vsimem/), so small files only.

The settings are GDAL configuration for the block (rasterio.Env: thread-local in worker threads), never part of a
path, so neither a path nor an error message carries a credential.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import fsspec.asyn
import rasterio
from fsspec.implementations.local import LocalFileSystem
from rasterio.io import MemoryFile
from rasterio.session import Session

from geosoc.io.storage import filesystem, protocols

# Every read: no listing of the file's folder for side-car files (one request less, and none against the JSON API),
# and GDAL's own retries of 429 and 5xx answers with a growing delay.
COMMON = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_HTTP_MAX_RETRY": "5", "GDAL_HTTP_RETRY_DELAY": "1"}


@contextmanager
def gdal_path(url: str) -> Iterator[str]:
    """A path GDAL (rasterio, rioxarray) opens for `url`, valid inside the block, whose GDAL settings it sets."""
    if "://" not in url or url.startswith("file://"):
        yield url.removeprefix("file://")
        return
    fs, path = filesystem(url)
    kinds = protocols(fs)
    if isinstance(fs, LocalFileSystem):
        yield path
    elif "s3" in kinds:
        with rasterio.Env(session=_Settings(_s3_settings(fs)), **COMMON):
            yield f"/vsis3/{path}"
    elif kinds & {"gs", "gcs"}:
        media, settings = _gcs_media(fs, path)
        with rasterio.Env(session=_Settings(settings), **COMMON, CPL_VSIL_CURL_USE_HEAD="NO"):  # a GET, not a HEAD
            yield f"/vsicurl/{media}"
    elif kinds & {"http", "https"}:
        with rasterio.Env(**COMMON):
            yield f"/vsicurl/{url}"
    else:
        with MemoryFile(fs.cat_file(path)) as memory, rasterio.Env(**COMMON):
            yield memory.name


class _Settings(Session):
    """GDAL options given as a rasterio session: the one way rasterio takes AWS credential options."""

    def __init__(self, options: dict[str, str]) -> None:
        self.options = options

    @classmethod
    def hascreds(cls, config: dict[str, Any]) -> bool:
        return True

    @property
    def credentials(self) -> dict[str, str]:
        return {}  # nothing to show: the options are for GDAL alone

    def get_credential_options(self) -> dict[str, str]:
        return self.options


def _s3_settings(fs: Any) -> dict[str, str]:
    """GDAL's /vsis3/ options for what s3fs's client does: its endpoint, region, signing and request payer."""
    client = fs.connect()
    options: dict[str, str] = {}
    endpoint = urlsplit(client.meta.endpoint_url)
    if not endpoint.hostname or not endpoint.hostname.endswith("amazonaws.com"):  # AWS itself: GDAL's default
        options.update(AWS_S3_ENDPOINT=endpoint.netloc + endpoint.path.rstrip("/"),
                       AWS_HTTPS="YES" if endpoint.scheme == "https" else "NO", AWS_VIRTUAL_HOSTING="FALSE")
    if client.meta.region_name:
        options["AWS_REGION"] = client.meta.region_name
    if getattr(fs, "requester_pays", False):
        options["AWS_REQUEST_PAYER"] = "requester"
    key = _s3_credentials(fs)
    if key is None:
        options["AWS_NO_SIGN_REQUEST"] = "YES"
    else:
        options.update(AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1])
        if key[2]:
            options["AWS_SESSION_TOKEN"] = key[2]
    return options


def _s3_credentials(fs: Any) -> tuple[str, str, str | None] | None:
    """The key s3fs signs with (given to it, or found by botocore's search), None for unsigned requests."""
    if getattr(fs, "anon", False):
        return None
    kwargs = getattr(fs, "client_kwargs", {}) or {}
    key = fs.key or kwargs.get("aws_access_key_id")
    secret = fs.secret or kwargs.get("aws_secret_access_key")
    if key and secret:
        return key, secret, fs.token or kwargs.get("aws_session_token")
    found = fsspec.asyn.sync(fs.loop, fs.session.get_credentials)
    if found is None:
        return None
    frozen = fsspec.asyn.sync(fs.loop, found.get_frozen_credentials)
    return frozen.access_key, frozen.secret_key, frozen.token


def _gcs_media(fs: Any, path: str) -> tuple[str, dict[str, str]]:
    """The JSON API media URL of an object at gcsfs's endpoint, and the headers gcsfs sends (its credentials)."""
    bucket, _, key = path.partition("/")
    media = f"{fs.base}b/{quote(bucket, safe='')}/o/{quote(key, safe='')}?alt=media"
    payer = getattr(fs, "requester_pays", False)
    if payer:
        media += "&userProject=" + quote(payer if isinstance(payer, str) else str(fs.project), safe="")
    headers: dict[str, str] = {}
    fs.credentials.apply(headers)  # refreshed when due; nothing for anonymous access
    settings = {"GDAL_HTTP_HEADERS": "\r\n".join(f"{k}: {v}" for k, v in headers.items())} if headers else {}
    return media, settings
