"""Image branch: a timm Vision Transformer over multispectral patches, projected to the shared embedding."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from geosoc.learn.baselines import WINDOW

CENTRE_STATISTICS = 2  # per band: the centre pixel and the mean of the window around it


class ImageEncoder(nn.Module):
    """ViT over (batch, bands, size, size) patches; built from the class, so no hub weights are ever fetched.

    Pixels without data (NaN: a patch that reaches beyond the rasters, a gap in the imagery) enter as 0, and with
    `nodata_mask` the ViT also sees where they are: one more input channel, 1 where any band has no data, so
    a patch at the edge of the data is told apart from one whose values are near the mean."""

    def __init__(self, bands: int, size: int, patch: int, dim: int, depth: int, heads: int, embedding: int,
                 nodata_mask: bool = False):
        super().__init__()
        self.nodata_mask = nodata_mask
        self.vit = VisionTransformer(
            img_size=size, patch_size=patch, in_chans=bands + nodata_mask, num_classes=0, embed_dim=dim, depth=depth,
            num_heads=heads, global_pool="avg", class_token=False, dynamic_img_size=False,
        )
        self.project = nn.Linear(dim, embedding)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        filled = torch.nan_to_num(patches)
        if self.nodata_mask:
            missing = torch.isnan(patches).any(dim=-3, keepdim=True).to(filled.dtype)
            filled = torch.cat([filled, missing], dim=-3)
        return self.project(self.vit(filled))


def centre_statistics(patches: torch.Tensor) -> torch.Tensor:
    """(batch, 2 x bands): each band's centre pixel, then the mean of the WINDOW x WINDOW px around it: what the
    trees see (`baselines.covariate_features`), handed to the head beside the ViT's tokens so that the network
    need not learn where the centre lies among its tokens from a few hundred labels. No data counts as 0 (the
    band's mean after normalisation)."""
    c, h = patches.shape[-1] // 2, WINDOW // 2
    window = patches[..., c - h : c + h + 1, c - h : c + h + 1].flatten(-2)
    return torch.nan_to_num(torch.cat([patches[..., c, c], torch.nanmean(window, dim=-1)], dim=-1))
