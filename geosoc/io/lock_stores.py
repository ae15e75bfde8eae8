"""A lock object's compare-and-swap on each backend: one small object, read whole, changed only if it is still as
it was read. S3 replaces and deletes only `If-Match: <ETag>`, GCS only `ifGenerationMatch=<generation>`, and a
local disk compares the file's bytes and writes holding a kernel lock (`lockf`) on a guard file beside it, which
the kernel frees if its process dies (on a filesystem without locks, the guard file made exclusively)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from geosoc.io.storage import put_bytes


@dataclass(frozen=True)
class Seen:
    """The lock as read: its bytes, and the version of them that a conditional write names."""

    data: bytes
    version: bytes | str  # local disk: the bytes themselves; S3: the ETag; GCS: the generation


class Changed(Exception):
    """The lock is no longer as it was read."""


class Store(Protocol):
    def create(self, data: bytes) -> None:
        """Create the lock holding `data`; FileExistsError when it is there already."""

    def read(self) -> Seen | None:
        """The lock now, or None when there is none."""

    def swap(self, seen: Seen, data: bytes) -> None:
        """Replace the lock with `data` only if it is still `seen`; raises otherwise."""

    def remove(self, seen: Seen) -> None:
        """Delete the lock only if it is still `seen`; raises otherwise."""


def store_for(fs: Any, path: str) -> Store:
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if "s3" in protocols:
        return _S3Store(fs, path)
    if protocols & {"gs", "gcs"}:
        return _GcsStore(fs, path)
    return _OtherStore(fs, path)


class _LocalStore:
    """A lock file on a local disk. Every change is made holding the guard, so comparing the bytes and then
    writing is one step for every process; reads need no guard (a reader sees the old file or the new)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, data: bytes) -> None:
        folder = os.path.dirname(self.path) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError as err:  # a file where the folder should be: not "the lock is taken"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder) from err
        with _guarded(self.path):  # written whole before another process compares it
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)

    def read(self) -> Seen | None:
        data = self._bytes()
        return None if data is None else Seen(data, data)

    def swap(self, seen: Seen, data: bytes) -> None:
        with _guarded(self.path):
            self._expect(seen)
            put_bytes(self.path, data)  # a temporary file renamed over the lock

    def remove(self, seen: Seen) -> None:
        with _guarded(self.path):
            self._expect(seen)
            os.remove(self.path)

    def _bytes(self) -> bytes | None:
        try:
            with open(self.path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def _expect(self, seen: Seen) -> None:
        if self._bytes() != seen.data:
            raise Changed(self.path)


@contextmanager
def _guarded(path: str) -> Iterator[None]:
    """Hold the guard of the lock at `path` (`<path>.guard`) for one change of it.

    The guard file goes at the end, while still held: a process that waited on it then finds that the name
    no longer leads to the file it locked, and starts over on the one now there."""
    guard = path + ".guard"
    descriptor = _hold(guard)
    try:
        yield
    finally:
        try:
            os.remove(guard)
        finally:
            os.close(descriptor)


NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}  # e.g. NFS `nolock`, Lustre `noflock`
GUARD_STALE_S = 10.0  # a guard is held for a read and a write: one this old was left by a process that died


def _hold(guard: str) -> int:
    """An open descriptor of the guard file, held: `lockf` on it, which the kernel frees when its process dies.
    A filesystem without locks has the file itself, made exclusively, as the guard (a leftover one goes after
    GUARD_STALE_S)."""
    while True:
        try:
            descriptor, made = os.open(guard, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                descriptor, made = os.open(guard, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed meanwhile by the process that held it
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(descriptor), os.stat(guard)):
                return descriptor
        except FileNotFoundError:
            pass  # removed by the process that held it: start over
        except OSError as err:
            if err.errno not in NO_LOCKS:
                os.close(descriptor)
                raise
            if made:
                return descriptor
            _clear_if_stale(guard)
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)


