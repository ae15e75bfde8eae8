"""One writer at a time per artefact: a lock object beside it (`<artefact>.lock`), created exclusively.

Taking the lock is also the check that the artefact's folder takes writes: a refusal there is the usual
"cannot write here" error, before any work; so is a file where the artefact (always a folder) goes.

Creation is atomic on every backend geosoc writes to: `O_EXCL` on a local disk, a conditional put on S3
(`If-None-Match: *`) and GCS (`ifGenerationMatch=0`). The holder renews the lock while it works; a lock
left by a killed run is taken over once its lease has run out, or at once when it names a process of this
machine that no longer runs. A second writer meanwhile stops with a clear error instead of mixing its
writes with the first's.

Every later change of the lock (a takeover, a renewal, the release) is a compare-and-swap on the lock as it
was read, so two runs that both judge a lock dead cannot both take it: S3 replaces and deletes only
`If-Match: <ETag>`, GCS only `ifGenerationMatch=<generation>`, and a local disk compares the file's bytes and
writes holding a kernel lock (`lockf`) on a guard file beside it, which the kernel frees if its process dies
(on a filesystem without locks, the guard file made exclusively).

A renewal that fails is retried while the lease lasts; a run whose lock was taken over, or that could not
renew it in time, ends with one `LockedError` (and `Lease.check()` raises it earlier for a caller that asks).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from geosoc.errors import LockedError, UnwritableError, first_line
from geosoc.io.lock_stores import Seen, Store, remove, store_for, swap
from geosoc.io.storage import filesystem, leaving_no_folders, unwritable

LEASE_S = 120.0  # a lock not renewed for this long belongs to a run that is gone
RENEW_S = 20.0
RETRY_S = 1.0  # the first wait after a failed renewal; doubled each time, up to RENEW_S, within the lease

log = logging.getLogger(__name__)


def lock_url(url: str) -> str:
    return url.rstrip("/") + ".lock"


class Lease:
    """A held lock, as its run sees it: `check()` raises once the lease may be lost, so a step about to publish
    can stop first; `exclusive` raises it at the end of its block in any case."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lost = threading.Event()
        self.reason = ""

    def lose(self, reason: str) -> None:
        """Called by the renewer: one error line now (the run may go on for a while), the error at the end."""
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
            log.error("%s", self._message())

    def check(self) -> None:
        if self.lost.is_set():
            raise LockedError(self._message())

    def _message(self) -> str:
        return (f"{self.url}: lost its lock ({self.reason}); another run may have written it meanwhile, "
                f"so run this again")


@contextmanager
def exclusive(url: str, what: str) -> Iterator[Lease]:
    """Hold the lock of the artefact at `url` for the block; `what` names the work in the refusal. The block
    gets the `Lease`; a lease lost meanwhile is a LockedError when the block ends. Every locked artefact is a
    folder (a Zarr store, a checkpoint, results): a file in its place is refused before the lock is taken."""
    fs, path = filesystem(lock_url(url))
    if fs.isfile(path.removesuffix(".lock")):
        raise UnwritableError(f"{url}: a file is in the way ({what} writes a folder there); move or remove it, or "
                              "choose another --root")
    store = store_for(fs, path)
    token = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "work": what}
    with leaving_no_folders(fs, path):  # a run refused later (bad input) leaves no empty folder
        since = _acquire(store, token, url)
        lease = Lease(url)
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(store, token, since, lease, stop), name="geosoc-lock",
                                   daemon=True)
        renewer.start()
        try:
            yield lease
        finally:
            stop.set()
            renewer.join()
            _release(store, token, url)
    lease.check()  # reached only when the block ended without an error of its own


# Taking, renewing and releasing the lock.


def _stamp(token: dict[str, Any]) -> bytes:
    return json.dumps({**token, "renewed": time.time()}).encode()


def _holder(seen: Seen) -> dict[str, Any] | None:
    """The lock's content, or None when it is not a geosoc lock."""
    try:
        holder = json.loads(seen.data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _acquire(store: Store, token: dict[str, Any], url: str) -> float:
    """Take the lock (create it, or take over one whose run is gone): when its lease starts."""
    for _ in range(3):
        mine = _stamp(token)
        try:
            if _create_or_take_over(store, token, mine, url):
                return float(json.loads(mine)["renewed"])
        except LockedError:
            raise
        except Exception as err:  # any backend error but "already there" means the folder refuses writes
            raise unwritable(url.rstrip("/").rpartition("/")[0] or ".", err) from err
    raise LockedError(f"{url}: could not take its lock {lock_url(url)}; try again")


def _create_or_take_over(store: Store, token: dict[str, Any], mine: bytes, url: str) -> bool:
    try:
        store.create(mine)
        return True
    except FileExistsError:
        return _take_over(store, token, mine, url)


def _take_over(store: Store, token: dict[str, Any], mine: bytes, url: str) -> bool:
    """Replace a lock whose run is gone with `mine`, only if it is still the lock judged gone: of the runs
    that judged the same lock gone, one takes it. False when another run changed or released it first."""
    seen = store.read()
    if seen is None:
        return False  # released meanwhile: create it again
    holder = _holder(seen)
    if holder is not None and holder.get("owner") == token["owner"]:
        return True  # this run's create was made, though its reply was lost
    if holder is not None and not _gone(holder):
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("renewed", 0)))
        raise LockedError(
            f"{url}: another run ({holder.get('work', '?')}, pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, alive at {since}) is writing it; wait for it to end. A run that was "
            f"killed frees it within {LEASE_S:.0f} s (or delete {lock_url(url)})")
    return swap(store, seen, mine)  # not a geosoc lock, or its run is gone


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


def _renew(store: Store, token: dict[str, Any], renewed: float, lease: Lease, stop: threading.Event) -> None:
    """Renew the lock (last renewed at `renewed`) every RENEW_S until `stop`. Any failure may mean the lease is
    being lost: it is retried, sooner than the next renewal, until the lease would run out; then, or once
    another run holds the lock, the lease is lost and the run told."""
    wait = RENEW_S
    while not stop.wait(wait):
        stamp = _stamp(token)
        try:
            ours = _renew_once(store, token, stamp)
        except Exception as err:  # gcsfs's HttpError is no OSError: whatever it is, the lease may be at stake
            left = renewed + LEASE_S - time.time()
            if left <= 0:
                lease.lose(f"not renewed for {LEASE_S:g} s: {type(err).__name__}: {first_line(err)}")
                return
            wait = min(RETRY_S if wait >= RENEW_S else 2 * wait, RENEW_S, left)
            continue
        if not ours:
            lease.lose("another run took it over")
            return
        renewed, wait = json.loads(stamp)["renewed"], RENEW_S


def _renew_once(store: Store, token: dict[str, Any], stamp: bytes) -> bool:
    """One renewal: False when the lock is no longer this run's (only this run writes its owner token)."""
    seen = store.read()
    if seen is None or (_holder(seen) or {}).get("owner") != token["owner"]:
        return False
    return swap(store, seen, stamp)


def _release(store: Store, token: dict[str, Any], url: str) -> None:
    """Delete the lock if it is still this run's. A release that fails is no failure of the run's work: the
    next run takes the lock over once its lease has run out (at once on this machine)."""
    try:
        seen = store.read()
        if seen is not None and (_holder(seen) or {}).get("owner") == token["owner"]:
            remove(store, seen)
    except Exception as err:
        log.warning("%s: could not delete its lock (%s: %s); the next run takes it over once its lease has run out",
                    url, type(err).__name__, first_line(err))
