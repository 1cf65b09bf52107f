"""DiffusionRig (Ding et al., CVPR 2023): the denoising UNet plus the global latent encoder.

The official module holds exactly two children, ``denoisingUNet`` and ``encoder``; this class
has the same two, so its state dict has the same 712 names and shapes (see ``UNetConfig`` for
the architecture; ``server.checkpoints.diffusionrig`` reads the official files).
"""

from __future__ import annotations

import torch
from torch import nn

from server.models.diffusionrig_unet import DiffusionRigUNet, UNetConfig
from server.models.global_encoder import GlobalEncoder


class DiffusionRig(nn.Module):
    """``denoisingUNet`` predicts eps from (x_t, t, buffers, z); ``encoder`` maps a photo to z."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        self.denoisingUNet = DiffusionRigUNet(config)
        self.encoder = GlobalEncoder(config.latent_dim)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [N, 3, H, W] in [-1, 1] (the aligned photo) -> z [N, latent_dim]."""
        return self.encoder(image)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor | None,
                z: torch.Tensor) -> torch.Tensor:
        """eps [N, 3, S, S]; arguments as ``DiffusionRigUNet.forward``."""
        return self.denoisingUNet(x_t, t, buffers, z)