def _clear_if_stale(guard: str) -> None:
    """Where there are no locks: remove a guard left by a process that died holding it, else wait a moment."""
    try:
        if time.time() - os.stat(guard).st_mtime > GUARD_STALE_S:
            os.remove(guard)
            return
    except FileNotFoundError:
        return
    time.sleep(0.001)


class _BucketObject:
    """A lock object in a bucket: created by fsspec's exclusive put (a conditional request on S3 and GCS)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def create(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data, mode="create")


class _S3Store(_BucketObject):
    """A lock object on S3: created `If-None-Match: *`, replaced and deleted `If-Match: <its ETag>`. Its
    bytes and ETag are read in one request, so the ETag is that of the bytes judged."""

    def read(self) -> Seen | None:
        try:
            data, etag = fsspec.asyn.sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None
        return Seen(data, etag)

    async def _get(self) -> tuple[bytes, str]:
        reply = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        try:
            return await reply["Body"].read(), reply["ETag"]
        finally:
            reply["Body"].close()

    def swap(self, seen: Seen, data: bytes) -> None:
        try:
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfMatch=seen.version)
        finally:
            self.fs.invalidate_cache(self.path)

    def remove(self, seen: Seen) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=seen.version)
        finally:
            self.fs.invalidate_cache(self.path)


class _GcsStore(_BucketObject):
    """A lock object on GCS: created `ifGenerationMatch=0`, replaced and deleted `ifGenerationMatch=<its
    generation>`. Its bytes and generation are read in one request (the download's `X-Goog-Generation`)."""

    def read(self) -> Seen | None:
        try:
            headers, data = self.fs.call("GET", self.fs.url(self.path))
        except FileNotFoundError:
            return None
        generation = headers.get("X-Goog-Generation")
        if not generation:
            raise OSError(f"{self.path}: the download named no generation")
        return Seen(data, generation)

    def swap(self, seen: Seen, data: bytes) -> None:
        """A multipart upload, as gcsfs makes one, with the generation precondition gcsfs cannot pass."""
        meta = json.dumps({"name": self.key}).encode()
        body = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n" + meta
                + b"\n--==0==\nContent-Type: application/octet-stream\n\n" + data + b"\n--==0==--")
        try:
            self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o",
                         uploadType="multipart", headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                         data=body, json_out=True, ifGenerationMatch=seen.version)
        finally:
            self.fs.invalidate_cache(self.path)

    def remove(self, seen: Seen) -> None:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=seen.version)
        finally:
            self.fs.invalidate_cache(self.path)


_IN_PROCESS = threading.Lock()


class _OtherStore:
    """Any other fsspec store (memory://): compare and write under a lock of this process, which is exclusive
    for a store that lives in it; between processes it is only as safe as the store's own writes."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> None:
        with _IN_PROCESS:
            self.fs.pipe_file(self.path, data, mode="create")

    def read(self) -> Seen | None:
        try:
            data = bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        return Seen(data, data)

    def swap(self, seen: Seen, data: bytes) -> None:
        with _IN_PROCESS:
            self._expect(seen)
            self.fs.pipe_file(self.path, data)

    def remove(self, seen: Seen) -> None:
        with _IN_PROCESS:
            self._expect(seen)
            self.fs.rm_file(self.path)

    def _expect(self, seen: Seen) -> None:
        if self.read() != seen:
            raise Changed(self.path)


def swap(store: Store, seen: Seen, data: bytes) -> bool:
    """Write `data` over the lock if it is still `seen`: whether it was written. A write that failed may still
    have been made (a reply lost, then a retry refused), so a failure is settled by reading the lock again."""
    try:
        store.swap(seen, data)
        return True
    except Changed:
        return False
    except Exception:
        now = store.read()
        if now is not None and now.data == data:
            return True
        if now is not None and now.version == seen.version:
            raise  # not written, and nothing else was either: the caller may try again
        return False


def remove(store: Store, seen: Seen) -> None:
    """Delete the lock if it is still `seen`; another's lock in its place stays."""
    try:
        store.remove(seen)
    except Changed:
        return
    except Exception:
        now = store.read()
        if now is not None and now.version == seen.version:
            raise


