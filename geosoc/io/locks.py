"""One writer at a time per artefact: a lock object beside it (`<artefact>.lock`), created exclusively.

Taking the lock is also the check that the artefact's folder takes writes: a refusal there is the usual
"cannot write here" error, before any work.

Creation is atomic on every backend geosoc writes to: `O_EXCL` on a local disk, a conditional put on S3
(`If-None-Match: *`) and GCS (`ifGenerationMatch=0`). The holder renews the lock while it works; a lock
left by a killed run is taken over once its lease has run out, or at once when it names a process of this
machine that no longer runs. A second writer meanwhile stops with a clear error instead of mixing its
writes with the first's.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from geosoc.errors import LockedError
from geosoc.io.storage import filesystem, leaving_no_folders, put_bytes, unwritable

LEASE_S = 120.0  # a lock not renewed for this long belongs to a run that is gone
RENEW_S = 20.0


def lock_url(url: str) -> str:
    return url.rstrip("/") + ".lock"


@contextmanager
def exclusive(url: str, what: str) -> Iterator[None]:
    """Hold the lock of the artefact at `url` for the block; `what` names the work in the refusal."""
    lock = lock_url(url)
    fs, path = filesystem(lock)
    token = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "work": what}
    with leaving_no_folders(fs, path):  # a run refused later (bad input) leaves no empty folder
        _acquire(fs, path, token, url)
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(fs, path, lock, token, stop), name="geosoc-lock",
                                   daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            if (_holder(fs, path) or {}).get("owner") == token["owner"]:
                fs.rm_file(path)


def _create(fs: Any, path: str, data: bytes) -> None:
    """Create `path` holding `data`; FileExistsError when it is there already."""
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError as err:  # a file where the folder should be: not "the lock is taken"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder) from err
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
    else:
        fs.pipe_file(path, data, mode="create")


def _stamp(token: dict[str, Any]) -> bytes:
    return json.dumps({**token, "renewed": time.time()}).encode()


def _acquire(fs: Any, path: str, token: dict[str, Any], url: str) -> None:
    for _ in range(3):
        try:
            _create(fs, path, _stamp(token))
            return
        except FileExistsError:
            pass
        except Exception as err:  # any backend error but "already there" means the folder refuses writes
            raise unwritable(url.rstrip("/").rpartition("/")[0] or ".", err) from err
        holder = _holder(fs, path)
        if holder is None:  # perhaps created but not yet written: look again before taking it over
            time.sleep(0.5)
            holder = _holder(fs, path)
        if holder is not None and not _gone(holder):
            since = time.strftime("%H:%M:%S", time.localtime(holder.get("renewed", 0)))
            raise LockedError(
                f"{url}: another run ({holder.get('work', '?')}, pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, alive at {since}) is writing it; wait for it to end. A run that was "
                f"killed frees it within {LEASE_S:.0f} s (or delete {path})")
        if fs.exists(path):
            fs.rm_file(path)  # unreadable or gone: take it over
    raise LockedError(f"{url}: could not take its lock {path}; try again")


def _holder(fs: Any, path: str) -> dict[str, Any] | None:
    """The lock's content, or None when it cannot be read (gone, or not a geosoc lock)."""
    try:
        holder = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _gone(holder: dict[str, Any]) -> bool:
    """Whether the run that holds a lock has ended without releasing it."""
    if time.time() - float(holder.get("renewed", 0)) > LEASE_S:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _renew(fs: Any, path: str, lock: str, token: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        try:
            if (_holder(fs, path) or {}).get("owner") != token["owner"]:
                return  # taken over (this run was thought gone): nothing of ours to renew
            put_bytes(lock, _stamp(token))  # in one step: a reader never finds it empty
        except OSError:
            continue  # a passing storage error: the next renewal tries again
