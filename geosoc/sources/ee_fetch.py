"""The network seam for Earth Engine pixels: one throttle for the whole build, retries, clear failures.

`PixelFetcher` is what xee calls to get pixels (its `pixels_getter`: `fetcher[params]`). It wraps a `fetch`
function: `ee.data.computePixels` in production, a synthetic stand-in with injected faults in tests.
- A throttle bounds the requests in flight across every thread of the process and, under dask.distributed,
  across every worker of the cluster (a `distributed.Semaphore` shared by name).
- 429, 5xx, timeouts and dropped connections are retried with exponential backoff and full jitter.
- Anything else (400: a bad expression or band) fails at once, naming the request that failed.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geosoc.errors import ServiceError, first_line
from geosoc.grid import Grid

Fetch = Callable[[dict[str, Any]], np.ndarray]

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class EarthEngineRequestError(ServiceError):
    """A request Earth Engine refused, or that kept failing after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    initial_delay: float = 1.0
    max_delay: float = 64.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_delay, initial * 2**attempt)]."""
        return rng.uniform(0.0, min(self.max_delay, self.initial_delay * 2**attempt))


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind an error: ee wraps googleapiclient's HttpError in an EEException."""
    seen: BaseException | None = error
    while seen is not None:
        status = getattr(getattr(seen, "resp", None), "status", None) or getattr(seen, "status_code", None)
        if status is not None:
            return int(status)
        seen = seen.__cause__ or seen.__context__
    return None


def is_transient(error: BaseException) -> bool:
    status = http_status(error)
    if status is not None:
        return status in RETRY_STATUS
    return isinstance(error, (TimeoutError, socket.timeout, ConnectionError))


_semaphores: dict[tuple[str, int, bool], Any] = {}
_semaphores_lock = threading.Lock()


@dataclass(frozen=True)
class Throttle:
    """At most `limit` requests in flight for every fetcher sharing `name`, in this process or cluster."""

    limit: int
    name: str = "geosoc-earthengine"

    def semaphore(self) -> Any:
        """The shared semaphore: call it from a task's own thread (where dask.distributed finds its worker)."""
        try:
            from distributed import Semaphore, get_worker

            get_worker()
            clustered = True
        except (ImportError, ValueError):
            clustered = False
        key = (self.name, self.limit, clustered)
        with _semaphores_lock:
            if key not in _semaphores:
                _semaphores[key] = (
                    Semaphore(max_leases=self.limit, name=self.name)
                    if clustered
                    else threading.BoundedSemaphore(self.limit)
                )
            return _semaphores[key]



@contextmanager
def _held(semaphore: Any) -> Iterator[None]:
    semaphore.acquire()
    try:
        yield
    finally:
        semaphore.release()


@dataclass
class PixelFetcher:
    """xee's `pixels_getter` with geosoc's throttle and retry policy; describes failures in grid terms."""

    grid: Grid
    semaphore: Any  # from Throttle.semaphore(): bounds requests in flight across the build
    retry: RetryPolicy = RetryPolicy()
    fetch: Fetch | None = None
    sleep: Callable[[float], None] = time.sleep
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __getitem__(self, params: dict[str, Any]) -> np.ndarray:
        # A loop of our own, not tenacity or xee's retry: a back-off must give its throttle slot back (the slot is
        # cluster-wide), errors are classified by the HTTP status ee hides in a cause, and the tests inject the
        # clock and the jitter's generator.
        fetch = self.fetch or _compute_pixels
        for attempt in range(self.retry.max_retries + 1):
            try:
                with _held(self.semaphore):
                    return fetch(params)
            except Exception as error:  # classified just below
                if not is_transient(error):
                    raise EarthEngineRequestError(
                        f"Earth Engine refused {describe_request(params, self.grid)}: {_reason(error)}"
                    ) from error
                if attempt == self.retry.max_retries:
                    raise EarthEngineRequestError(
                        f"Earth Engine kept failing for {describe_request(params, self.grid)} after "
                        f"{attempt + 1} attempts: {_reason(error)}; re-run the build to resume"
                    ) from error
            self.sleep(self.retry.delay(attempt, self._rng))
        raise AssertionError("unreachable")


def _compute_pixels(params: dict[str, Any]) -> np.ndarray:
    import ee

    return ee.data.computePixels(params)


def _reason(error: BaseException) -> str:
    status = http_status(error)
    text = first_line(error)
    return f"HTTP {status}: {text}" if status else text


@dataclass(frozen=True)
class RequestInfo:
    """What a computePixels request asks for, read back from its expression and grid."""

    variable: str | None
    index: slice
    rows: slice
    cols: slice

    def __str__(self) -> str:
        what = f"variable {self.variable!r}" if self.variable else "an image"
        return (
            f"the request for {what}, images {self.index.start}..{self.index.stop - 1}, "
            f"rows {self.rows.start}:{self.rows.stop}, cols {self.cols.start}:{self.cols.stop}"
        )


def describe_request(params: dict[str, Any], grid: Grid) -> RequestInfo:
    """Which variable, image range and pixel window of `grid` a request built by xee asks for."""
    import ee

    graph = ee.serializer.encode(params["expression"], for_cloud_api=True)
    values = graph.get("values", {})

    def resolve(node: Any) -> Any:
        while isinstance(node, dict) and "valueReference" in node:
            node = values[node["valueReference"]]
        return node

    def constant(node: Any) -> Any:
        node = resolve(node)
        if "arrayValue" in node:
            return [constant(v) for v in node["arrayValue"]["values"]]
        return node.get("constantValue")

    variable, offset, count = None, 0, 1
    for node in _walk(values, resolve):
        call = node.get("functionInvocationValue")
        if not call:
            continue
        name, args = call["functionName"], call["arguments"]
        if name == "Image.addBands" and "names" in args:
            variable = (constant(args["names"]) or [None])[0]
        elif name == "Collection.toList":
            count = int(constant(args["count"]))
            offset = int(constant(args.get("offset", {"constantValue": 0})) or 0)
    g = params["grid"]
    col0 = round((g["affineTransform"]["translateX"] - grid.x0) / grid.resolution)
    row0 = round((grid.y0 - g["affineTransform"]["translateY"]) / grid.resolution)
    dims = g["dimensions"]
    return RequestInfo(
        variable,
        slice(offset, offset + count),
        slice(row0, row0 + dims["height"]),
        slice(col0, col0 + dims["width"]),
    )


def _walk(values: dict[str, Any], resolve: Callable[[Any], Any]) -> Any:
    """Every dict node of a serialised graph, following value references once."""
    stack = list(values.values())
    seen: set[int] = set()
    while stack:
        node = resolve(stack.pop())
        if isinstance(node, dict):
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)

