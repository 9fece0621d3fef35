"""The segmentation network: a MONAI 3D ``UNet`` built from a :class:`NetworkConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bml_pipeline.segment.config import ModelConfig

if TYPE_CHECKING:
    import torch


def build_network(config: ModelConfig) -> torch.nn.Module:
    """An untrained network: input (N, 1 + prior_classes, D, H, W) normalised intensities (then the coarse
    stage's probabilities, for a fine stage), output (N, C, D, H, W) logits."""
    from monai.networks.nets import UNet

    net = config.network
    return UNet(spatial_dims=3, in_channels=1 + config.prior_classes, out_channels=config.num_classes,
                channels=tuple(net.channels), strides=tuple(net.strides),
                num_res_units=net.num_res_units, norm=net.norm)
