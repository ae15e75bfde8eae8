"""What the workers of one training run agree on: sums over all of them, and rank 0's decisions.

Every rank must take the same path through the loop (same epochs, same stop, same "nothing left to train"),
or one leaves the DistributedDataParallel collectives and Ray's report barrier while the others wait for it.
A value each rank computes for itself (a validation loss from bf16 kernels, which are not deterministic across
devices) may differ in the last bits, so decisions are made from rank 0's values, sent to all.
With one worker (or no process group) every function is the identity.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Context(Protocol):
    """What these functions need of a loop's `training.Context`: how many workers, and this one's device."""

    world: int
    device: torch.device


def _several(ctx: Context) -> bool:
    return ctx.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def summed(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """`value` summed over all ranks (in place, and returned)."""
    if _several(ctx):
        torch.distributed.all_reduce(value)
    return value


def from_rank0(values: list[float], ctx: Context) -> list[float]:
    """Rank 0's `values` on every rank (each rank passes its own list of the same length)."""
    if not _several(ctx):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()


def gathered(rows: torch.Tensor, sizes: list[int], ctx: Context) -> torch.Tensor:
    """Every rank's `rows` (rank r holds sizes[r] of them, all shaped alike after the first axis), concatenated
    in rank order on every rank."""
    if not _several(ctx):
        return rows
    longest = max(sizes)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])
