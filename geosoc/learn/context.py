"""Spatial context as tree-model features, off unless a model names it (`rf+xy`, `qrf+nn`, ...).

- `xy`: the coordinates and oblique coordinates (Møller et al. 2020): x cos a + y sin a for ANGLES angles, so that
  axis-aligned splits can follow a gradient in any direction.
- `nn`: the nearest labelled samples (RFSI, Sekulić et al. 2020): the observed log1p(SOC) of the NEAREST nearest
  samples of the training part and the distance to each. A training sample's own value is left out (its
  neighbours are the others); a held-out sample's and a map cell's neighbours are the training samples.

Both are what users reach for, and both are what spatial cross-validation is for: a forest that learns "SOC is
what the nearest sample says" on training samples whose neighbours lie metres away meets held-out blocks whose
nearest samples lie kilometres away. They are evaluated as models of their own, never on by default.
"""

from __future__ import annotations

import numpy as np

CONTEXTS = ("xy", "nn")
ANGLES = 6  # oblique coordinates at 0, 30, ..., 150 degrees
NEAREST = 5  # neighbours whose values and distances the `nn` features hold


def names(kind: str) -> list[str]:
    """The feature names a context adds."""
    if kind == "xy":
        return [f"oblique_{round(180 * a / ANGLES)}" for a in range(ANGLES)]
    if kind == "nn":
        return [f"nn{i + 1}_{what}" for i in range(NEAREST) for what in ("log1p_soc", "distance")]
    raise ValueError(f"unknown spatial context {kind!r}; one of {', '.join(CONTEXTS)}")


def features(kind: str, train_xy: np.ndarray, train_y: np.ndarray, xy: np.ndarray,
             training: bool = False) -> np.ndarray:
    """The context features (rows of `xy`, columns `names(kind)`) given the labelled training samples;
    `training`: `xy` are those training samples themselves, each then without its own value."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if kind == "xy":
        angles = np.pi * np.arange(ANGLES) / ANGLES
        return (xy[:, :1] * np.cos(angles) + xy[:, 1:] * np.sin(angles)).astype(np.float32)
    if kind != "nn":
        names(kind)  # raises, naming the contexts
    from scipy.spatial import cKDTree

    train_xy = np.asarray(train_xy, np.float64).reshape(-1, 2)
    value = np.log1p(np.maximum(np.asarray(train_y, np.float64), 0))
    k = min(NEAREST + int(training), len(train_xy))
    distance, index = cKDTree(train_xy).query(xy, k=k)
    distance, index = distance.reshape(len(xy), k), index.reshape(len(xy), k)
    if training:  # each sample without itself (found by index: another sample may share its place)
        own = index == np.arange(len(xy))[:, None]
        own[~own.any(axis=1), -1] = True
        keep = ~own
        distance, index = distance[keep].reshape(len(xy), k - 1), index[keep].reshape(len(xy), k - 1)
    out = np.full((len(xy), NEAREST, 2), np.nan, dtype=np.float32)
    out[:, : index.shape[1], 0] = value[index]
    out[:, : index.shape[1], 1] = distance
    return out.reshape(len(xy), 2 * NEAREST)


def tables(kind: str | None, table: np.ndarray, xy: np.ndarray, target: np.ndarray,
           held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tree model's (training, held-out) feature tables: the rows of `table` not `held` and those `held`, each
    with the context features `kind` adds (none when None), learnt from the training rows only."""
    if kind is None:
        return table[~held], table[held]
    train_xy, train_y = xy[~held], target[~held]
    return (np.concatenate([table[~held], features(kind, train_xy, train_y, train_xy, training=True)], axis=1),
            np.concatenate([table[held], features(kind, train_xy, train_y, xy[held])], axis=1))
