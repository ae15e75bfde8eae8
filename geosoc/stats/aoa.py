"""Area of applicability (Meyer & Pebesma 2021, as R's CAST computes it), in the model's embedding space.

The dissimilarity index (DI) of a location is its distance to the nearest training sample divided by the mean
distance between training samples, in a standardised feature space. The threshold is the upper whisker of the
training samples' own cross-validated DI (distance to the nearest sample of *another* fold): the largest
training DI not above the 75th percentile + 1.5 IQR. A location is inside the AOA when its DI is at most that.

The feature space is the fine-tuned network's embedding (what its regression head reads), standardised per
dimension, unweighted. CAST weights raw covariates by variable importance; here the covariates are whole
64 x 64 x 14 patches and 61-month series that the network has already reduced to the features it predicts
from, and the head's input is exactly what decides whether the model has seen something similar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

_ARRAYS = (("embeddings", np.float32), ("folds", np.int64), ("mean", np.float32), ("std", np.float32))
MEAN_DISTANCE_SAMPLES = 4000  # pairs for the mean training distance are taken among at most this many samples
_CHUNK = 256  # rows per distance block: a block of _CHUNK x training samples stays in a CPU's cache as it is
# computed, clamped, rooted and searched (2048 spilled to memory between those passes: ~1.3x slower on a CPU)
_DIRECT = 25  # torch.cdist's own rule: with this few rows on both sides it takes differences, not a product


@dataclass
class Reference:
    """The training samples' standardised embeddings and what the DI and its threshold need."""

    embeddings: np.ndarray  # (n, d), standardised
    folds: np.ndarray  # (n,)
    mean: np.ndarray  # (d,) of the raw embeddings
    std: np.ndarray
    mean_distance: float
    training_di: np.ndarray
    threshold: float

    def to_bytes(self) -> bytes:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
                   for name in ("embeddings", "folds", "mean", "std", "training_di")}
        meta = {"mean_distance": repr(self.mean_distance), "threshold": repr(self.threshold)}
        return save_tensors(tensors, metadata={"geosoc_aoa": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Reference:
        """What `to_bytes` wrote; ValueError saying what is wrong with anything else (a damaged or foreign file)."""
        try:
            tensors = {k: v.numpy() for k, v in load_tensors(data).items()}
            header_len = int.from_bytes(data[:8], "little")  # safetensors: 8-byte length, then a JSON header
            meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["geosoc_aoa"])
            embeddings, folds, mean, std = (np.asarray(tensors[name], dtype) for name, dtype in _ARRAYS)
            reference = cls(embeddings, folds, mean, std, float(meta["mean_distance"]),
                            np.asarray(tensors["training_di"], np.float32), float(meta["threshold"]))
        except Exception as err:  # the parse of the file's bytes alone: safetensors, torch and json raise several kinds
            raise ValueError(f"{type(err).__name__}: {err}") from err
        problem = reference._problem()
        if problem is not None:
            raise ValueError(problem)
        return reference

    def _problem(self) -> str | None:
        """What makes read arrays no reference (None when nothing does): DIs from it would be NaN or meaningless."""
        n, d = self.embeddings.shape if self.embeddings.ndim == 2 else (0, 0)
        if n < 1 or d < 1:
            return f"'embeddings' must be samples x features, got shape {self.embeddings.shape}"
        shapes = {"folds": (n,), "mean": (d,), "std": (d,), "training_di": (n,)}
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                return f"'{name}' has shape {getattr(self, name).shape}, expected {shape}"
        if not all(np.isfinite(getattr(self, name)).all() for name in ("embeddings", "mean", "std", "training_di")):
            return "its arrays hold NaN or infinite values"
        if (self.std <= 0).any() or not self.mean_distance > 0 or not np.isfinite([self.mean_distance,
                                                                                  self.threshold]).all():
            return "standard deviations and the mean distance must be positive, the threshold finite"
        return None


def _nearest(queries: torch.Tensor, reference: torch.Tensor,
             query_groups: torch.Tensor | None = None, reference_groups: torch.Tensor | None = None,
             padded: torch.Tensor | None = None) -> torch.Tensor:
    """Distance from each query row to its nearest reference row, in blocks; rows of the same group skipped.

    The nearest row is found with the fast matrix-product distance, then its distance recomputed directly:
    the matrix form loses precision near zero, exactly where training samples sit. `padded`: the reference as
    `_padded` makes it, when the caller keeps it (a map scores every window against the same reference)."""
    out = []
    if padded is None and len(reference) > _DIRECT:
        padded = _padded(reference)
    for start in range(0, len(queries), _CHUNK):
        chunk = queries[start : start + _CHUNK]
        block = _distances(chunk, padded) if padded is not None else torch.cdist(chunk, reference)
        if query_groups is not None and reference_groups is not None:
            same = query_groups[start : start + _CHUNK, None] == reference_groups[None, :]
            block = block.masked_fill(same, float("inf"))
        nearest = reference[block.argmin(dim=1)]
        out.append(torch.linalg.vector_norm(chunk - nearest, dim=1))
    return torch.cat(out) if out else torch.empty(0)


def _padded(reference: torch.Tensor) -> torch.Tensor:
    """(features + 2, rows): the reference side of torch.cdist's matrix-product form, [x, 1, |x|^2], transposed."""
    norm = reference.pow(2).sum(-1, keepdim=True)
    return torch.cat([reference, torch.ones_like(norm), norm], -1).mT


def _distances(queries: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """torch.cdist(queries, reference) for a reference of more than _DIRECT rows, by the very operations it runs
    there (ATen's _euclidean_dist: so the same numbers), with the reference's side made once (`_padded`)."""
    norm = queries.pow(2).sum(-1, keepdim=True)
    return torch.cat([queries.mul(-2), norm, torch.ones_like(norm)], -1).matmul(padded).clamp_min_(0).sqrt_()


def fit(embeddings: np.ndarray, folds: np.ndarray, seed: int = 0) -> Reference:
    """Reference of the training samples: standardisation, mean distance, cross-validated DI, threshold."""
    raw = np.asarray(embeddings, dtype=np.float64)
    if len(raw) < 2:
        raise ValueError(f"the area of applicability needs at least 2 training samples, got {len(raw)}")
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    scaled = torch.from_numpy((raw - mean) / std)
    pick = np.random.default_rng(seed).permutation(len(raw))[:MEAN_DISTANCE_SAMPLES]
    sub = scaled[torch.from_numpy(pick)]
    pairwise = torch.cdist(sub, sub)
    n = len(sub)
    mean_distance = float(pairwise.sum() / (n * (n - 1)))  # the diagonal is zero; mean over pairs i != j
    folds = np.asarray(folds, dtype=np.int64)
    if len(np.unique(folds)) > 1:  # CV: nearest sample of another fold
        groups = torch.from_numpy(folds)
    else:  # one fold: nearest other sample
        groups = torch.arange(len(raw))
    nearest = _nearest(scaled, scaled, query_groups=groups, reference_groups=groups)
    training_di = (nearest / mean_distance).numpy()
    q25, q75 = np.percentile(training_di, [25, 75])
    whisker = q75 + 1.5 * (q75 - q25)
    threshold = float(training_di[training_di <= whisker].max())
    return Reference(scaled.numpy().astype(np.float32), folds, mean.astype(np.float32), std.astype(np.float32),
                     mean_distance, training_di.astype(np.float32), threshold)


class Scorer:
    """DI of new embeddings against a reference, on the device where the embeddings are."""

    def __init__(self, reference: Reference, device: torch.device) -> None:
        self.reference = reference
        self.points = torch.from_numpy(reference.embeddings).to(device, torch.float32)
        self.mean = torch.from_numpy(reference.mean).to(device, torch.float32)
        self.std = torch.from_numpy(reference.std).to(device, torch.float32)
        self.padded = _padded(self.points) if len(self.points) > _DIRECT else None

    def di(self, embeddings: torch.Tensor) -> torch.Tensor:
        scaled = (embeddings.float() - self.mean) / self.std
        return _nearest(scaled, self.points, padded=self.padded) / self.reference.mean_distance

    def inside(self, di: torch.Tensor) -> torch.Tensor:
        return di <= self.reference.threshold
