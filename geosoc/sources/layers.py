"""Where covariates come from. Each source yields `Layer`s: a cube group on a grid plus a window reader.

A layer is lazy: nothing is read until a window is asked for, so a continental grid costs nothing to
describe. The cube builder writes layers chunk by chunk; `Layer.lazy()` gives the same data as dask-backed
xarray for interactive use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import dask.array as da
import numpy as np
import rioxarray  # noqa: F401 - registers the .rio accessor
import xarray as xr

from geosoc.grid import Grid


class WindowReader(Protocol):
    """Reads one window of a layer: array (*leading axes, rows, cols), float32, NaN where no data.

    Readers may also offer `prepare()` (checked before a build writes anything, e.g. credentials) and
    `plan()` (the remote requests a whole build sends: `requests`, `request_bytes`, `concurrency`,
    `seconds_per_request`; shown by `--dry-run`).
    """

    def read(self, rows: slice, cols: slice) -> np.ndarray: ...


@dataclass(frozen=True)
class Layer:
    """One cube group (`imagery`, `climate` or `embeddings`): leading axes (band, or time + variable) then (y, x)."""

    group: str
    grid: Grid
    axes: dict[str, list[Any]]
    reader: WindowReader
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> tuple[str, ...]:
        return (*self.axes, "y", "x")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*(len(v) for v in self.axes.values()), *self.grid.shape)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (*(len(v) for v in self.axes.values()), *self.grid.chunks)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    def lazy(self) -> xr.DataArray:
        """Dask-backed view whose chunks are the grid's chunk windows; computing one reads one window."""
        chunks = (*((len(v),) for v in self.axes.values()), *self.grid.dask_chunks())
        data = da.from_array(_WindowArray(self), chunks=chunks, lock=False, name=False, meta=np.array((), "f4"))
        coords: dict[str, Any] = {name: values for name, values in self.axes.items()}
        coords.update(y=self.grid.y, x=self.grid.x)
        out = xr.DataArray(data, dims=self.dims, coords=coords, name=self.group, attrs=dict(self.attrs))
        return out.rio.write_crs(self.grid.crs).rio.write_transform(self.grid.transform)


class _WindowArray:
    """Array-like over a layer for `dask.array.from_array`: indexing reads only the window asked for."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.shape = layer.shape
        self.ndim = len(self.shape)
        self.dtype = np.dtype("float32")

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        *leading, rows, cols = key
        rows = slice(*rows.indices(self.shape[-2]))
        cols = slice(*cols.indices(self.shape[-1]))
        return self.layer.reader.read(rows, cols)[tuple(leading)]
