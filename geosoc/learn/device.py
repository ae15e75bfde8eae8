"""The one default for where tensors go: a CUDA device when the machine has one, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """`device` if given, else "cuda" when available, else "cpu"."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def precision(device: torch.device) -> torch.autocast:
    """The one numeric path of every forward pass: bf16 autocast on CUDA, fp32 elsewhere. Training, validation,
    calibration, the AOA reference and maps all run under it, so the interval that was calibrated on a device type
    is the interval that is mapped on it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
