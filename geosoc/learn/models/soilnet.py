"""SSL-SoilNet: either or both branches, a shared embedding, and a head predicting SOC quantiles."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from geosoc.learn.models.climate import ClimateEncoder
from geosoc.learn.models.image import CENTRE_STATISTICS, ImageEncoder, centre_statistics


@dataclass
class NetworkConfig:
    """Everything needed to rebuild the network, flat as a checkpoint's config.json stores it: the catalog's
    `model` section (architecture) resolved against the data it is trained on (bands, variables, patch, months)."""

    bands: list[str] = field(default_factory=list)  # empty: no image branch
    variables: list[str] = field(default_factory=list)  # empty: no climate branch
    patch_size: int = 64
    months: int = 61
    image_patch: int = 8
    image_dim: int = 768
    image_depth: int = 12
    image_heads: int = 12
    climate_dim: int = 512
    climate_layers: int = 6
    climate_heads: int = 8
    climate_feedforward: int = 2048
    embedding: int = 128
    head_hidden: int = 128
    quantiles: list[float] = field(default_factory=lambda: [0.05, 0.5, 0.95])
    nodata_mask: bool = False  # the ViT sees which pixels have no data (absent from checkpoints made before it)
    centre_pixel: bool = False  # the head also reads the centre pixel and its window mean (absent before it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def head_inputs(config: NetworkConfig) -> int:
    """The width of what the head reads (see `SoilNet.features`)."""
    branches = int(bool(config.bands)) + int(bool(config.variables))
    return branches * config.embedding + CENTRE_STATISTICS * len(config.bands) * config.centre_pixel


class SoilNet(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        if not config.bands and not config.variables:
            raise ValueError("a model needs image bands, climate variables, or both")
        self.config = config
        self.image = (
            ImageEncoder(len(config.bands), config.patch_size, config.image_patch, config.image_dim,
                         config.image_depth, config.image_heads, config.embedding, config.nodata_mask)
            if config.bands else None
        )
        self.climate = (
            ClimateEncoder(len(config.variables), config.months, config.climate_dim, config.climate_layers,
                           config.climate_heads, config.climate_feedforward, config.embedding)
            if config.variables else None
        )
        self.head = nn.Sequential(
            nn.Linear(head_inputs(config), config.head_hidden), nn.ReLU(),
            nn.Linear(config.head_hidden, len(config.quantiles)),
        )

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each branch's embedding; a batch may carry the climate branch's output already ("climate_embedding":
        maps run it once per climate cell, which thousands of map cells share)."""
        out = {}
        if self.image is not None:
            out["image"] = self.image(batch["patch"])
        if self.climate is not None:
            out["climate"] = batch["climate_embedding"] if "climate_embedding" in batch else self.climate(
                batch["climate"])
        return out

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the head reads, concatenated: the embeddings (image, then climate) and, with `centre_pixel`, the
        centre pixel's statistics. Also the space of the AOA."""
        embeddings = self.embed(batch)
        parts = [embeddings[k] for k in ("image", "climate") if k in embeddings]
        if self.config.centre_pixel and self.image is not None:
            parts.append(centre_statistics(batch["patch"]))
        return torch.cat(parts, dim=1)

    def quantiles_of(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, quantiles) in the normalised target space, sorted so they never cross."""
        return torch.sort(self.head(features), dim=1).values

    def forward(self, batch: dict[str, torch.Tensor], output: str = "quantiles") -> Any:
        """Quantiles, or (`output="embeddings"`) each branch's embedding for contrastive pretraining: both go
        through `forward`, which is what DistributedDataParallel synchronises."""
        if output == "embeddings":
            return self.embed(batch)
        return self.quantiles_of(self.features(batch))
