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

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store

from geosoc.errors import DamagedError, InputError, NotFoundError, UnwritableError, first_line, missing_extra
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
        raise NotFoundError(f"{url}: {missing}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedError(damaged_metadata(url, err)) from err


def damaged_metadata(url: str, err: Exception) -> str:
    """The error for a Zarr store whose metadata cannot be read (a hand-edited or truncated zarr.json)."""
    reason = first_line(err)
    return f"{url}: its Zarr metadata is damaged ({reason}); remove the store and write it again"


def check_writable(url: str) -> None:
    """Fail before any work if `url` cannot take writes (missing bucket, read-only folder, no credentials).

    Never creates a bucket: a typo in a bucket name must not make a new bucket in the user's account.
    """
    fs, path = filesystem(url)
    probe = f"{path.rstrip('/')}/.geosoc-write-test-{uuid.uuid4().hex}"
    try:
        with leaving_no_folders(fs, probe):  # the probe leaves nothing behind: not even the folders it needed
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except Exception as err:  # any backend error means the same thing here
        raise unwritable(url, err) from err


def unwritable(url: str, err: Exception) -> UnwritableError:
    """The error for a place that refused a write (missing bucket, read-only folder, a file in the way)."""
    reason = getattr(err, "strerror", None) or type(err).__name__
    return UnwritableError(f"{url}: cannot write here ({reason}); choose another --root or fix its permissions")


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
