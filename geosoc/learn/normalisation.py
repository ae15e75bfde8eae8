"""Input and target scaling: estimated on a training split, stored in every checkpoint, applied on the device."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass
class Normalisation:
    """Input and target scaling, estimated on the training split and stored in every checkpoint."""

    band_mean: list[float] = field(default_factory=list)
    band_std: list[float] = field(default_factory=list)
    climate_mean: list[float] = field(default_factory=list)
    climate_std: list[float] = field(default_factory=list)
    log_target: bool = True
    target_mean: float = 0.0
    target_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        """From a checkpoint's config.json; ValueError naming what is missing or of the wrong kind."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown entries {sorted(unknown)}")
        try:
            norm = cls(**data)
            for name in ("band_mean", "band_std", "climate_mean", "climate_std"):
                setattr(norm, name, [float(v) for v in getattr(norm, name)])
            norm.target_mean, norm.target_std = float(norm.target_mean), float(norm.target_std)
        except (TypeError, ValueError) as err:
            raise ValueError(f"expected lists of numbers and numbers ({err})") from err
        problem = norm._problem()
        if problem is not None:
            raise ValueError(problem)
        return norm

    def _problem(self) -> str | None:
        """What makes read values no scaling (None when nothing does): a damaged one would turn every input or
        prediction into NaN or infinity without an error."""
        if not isinstance(self.log_target, bool):
            return f"'log_target' must be true or false, got {self.log_target!r}"
        for what, mean, std in (("band", self.band_mean, self.band_std), ("climate", self.climate_mean,
                                                                          self.climate_std)):
            if len(mean) != len(std):
                return f"{len(mean)} {what} means but {len(std)} standard deviations"
        values = [*self.band_mean, *self.climate_mean, self.target_mean]
        deviations = [*self.band_std, *self.climate_std, self.target_std]
        if not all(math.isfinite(v) for v in values) or not all(math.isfinite(v) and v > 0 for v in deviations):
            return "means must be finite numbers and standard deviations finite and positive"
        return None

    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs, normalised on the batch's own device: patches (..., band, h, w), whose pixels without
        data stay NaN (the image encoder fills them and may mark them), and climate series (..., time, variable),
        NaN-filled."""
        out = {}
        if "patch" in batch and self.band_mean:
            mean, std = _statistics(tuple(self.band_mean), tuple(self.band_std), (-1, 1, 1), batch["patch"].device)
            out["patch"] = (batch["patch"] - mean) / std
        if "climate" in batch and self.climate_mean:
            mean, std = _statistics(tuple(self.climate_mean), tuple(self.climate_std), (-1,), batch["climate"].device)
            out["climate"] = torch.nan_to_num((batch["climate"] - mean) / std)
        return out

    def inputs(self, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """`apply` for host arrays: moved to `device` first."""
        return self.apply({k: torch.from_numpy(np.asarray(v, np.float32)).to(device) for k, v in batch.items()
                           if k in ("patch", "climate")})

    def encode_target_tensor(self, target: torch.Tensor) -> torch.Tensor:
        values = torch.log1p(target) if self.log_target else target
        return (values - self.target_mean) / self.target_std

    def encode_target(self, target: np.ndarray) -> np.ndarray:
        values = np.log1p(target) if self.log_target else target
        return ((values - self.target_mean) / self.target_std).astype(np.float32)

    def decode_target(self, z: ArrayT) -> ArrayT:
        """Model outputs back to target units: NumPy arrays (evaluation) or tensors on any device (maps)."""
        values = z * self.target_std + self.target_mean
        if not self.log_target:
            return values
        return torch.expm1(values) if isinstance(values, torch.Tensor) else np.expm1(values)


@lru_cache(maxsize=16)
def _statistics(mean: tuple[float, ...], std: tuple[float, ...], shape: tuple[int, ...],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation statistics as tensors on a device, made once (not a host-to-device copy per batch)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=device).view(shape))
