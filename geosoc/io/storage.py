"""fsspec URLs for every artefact: a local path, s3://, gs://, memory://. One place to open them.

Cloud options (endpoint, credentials) come from the environment through fsspec's own configuration, e.g.
`FSSPEC_S3_ENDPOINT_URL` or the usual `AWS_*` variables; nothing here takes or prints a secret.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store

from geosoc.errors import (
    DamagedError,
    GeosocError,
    InputError,
    NotFoundError,
    ServiceError,
    UnwritableError,
    first_line,
    missing_extra,
)
from geosoc.io import damaged_chunks

damaged_chunks.install()  # a chunk that does not decode is an error naming it, in every process that reads

T = TypeVar("T")


def default_root(region: str) -> str:
    """Where a region's artefacts live unless `--root` says otherwise: $GEOSOC_ROOT or ./geosoc-data/<region>."""
    return os.environ.get("GEOSOC_ROOT") or str(Path("geosoc-data") / region)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL; local folders are created on write, like object-store prefixes."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as err:  # s3:// or gs:// without its filesystem: name the extra that brings it
        raise (missing_extra(err) or InputError(f"{url}: cannot open this URL: {err}")) from err
    except ValueError as err:
        raise InputError(f"{url}: cannot open this URL: {err}") from err
    if isinstance(fs, LocalFileSystem) and not fs.auto_mkdir:
        fs = LocalFileSystem(auto_mkdir=True)
    return fs, path


def zarr_store(url: str, read_only: bool = False) -> Store:
    """A Zarr v3 store for any fsspec URL (LocalStore for local paths: faster and atomic renames)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, read_only=read_only)


def consolidate(url: str) -> None:
    """Write the consolidated metadata of a finished Zarr store, so that plain `xr.open_zarr(url)` opens it
    without warning (geosoc's own readers do not need it: they read the store's own metadata)."""
    with warnings.catch_warnings():  # "not part of the Zarr format 3 specification" yet: xarray reads it
        warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(zarr_store(url))


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def read_group_attrs(url: str) -> dict[str, Any] | None:
    """The root attributes of a Zarr v3 store, or None where there is none (yet)."""
    store = zarr_store(url, read_only=True)  # outside the try: a bad URL is its own error, not damaged metadata
    try:
        return dict(zarr.open_group(store, mode="r", zarr_format=3).attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedError(damaged_metadata(url, err)) from err


def open_store(url: str, opener: Callable[[Store], T], missing: str) -> T:
    """`opener(store)` on the Zarr store at `url`: NotFoundError "`url`: `missing`" where there is none, and
    DamagedError where its metadata cannot be read (a bad URL is its own error, raised before the try)."""
    store = zarr_store(url, read_only=True)
    try:
        return opener(store)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise NotFoundError(missing_bucket(url) or f"{url}: {missing}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedError(damaged_metadata(url, err)) from err
    except Exception as err:  # a storage endpoint that cannot be reached: one line naming it
        failure = endpoint_failure(err)
        if failure is None:
            raise
        raise failure from err


def damaged_metadata(url: str, err: Exception) -> str:
    """The error for a Zarr store whose metadata cannot be read (a hand-edited or truncated zarr.json)."""
    reason = first_line(err)
    return f"{url}: its Zarr metadata is damaged ({reason}); remove the store and write it again"


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    """The names a filesystem answers to (s3fs: s3 and s3a; gcsfs: gs and gcs)."""
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def parent_url(url: str) -> str:
    """The folder a file or store at `url` is written into."""
    return url.rstrip("/").rpartition("/")[0] or "."


# Where a run writes, checked before it writes anything: one line saying what is wrong.


def check_writable(url: str) -> None:
    """Fail before any work if `url` cannot take writes, saying why: the storage endpoint cannot be reached, the
    bucket does not exist, a file stands where a folder should be, a read-only folder, no credentials. One probe
    object is written and removed, and the local folders it needed with it: a refused run leaves nothing.

    Never creates a bucket: a typo in a bucket name must not make a new bucket in the user's account (s3fs's
    `mkdir` and `makedirs` do, so nothing here calls them on an object store).
    """
    fs, path = filesystem(url)
    probe = f"{path.rstrip('/')}/.geosoc-write-test-{uuid.uuid4().hex}"
    try:
        if isinstance(fs, LocalFileSystem):
            _no_file_in_the_way(url, path)
        else:
            check_bucket(url)
        with leaving_no_folders(fs, probe):  # the probe leaves nothing behind: not even the folders it needed
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except GeosocError:
        raise
    except Exception as err:  # any backend error means the same thing here (a missing profile, no credentials)
        raise unwritable(url, err) from err


def unwritable(url: str, err: Exception) -> GeosocError:
    """The error for a place that refused a write: an unreachable endpoint or a missing bucket named as such,
    a file where a folder should be, else the reason the system gave (a read-only folder, no credentials)."""
    known = storage_failure(err, url)
    if known is not None:
        return known
    reason = getattr(err, "strerror", None) or f"{type(err).__name__}: {first_line(err)}"[:300]
    return UnwritableError(f"{url}: cannot write here ({reason}); choose another --root or fix its permissions")


def storage_failure(err: BaseException, url: str | None = None) -> GeosocError | None:
    """The one-line error for a storage failure a user can fix, or None: an endpoint that cannot be reached
    (named with the setting it came from, never the credentials), and, where the failing `url` is known, its
    missing bucket or a file where one of its folders should be."""
    reached = endpoint_failure(err)
    if reached is not None or url is None:
        return reached
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        if isinstance(err, NotADirectoryError | FileExistsError):
            blocker = _file_in_the_way(path)
            if blocker is not None:
                return UnwritableError(f"{url}: cannot write here ({blocker} is a file, not a folder); choose "
                                       "another --root")
        return None
    if isinstance(err, FileNotFoundError | PermissionError):  # s3fs and gcsfs say so for a missing bucket too
        missing = missing_bucket(url)
        if missing is not None:
            return UnwritableError(missing)
    return None


def _no_file_in_the_way(url: str, path: str) -> None:
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise UnwritableError(f"{url}: cannot write here ({blocker} is a file, not a folder); choose another --root")


def _file_in_the_way(path: str) -> Path | None:
    """The file at `path` or at the nearest of its folders that exists (None where that one is a folder)."""
    here = Path(path).absolute()
    for place in (here, *here.parents):
        try:
            if place.is_dir():
                return None
            if place.exists() or place.is_symlink():
                return place
        except OSError:  # a folder that may not be looked into: the write probe says so
            return None
    return None


# Object stores: the bucket must exist (it is never made) and its endpoint answer.

REACH_TIMEOUT_S = 10.0  # how long a new connection to a storage endpoint may take before it counts as unreachable
ENDPOINT_SETTINGS = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST",
                     "FSSPEC_GCS_ENDPOINT_URL", "FSSPEC_S3", "FSSPEC_GCS")  # where an endpoint may be set


def check_bucket(url: str) -> None:
    """Fail when the endpoint of `url`'s object store cannot be reached, or its bucket does not exist (a bucket
    that exists but may not be looked at passes: the write probe then says whether it takes writes)."""
    missing = missing_bucket(url)
    if missing is not None:
        raise UnwritableError(missing)


def missing_bucket(url: str) -> str | None:
    """What to say when `url` is in a bucket that does not exist, else None (a local path, a bucket that exists
    or that may not be looked at); ServiceError where the endpoint cannot be reached."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return None
    endpoint = storage_endpoint(fs)
    if endpoint is not None:
        _reach(endpoint)
    bucket = path.split("/", 1)[0]
    kinds = protocols(fs)
    try:
        if "s3" in kinds:
            fs.call_s3("head_bucket", Bucket=bucket)
        elif kinds & {"gs", "gcs"}:
            fs.call("GET", "b/{}", bucket, json_out=True)
    except FileNotFoundError:
        scheme = url.split("://", 1)[0]
        return (f"{scheme}://{bucket}: no such bucket (in {url}); create it, or name a bucket that exists: geosoc "
                "never creates one")
    except Exception as err:  # no right to look at the bucket (403), or the service failed: not "missing"
        reached = endpoint_failure(err)
        if reached is not None:
            raise reached from err
    return None


