"""Position-deterministic lattice fields: the same (x, y) gives the same value whatever window asks.

Values live on lattice nodes (integer multiples of a scale, in CRS units) and are interpolated bilinearly
with a smoothstep. Two evaluation paths give bit-identical results: a regular grid (x as a row, y as a
column) interpolates from a small table of the nodes its pixels touch; scattered points hash their corners directly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

_MIX_X = np.uint64(0x9E3779B97F4A7C15)
_MIX_Y = np.uint64(0xC2B2AE3D27D4EB4F)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) from integer lattice coordinates and a key (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        h = (np.asarray(ix).astype(np.uint64) * _MIX_X) ^ (np.asarray(iy).astype(np.uint64) * _MIX_Y)
        h ^= np.uint64(key & 0xFFFFFFFFFFFFFFFF)
        h ^= h >> np.uint64(30)
        h *= _MIX_1
        h ^= h >> np.uint64(27)
        h *= _MIX_2
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def key_of(*parts: int | str) -> int:
    """A stable 64-bit key from a seed and names, so every field draws independent numbers."""
    value = 0x243F6A8885A308D3
    for part in parts:
        for byte in str(part).encode():
            value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t


def _smooth(frac: np.ndarray) -> np.ndarray:
    return frac * frac * (3.0 - 2.0 * frac)


def _is_grid(x: np.ndarray, y: np.ndarray) -> bool:
    return x.ndim == 2 and y.ndim == 2 and x.shape[0] == 1 and y.shape[1] == 1


def _touched(lower: np.ndarray) -> np.ndarray:
    """Sorted lattice indices that interpolation reads: each pixel's lower node and the one after it."""
    return np.unique(np.concatenate([lower, lower + 1]))


def lattice_interp(x: np.ndarray, y: np.ndarray, scale: float, nodes: NodeFn) -> np.ndarray:
    """Bilinear-smoothstep interpolation of `nodes(ix, iy)` on a lattice of spacing `scale`."""
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    sx, sy = _smooth(gx - ix), _smooth(gy - iy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    if _is_grid(x, y):
        # Only the lattice columns and rows that pixels touch: where the lattice is finer than the pixels (30 m
        # sensor noise on a 1 km grid) a table of every node under the window would take gigabytes.
        node_cols, node_rows = _touched(ix[0]), _touched(iy[:, 0])
        table = nodes(node_cols[None, :], node_rows[:, None])
        cols = np.searchsorted(node_cols, ix[0])  # ix + 1 is the next node touched, at cols + 1
        along_x = _lerp(table[:, cols], table[:, cols + 1], sx)
        rows = np.searchsorted(node_rows, iy[:, 0])
        return _lerp(along_x[rows], along_x[rows + 1], sy)
    low = _lerp(nodes(ix, iy), nodes(ix + 1, iy), sx)
    high = _lerp(nodes(ix, iy + 1), nodes(ix + 1, iy + 1), sx)
    return _lerp(low, high, sy)


def value_noise(x: np.ndarray, y: np.ndarray, scale: float, key: int) -> np.ndarray:
    """Smooth noise in [-1, 1] with features about `scale` CRS units across."""
    return lattice_interp(x, y, scale, lambda ix, iy: hash_uniform(ix, iy, key) * 2.0 - 1.0)


def fbm(x: np.ndarray, y: np.ndarray, scale: float, octaves: int, key: int) -> np.ndarray:
    """Fractal sum of `octaves` noise layers, halving scale and amplitude each time; about [-1, 1]."""
    total = np.zeros(np.broadcast_shapes(x.shape, y.shape))
    weight = 0.0
    for octave in range(octaves):
        amplitude = 0.5**octave
        total += amplitude * value_noise(x, y, scale / 2**octave, key + octave)
        weight += amplitude
    return total / (weight * 0.6)
