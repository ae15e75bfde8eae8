"""Where tensors go: a device a user names is checked against what torch sees on this machine (one error naming
what is there, before any work), and the one default: a CUDA device when the machine has one, else the CPU.
Also the memory a step's sizes are checked against."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from geosoc.errors import InputError

# Where a cgroup (a container, a Kubernetes pod) caps this process's memory: v2, then v1.
CGROUP_MEMORY_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """`device` if given and present on this machine, else "cuda" when available, else "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InputError(f"--device {device!r}: not a device name torch knows; this machine has "
                         f"{', '.join(available_devices())}") from error
    if chosen.type == "cpu" or (chosen.type == "mps" and torch.backends.mps.is_available()):
        return chosen
    if chosen.type == "cuda":
        count = cuda_devices()
        if count == 0:
            raise InputError(f"--device {device}: torch sees no CUDA device on this machine (no GPU, no driver, or a "
                             f"CPU-only torch); this machine has {', '.join(available_devices())}")
        if chosen.index is not None and chosen.index >= count:
            raise InputError(f"--device {device}: torch sees {count} CUDA device(s); this machine has "
                             f"{', '.join(available_devices())}")
        return chosen
    raise InputError(f"--device {device}: geosoc runs on cpu, cuda or mps, and this machine has "
                     f"{', '.join(available_devices())}")


def cuda_devices() -> int:
    """The CUDA devices torch can use here (0 without a GPU, a driver or a CUDA build of torch)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def available_devices() -> list[str]:
    """The device names `resolve_device` accepts on this machine."""
    count = cuda_devices()
    cuda = ["cuda", *(f"cuda:{i}" for i in range(count))] if count else []
    return ["cpu", *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def gpu_share_problem(gpus: float) -> str | None:
    """What is wrong with a number of GPUs per Ray worker or actor (None when nothing is): Ray takes a share of
    one GPU, or whole GPUs."""
    if not (math.isfinite(gpus) and gpus >= 0 and (gpus <= 1 or float(gpus).is_integer())):
        return f"must be a share of one GPU (0 to 1) or a whole number of GPUs, got {gpus}"
    return None


def host_memory_bytes() -> int:
    """This machine's physical memory, or less where a cgroup limits this process to less."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_MEMORY_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def precision(device: torch.device) -> torch.autocast:
    """The one numeric path of every forward pass: bf16 autocast on CUDA, fp32 elsewhere. Training, validation,
    calibration, the AOA reference and maps all run under it, so the interval that was calibrated on a device type
    is the interval that is mapped on it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
