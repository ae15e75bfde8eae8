"""A stand-in for Earth Engine's computePixels: serves the synthetic landscape, injects faults, counts calls.

It reads each request the way the real service would: the expression says which variable and which images,
the grid says where. It answers in computePixels' NUMPY_NDARRAY format, with masked pixels filled with the
value xee asked to unmask with, and fails like the service does (HttpError translated by ee.data).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import ee
import httplib2
import numpy as np
from ee import apitestcase
from googleapiclient.errors import HttpError

from geosoc.catalog import IMAGERY_BANDS, LoadedCatalog
from geosoc.grid import Grid
from geosoc.sources import earthengine
from geosoc.sources.ee_fetch import RetryPolicy, describe_request
from geosoc.sources.layers import Layer
from geosoc.sources.synthetic import Landscape

MASK_VALUE = float(np.iinfo(np.int32).max)  # xee's default unmask value
FAST_RETRY = RetryPolicy(max_retries=10, initial_delay=0.001, max_delay=0.01)


def structured(array: np.ndarray) -> np.ndarray:
    """(bands, h, w) -> the structured (h, w) array computePixels returns for NUMPY_NDARRAY."""
    out = np.empty(array.shape[1:], dtype=[(f"b{i}", "<f4") for i in range(array.shape[0])])
    for i in range(array.shape[0]):
        out[f"b{i}"] = array[i]
    return out


def initialize_offline() -> None:
    """ee.Initialize with the algorithm list the earthengine-api wheel ships; no network."""
    ee.Reset()
    ee.data._install_cloud_api_resource = lambda: None
    ee.data.getAlgorithms = apitestcase.GetAlgorithms
    ee.Initialize(None, "", project="geosoc-test")


def bearer_token() -> str:
    """The token Earth Engine's own transport would send now: the credentials ee was initialised with, applied
    to a request as google-auth-httplib2's AuthorizedHttp does (refreshed from their metadata server or STS)."""
    import google_auth_httplib2

    headers: dict[str, str] = {}
    request = google_auth_httplib2.Request(httplib2.Http())
    url = "https://earthengine.googleapis.com/v1/projects/p/image:computePixels"
    credentials = ee.data._get_state().credentials
    assert credentials is not None, "Earth Engine was initialised without credentials"
    credentials.before_request(request, "POST", url, headers)
    return headers["authorization"].removeprefix("Bearer ")


def serve_offline(tokens: list[str]) -> None:
    """ee.Initialize with real credentials but no network: the wheel's algorithm list, and the check call
    (`ee.Number(1).getInfo()`) answered here, after recording the token it would have carried."""
    ee.data._install_cloud_api_resource = lambda: None
    ee.data.getAlgorithms = apitestcase.GetAlgorithms

    def compute_value(obj: Any) -> Any:
        tokens.append(bearer_token())
        return 1

    ee.data.computeValue = compute_value


def http_error(status: int, message: str) -> Exception:
    """The exception ee.data raises for an HTTP error: an EEException whose context is the HttpError."""
    try:
        raise HttpError(httplib2.Response({"status": status}), f'{{"error": {{"message": "{message}"}}}}'.encode())
    except HttpError as error:
        try:
            raise ee.data._translate_cloud_exception(error)
        except ee.EEException as translated:
            return translated


class FakeEarthEngine:
    """computePixels over the synthetic landscape; `failure_rate` of calls fail transiently first."""

    def __init__(self, seed: int, grid: Grid, group: str, variables: list[str], months: list[Any],
                 failure_rate: float = 0.0, bad_variable: str | None = None, latency: float = 0.002,
                 interval_log: str | None = None, tokens: list[str] | None = None) -> None:
        self.landscape, self.grid, self.group = Landscape(seed), grid, group
        self.variables, self.months = variables, months
        self.failure_rate, self.bad_variable, self.latency = failure_rate, bad_variable, latency
        self.interval_log = interval_log  # file where every call appends "start end" (across processes)
        self.tokens = tokens  # where every call records the bearer token it carried (None: not checked)
        self.rng = random.Random(1)
        self.lock = threading.Lock()
        self.calls = self.failures = self.in_flight = self.max_in_flight = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def __call__(self, params: dict[str, Any]) -> np.ndarray:
        with self.lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = self.rng.random() < self.failure_rate
            kind = self.rng.choice(["429", "503", "timeout"])
        started = time.time()
        if self.tokens is not None:
            self.tokens.append(bearer_token())
        try:
            time.sleep(self.latency)
            info = describe_request(params, self.grid)
            if info.variable == self.bad_variable:
                raise http_error(400, f"Image.select: Pattern '{info.variable}' did not match any bands.")
            if fail:
                with self.lock:
                    self.failures += 1
                if kind == "timeout":
                    raise TimeoutError("The read operation timed out")
                raise http_error(int(kind), "Too many concurrent requests" if kind == "429" else "Backend error")
            return structured(self._pixels(info))
        finally:
            with self.lock:
                self.in_flight -= 1
            if self.interval_log:
                with open(self.interval_log, "a") as log:
                    log.write(f"{started} {time.time()}\n")

    def max_overlap(self) -> int:
        """Most calls in flight at once according to the interval log (all processes)."""
        assert self.interval_log
        events = []
        with open(self.interval_log) as log:
            for line in log:
                start, end = map(float, line.split())
                events += [(start, 1), (end, -1)]
        level = peak = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):
            level += step
            peak = max(peak, level)
        return peak

    def _pixels(self, info: Any) -> np.ndarray:
        if self.group == "imagery":  # one band a request, or (stacked) the bands as the images of one variable
            bands = list(self.variables[info.index]) if info.variable == earthengine.STACKED else [info.variable]
            values = self.landscape.imagery(self.grid, info.rows, info.cols, bands)
        else:
            months = self.months[info.index]
            values = self.landscape.climate(self.grid, info.rows, info.cols, months, [info.variable])[:, 0]
        return np.where(np.isnan(values), MASK_VALUE, values).astype(np.float32)


def fake_layers(catalog: LoadedCatalog, failure_rate: float = 0.0, bad_variable: str | None = None,
                tokens: list[str] | None = None, stacked: bool = False,
                ) -> tuple[list[Layer], dict[str, FakeEarthEngine]]:
    """The catalog's two Earth Engine layers, read through xee from fakes of the service (returned too);
    `stacked`: the imagery's bands in one request each (as sampling at points asks)."""
    config = catalog.config
    assert config.climate_grid is not None and config.climate is not None
    bands = list(config.imagery.bands or IMAGERY_BANDS)
    fakes = {
        "imagery": FakeEarthEngine(7, config.imagery_grid, "imagery", bands, [], failure_rate, bad_variable,
                                   tokens=tokens),
        "climate": FakeEarthEngine(7, config.climate_grid, "climate", config.climate.variables,
                                   config.climate.months, failure_rate, tokens=tokens),
    }
    layers = [
        earthengine.earthengine_imagery(catalog, fakes["imagery"], FAST_RETRY, stacked=stacked),
        earthengine.earthengine_climate(catalog, fakes["climate"], FAST_RETRY),
    ]
    return layers, fakes
