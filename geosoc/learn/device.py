"""The one default for where tensors go: a CUDA device when the machine has one, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """`device` if given, else "cuda" when available, else "cpu"."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
