"""A fine-tuned network as an ensemble of K members: the same settings and validation blocks, seeds seed .. seed +
K - 1 (other starting weights, batches and dropout), their calibrated quantiles averaged. One CQR offset, fitted
on the shared validation blocks for that average and written into every member, calibrates the ensemble as one.

One network's skill swings with its seed (R² by 0.1-0.2 on a small survey); the average of K members' quantiles
(Vincentization) swings much less. Member 0 is the checkpoint itself (`models/finetune`) and names how many
members there are; member i > 0 lives beside it (`models/finetune-m1`, ...), a checkpoint of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geosoc.errors import IncompatibleError
from geosoc.learn import checkpoint
from geosoc.learn.models import SoilNet
from geosoc.learn.normalisation import Normalisation
from geosoc.stats.calibration import interval

MEMBERS = "members"  # member 0's metadata: how many members the ensemble has


def member_url(url: str, member: int) -> str:
    """Where member `member` of the ensemble at `url` lives."""
    return url if member == 0 else f"{url.rstrip('/')}-m{member}"


def member_urls(url: str, meta: dict[str, Any]) -> list[str]:
    """Every member of the ensemble whose member 0 (at `url`) has metadata `meta`."""
    return [member_url(url, i) for i in range(int(meta.get(MEMBERS, 1)))]


@dataclass
class Member:
    """One network of the ensemble on a device, with what turns its outputs into calibrated SOC."""

    model: SoilNet
    norm: Normalisation
    offset: float

    def decoded_interval(self, z: np.ndarray, offset: float | np.ndarray | None = None) -> tuple[Any, Any, Any]:
        """(lower, median, upper) in the target's units from the network's normalised quantiles `z`, widened by
        the member's calibrated offset, or by `offset` (one, or one per sample) while that is being fitted."""
        bounds = interval(z, self.model.config.quantiles, self.offset if offset is None else offset)
        lower, median, upper = (self.norm.decode_target(v) for v in bounds)
        return lower, median, upper


def _load_member(url: str, device: str | torch.device) -> tuple[Member, dict[str, Any]]:
    model, meta = checkpoint.load_model(url, device)
    return Member(model, checkpoint.normalisation(url, meta), checkpoint.offset_of(meta)), meta


def load_members(url: str, device: str | torch.device = "cpu") -> tuple[list[Member], dict[str, Any]]:
    """Every member of the ensemble at `url` (one for a single network), and member 0's metadata. Members must
    share member 0's architecture: their quantiles are averaged one by one."""
    first, meta = _load_member(url, device)
    members = [first]
    for other_url in member_urls(url, meta)[1:]:
        other, _ = _load_member(other_url, device)
        if other.model.config.to_dict() != first.model.config.to_dict():
            raise IncompatibleError(f"{other_url}: this ensemble member's config.json differs from {url}'s")
        members.append(other)
    return members, meta


def mean_interval(parts: list[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """The members' (lower, median, upper), each already calibrated, averaged quantile by quantile (NumPy arrays
    or torch tensors alike)."""
    if len(parts) == 1:
        return parts[0]
    return tuple(sum(values) / len(parts) for values in zip(*parts))


def spread(values: list[float]) -> float:
    """The sample standard deviation of a figure over members (NaN for one member)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