def storage_endpoint(fs: fsspec.AbstractFileSystem) -> str | None:
    """The URL (scheme://host:port) of the service an object-store filesystem talks to, as it resolved it."""
    kinds = protocols(fs)
    if "s3" in kinds:
        return str(fs.connect().meta.endpoint_url)
    if kinds & {"gs", "gcs"}:
        return str(fs.base).removesuffix("/storage/v1/")
    return None


def _reach(endpoint: str) -> None:
    """Open (and close) a connection to the endpoint, unless a proxy stands between: a closed port or an unknown
    host is one line at once, not a minute of the client's retries."""
    import socket
    import urllib.request

    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if not host or urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return
    try:
        with socket.create_connection((host, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=REACH_TIMEOUT_S):
            pass
    except OSError as err:
        raise unreachable(endpoint, err) from err


def endpoint_failure(err: BaseException) -> ServiceError | None:
    """The error for a failure to connect to a storage endpoint anywhere in `err`'s chain (s3fs raises botocore's
    EndpointConnectionError, gcsfs aiohttp's ClientConnectorError), or None."""
    seen: BaseException | None = err
    while seen is not None:
        endpoint = _failed_endpoint(seen)
        if endpoint is not None:
            return unreachable(endpoint, seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _failed_endpoint(err: BaseException) -> str | None:
    names = {kind.__name__ for kind in type(err).__mro__}
    if names & {"EndpointConnectionError", "ConnectTimeoutError"}:  # botocore: the request's URL
        url = urlsplit(str(getattr(err, "kwargs", {}).get("endpoint_url", "")))
        return f"{url.scheme}://{url.hostname}:{url.port}" if url.hostname and url.port else (
            f"{url.scheme}://{url.hostname}" if url.hostname else None)
    if "ClientConnectorError" in names:  # aiohttp: the host it could not connect to
        key = getattr(err, "_conn_key", None)
        host, port, ssl = getattr(err, "host", None), getattr(err, "port", None), getattr(key, "is_ssl", False)
        return f"{'https' if ssl else 'http'}://{host}:{port}" if host else None
    return None


def unreachable(endpoint: str, err: BaseException) -> ServiceError:
    """'cannot reach <endpoint> (set by <setting>): <why>', where the setting is the environment variable (or
    fsspec's configuration) that names the endpoint; its value is never shown beyond the endpoint itself."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    shown = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no user:password@
    setting = _endpoint_setting(parts.hostname or "", parts.port)
    source = f"set by {setting}" if setting else "the service's default endpoint"
    why = _why_unreachable(err)
    fix = f"check {setting} and that the service runs there" if setting else "check the network"
    return ServiceError(f"cannot reach the storage endpoint {shown} ({source}): {why}; {fix}")


def _endpoint_setting(host: str, port: int | None) -> str | None:
    place = f"{host}:{port}" if port else host
    for name in ENDPOINT_SETTINGS:
        if place and place in os.environ.get(name, ""):
            return name
    for protocol, options in fsspec.config.conf.items():
        if place and place in str(options):
            return f"fsspec's configuration of {protocol}"
    return None


def _why_unreachable(err: BaseException) -> str:
    import socket

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, socket.gaierror):
            return "unknown host"
        if isinstance(seen, TimeoutError) or type(seen).__name__ == "ConnectTimeoutError":
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    return "no connection"


@contextmanager
def leaving_no_folders(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    """A block that writes `path` and removes it again: the local folders made for it go at the end too
    (object stores have no folders)."""
    missing = []
    if isinstance(fs, LocalFileSystem):
        folder = Path(path).absolute().parent
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
    try:
        yield
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (something else writes there now) or already gone


def _replace_locally(path: str, write: Callable[[str], Any]) -> None:
    """`write` a temporary file beside `path`, then rename it over `path` (one step on a local disk)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def put_bytes(url: str, data: bytes) -> None:
    """Write `data` at `url` in one step: readers see the old object or the new, never a part.

    Local disks: a temporary file beside it, renamed over it. Object stores: one request, visible when complete.
    """
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        _replace_locally(path, lambda tmp: Path(tmp).write_bytes(data))
    else:
        fs.pipe_file(path, data)


def publish_file(local: str | os.PathLike[str], url: str) -> None:
    """Put a finished local file at `url` in one step, like `put_bytes` (multipart uploads included)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        _replace_locally(path, lambda tmp: shutil.copyfile(local, tmp))
    else:
        fs.put_file(str(local), path)


@contextmanager
def published(url: str) -> Iterator[Path]:
    """A local path to make a file at; when the block ends without an error it is published at `url`."""
    with tempfile.TemporaryDirectory(prefix="geosoc-") as folder:
        path = Path(folder) / url.rstrip("/").rsplit("/", 1)[-1]
        yield path
        publish_file(path, url)


def beside(url: str, kind: str) -> str:
    """A fresh name beside `url` for a tree being written (`partial`) or set aside (`old`)."""
    return f"{url.rstrip('/')}.{kind}-{uuid.uuid4().hex[:8]}"


def tidy_beside(url: str) -> None:
    """Before a tree is written at `url`: what killed runs left beside it is cleared. An old tree set aside
    by a publish killed before its replacement moved in is put back; unfinished writes are deleted."""
    fs, final = filesystem(url)
    parent, _, name = final.rstrip("/").rpartition("/")
    if not parent or not fs.exists(parent):
        return
    leftover = re.compile(rf"{re.escape(name)}\.(partial|old)-[0-9a-f]{{8}}")
    for path in fs.ls(parent, detail=False):
        found = leftover.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
        if found is None:
            continue
        if found.group(1) == "old" and isinstance(fs, LocalFileSystem) and not os.path.exists(final):
            os.replace(path, final)
        else:
            fs.rm(path, recursive=True)


def publish_tree(tmp_url: str, url: str, last: str = "zarr.json") -> None:
    """Move a finished folder (a Zarr store written beside its place) to `url`, replacing what was there.

    Local disks: two renames (old aside, new in), then the old removed. Object stores have no folder rename:
    the old root `last` file goes first (readers then see no store rather than a mix), then the old objects,
    then every new object is copied server-side with the root `last` file last, then the temporary prefix
    is removed.
    """
    fs, tmp = filesystem(tmp_url)
    _, final = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        aside = beside(final, "old")
        if os.path.exists(final):
            os.replace(final, aside)
        os.replace(tmp, final)
        if os.path.exists(aside):
            shutil.rmtree(aside)
        return
    if fs.exists(f"{final}/{last}"):
        fs.rm_file(f"{final}/{last}")
    if fs.exists(final):
        fs.rm(final, recursive=True)
    files = sorted(fs.find(tmp), key=lambda path: path == f"{tmp}/{last}")  # the root metadata last
    for path in files:
        fs.copy(path, final + path[len(tmp):])
    fs.rm(tmp, recursive=True)
