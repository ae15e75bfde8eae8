"""Model size from data size: the sizes a catalog's `model:` section leaves unset, chosen from the number of
samples the network learns from.

The paper's network (ViT 768 wide x 12, climate Transformer 512 wide x 6 layers, 105 M parameters) was made for
continental samples (100,000+ pretraining locations, on GPUs). On a survey of a few thousand sites its climate
Transformer costs 70-75 times the small one's per sample on a CPU, and wider networks scored lower there (600
sites: pooled R² 0.362 small, 0.340 and 0.335 at 128 and 256 wide): see the README (Model and training). So:

- fewer than PAPER_FROM samples: SMALL (the demo's and Edgeroi's size: 64 wide, 2 deep, 4 heads, embedding 32);
- PAPER_FROM or more: PAPER.

The count is that of the SampleSet the network is first trained on (pretraining: every sample of it; fine-tuning
from scratch: its labelled ones), so every fold and member of an evaluation gets the same network. Fine-tuning
from pretrained encoders keeps their architecture, and a checkpoint stores the one it was built with.
"""

from __future__ import annotations

from geosoc.catalog import ClimateEncoderConfig, ImageEncoderConfig, ModelConfig
from geosoc.errors import CatalogError
from geosoc.learn.models import NetworkConfig

PAPER_FROM = 50_000
SMALL = ModelConfig(image=ImageEncoderConfig(dim=64, depth=2, heads=4),
                    climate=ClimateEncoderConfig(dim=64, layers=2, heads=4, feedforward=128), embedding=32)
PAPER = ModelConfig(image=ImageEncoderConfig(dim=768, depth=12, heads=12),
                    climate=ClimateEncoderConfig(dim=512, layers=6, heads=8, feedforward=2048), embedding=128)


def size_for(samples: int) -> ModelConfig:
    """The sizes for a network learning from `samples` samples."""
    return PAPER if samples >= PAPER_FROM else SMALL


def resolve_model(model: ModelConfig, samples: int, like: ModelConfig | None = None) -> ModelConfig:
    """`model` with every size it leaves unset taken from `size_for(samples)` (or from `like`, the sizes of a
    network already built); the sizes it sets stay."""
    default = like or size_for(samples)

    def merged(section: ImageEncoderConfig | ClimateEncoderConfig, fallback: ImageEncoderConfig | ClimateEncoderConfig,
               name: str) -> dict[str, int]:
        values = {k: v if v is not None else getattr(fallback, k) for k, v in section.model_dump().items()}
        if values["dim"] % values["heads"]:
            raise CatalogError(f"model.{name}: dim {values['dim']} is not a multiple of heads {values['heads']} "
                               "(set both, or neither for sizes from the data size)")
        return values

    return model.model_copy(update={
        "image": ImageEncoderConfig(**merged(model.image, default.image, "image")),
        "climate": ClimateEncoderConfig(**merged(model.climate, default.climate, "climate")),
        "embedding": model.embedding if model.embedding is not None else default.embedding,
    })


def sizes_of(network: NetworkConfig) -> ModelConfig:
    """The sizes of a network already built (a checkpoint's config), as a `model:` section."""
    return ModelConfig(
        image=ImageEncoderConfig(patch=network.image_patch, dim=network.image_dim, depth=network.image_depth,
                                 heads=network.image_heads),
        climate=ClimateEncoderConfig(dim=network.climate_dim, layers=network.climate_layers,
                                     heads=network.climate_heads, feedforward=network.climate_feedforward),
        embedding=network.embedding, quantiles=list(network.quantiles))
