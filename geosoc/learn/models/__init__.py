"""SSL-SoilNet: image and climate encoders, their shared embedding, the regression head, the losses."""

from geosoc.learn.models.soilnet import NetworkConfig, SoilNet

__all__ = ["NetworkConfig", "SoilNet"]
