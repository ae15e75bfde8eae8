"""Image branch: a timm Vision Transformer over multispectral patches, projected to the shared embedding."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ImageEncoder(nn.Module):
    """ViT over (batch, bands, size, size) patches; built from the class, so no hub weights are ever fetched."""

    def __init__(self, bands: int, size: int, patch: int, dim: int, depth: int, heads: int, embedding: int):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=size, patch_size=patch, in_chans=bands, num_classes=0, embed_dim=dim, depth=depth,
            num_heads=heads, global_pool="avg", class_token=False, dynamic_img_size=False,
        )
        self.project = nn.Linear(dim, embedding)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.project(self.vit(patches))
