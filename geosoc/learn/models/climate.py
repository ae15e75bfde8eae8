"""Climate branch: a Transformer over the monthly series (linear embedding, sinusoidal positions)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed positional encoding of Vaswani et al."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class ClimateEncoder(nn.Module):
    """(batch, months, variables) -> embedding; mean over months after the Transformer layers."""

    def __init__(self, variables: int, months: int, dim: int, layers: int, heads: int, feedforward: int,
                 embedding: int):
        super().__init__()
        self.embed = nn.Linear(variables, dim)
        self.register_buffer("positions", sinusoidal_positions(months, dim), persistent=False)
        layer = nn.TransformerEncoderLayer(dim, heads, feedforward, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.project = nn.Linear(dim, embedding)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(series) + self.positions)
        return self.project(hidden.mean(dim=1))
