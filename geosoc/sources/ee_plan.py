"""Planning Earth Engine `computePixels` requests: pure functions, no Earth Engine needed.

xee fetches one variable (band) at a time, as tiles of (index, height, width) where `index` runs over the
images of a collection (months, for climate). Each cube chunk window is cut into such tiles starting at the
window's corner, as `xee.ext.EarthEngineBackendArray._tile_indexes` does at the pinned xee version, so the
plan counts the requests a build sends when nothing fails (retries come on top).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from geosoc.grid import Grid

# computePixels limits (https://developers.google.com/earth-engine/reference/rest/v1/projects.image/computePixels)
MAX_REQUEST_BYTES = 48 * 2**20  # counted with one mask byte per pixel and band
MAX_REQUEST_SIDE = 32_768  # pixels per side
MAX_REQUEST_BANDS = 1_024
VALUE_BYTES = 4  # float32
MASK_BYTES = 1
MIN_TILE_SIDE = 64  # below this, shrink the index range instead of the tile


@dataclass(frozen=True)
class TileShape:
    """Request shape: images (bands of the request) x rows x cols."""

    index: int
    height: int
    width: int

    @property
    def nbytes(self) -> int:
        return self.index * self.height * self.width * (VALUE_BYTES + MASK_BYTES)

    def as_xee_chunks(self) -> dict[str, int]:
        return {"index": self.index, "height": self.height, "width": self.width}


@dataclass(frozen=True)
class Request:
    """One computePixels call: a variable, an index range and a pixel window of the layer grid."""

    variable: str
    index: slice
    rows: slice
    cols: slice

    @property
    def shape(self) -> TileShape:
        return TileShape(
            self.index.stop - self.index.start, self.rows.stop - self.rows.start, self.cols.stop - self.cols.start
        )


def within_limits(tile: TileShape) -> bool:
    return (
        tile.nbytes <= MAX_REQUEST_BYTES
        and max(tile.height, tile.width) <= MAX_REQUEST_SIDE
        and tile.index <= MAX_REQUEST_BANDS
    )


def plan_tile(n_index: int, chunk_height: int, chunk_width: int) -> TileShape:
    """The largest request shape within the limits for chunks of this size: halve the longer side down to
    MIN_TILE_SIDE, then the index range."""
    index = min(n_index, MAX_REQUEST_BANDS)
    height, width = min(chunk_height, MAX_REQUEST_SIDE), min(chunk_width, MAX_REQUEST_SIDE)
    while not within_limits(TileShape(index, height, width)):
        if max(height, width) > MIN_TILE_SIDE:
            if height >= width:
                height = -(-height // 2)
            else:
                width = -(-width // 2)
        elif index > 1:
            index = -(-index // 2)
        else:
            raise ValueError(f"no request shape fits the limits for chunks of {chunk_height}x{chunk_width}")
    return TileShape(index, height, width)


def _ranges(start: int, stop: int, step: int) -> Iterator[slice]:
    for begin in range(start, stop, step):
        yield slice(begin, min(begin + step, stop))


def window_requests(
    variables: list[str], n_index: int, rows: slice, cols: slice, tile: TileShape
) -> Iterator[Request]:
    """The requests that fetch one window: every variable, index range and tile, no gap, no overlap."""
    for variable in variables:
        for index in _ranges(0, n_index, tile.index):
            for r in _ranges(rows.start, rows.stop, tile.height):
                for c in _ranges(cols.start, cols.stop, tile.width):
                    yield Request(variable, index, r, c)


def count_requests(grid: Grid, variables: list[str], n_index: int, tile: TileShape) -> int:
    """Requests for a whole layer, without enumerating them (continental grids have many)."""

    def pieces(length: int, chunk: int, step: int) -> int:
        full, rest = divmod(length, chunk)
        return full * -(-chunk // step) + (-(-rest // step) if rest else 0)

    per_index = -(-n_index // tile.index)
    rows = pieces(grid.height, grid.chunks[0], tile.height)
    cols = pieces(grid.width, grid.chunks[1], tile.width)
    return len(variables) * per_index * rows * cols
