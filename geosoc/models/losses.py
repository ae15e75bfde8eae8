"""NT-Xent for contrastive pretraining and the pinball loss for quantile regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over the 2N embeddings of a batch (SimCLR).

    Row i of `a` and row i of `b` are the two views of one location (image and climate, or two
    augmentations); every other embedding of the batch is a negative.
    """
    z = F.normalize(torch.cat([a, b]), dim=1)
    similarity = z @ z.T / temperature
    n = a.shape[0]
    similarity.fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(a.device)
    return F.cross_entropy(similarity, positives)


def pinball(prediction: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss of (batch, q) predictions of the given quantiles against (batch,) targets."""
    error = target[:, None] - prediction
    return torch.maximum(quantiles * error, (quantiles - 1) * error).mean()
