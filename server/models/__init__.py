"""Generator networks in our own compact code, tensor-compatible with the official checkpoints.

``StyleGAN2Generator`` / ``StyleGAN3Generator`` take a frozen config dataclass; their
``state_dict`` names and shapes equal the official ``G_ema`` ones. Load files with
``server.checkpoints.stylegan.load_generator``.
"""

from server.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from server.models.stylegan3 import StyleGAN3Config, StyleGAN3Generator, make_transform, set_transform

__all__ = ["StyleGAN2Config", "StyleGAN2Generator", "StyleGAN3Config", "StyleGAN3Generator",
           "make_transform", "set_transform"]
