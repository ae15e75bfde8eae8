"""NT-Xent for contrastive pretraining and the pinball loss for quantile regression."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float, gather: bool = False) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over the 2N embeddings of a batch (SimCLR).

    Row i of `a` and row i of `b` are the two views of one location (image and climate, or two
    augmentations); every other embedding of the batch is a negative. With `gather` under torch.distributed,
    the embeddings of every worker's batch (same size on each) are negatives too, gathered with their
    gradient: the mean of the workers' losses is then the loss of one process over all their batches, and
    DistributedDataParallel's averaged gradient is that loss's gradient.
    """
    rank, world = 0, 1
    a, b = a.float(), b.float()
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        a, b = torch.cat(all_gather(a)), torch.cat(all_gather(b))  # gradients flow back to each row's owner
    z = F.normalize(torch.cat([a, b]), dim=1)
    total, n = a.shape[0], a.shape[0] // world
    own = torch.arange(rank * n, (rank + 1) * n, device=z.device)
    rows = torch.cat([own, own + total])  # this worker's embeddings among all 2 x total
    similarity = z[rows] @ z.T / temperature
    similarity[torch.arange(2 * n, device=z.device), rows] = float("-inf")  # not itself
    positives = torch.cat([own + total, own])
    return F.cross_entropy(similarity, positives)


def pinball(prediction: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss of (batch, q) predictions of the given quantiles against (batch,) targets."""
    error = target[:, None] - prediction
    return torch.maximum(quantiles * error, (quantiles - 1) * error).mean()
