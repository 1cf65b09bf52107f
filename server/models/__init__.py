"""The networks, as ``nn.Module``s only (file formats live in ``server.checkpoints``).

* ``stylegan2``, ``stylegan3`` (+ ``ops``): the generators, in our own compact code; their
  ``state_dict`` names and shapes equal the official ``G_ema`` ones (``load_generator``).
* ``rignet``: StyleRig's RigNet and its control vector layout; ``dfr``: the face
  reconstruction network StyleRig trains RigNet through.
* ``diffusionrig`` (+ ``diffusionrig_unet``, ``global_encoder``): DiffusionRig's denoiser and
  appearance encoder, with the official module names.
* ``deca_encoder``: DECA's coarse encoder (photo -> FLAME codes) and DECA's code sizes.
"""

from server.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from server.models.stylegan3 import StyleGAN3Config, StyleGAN3Generator, make_transform, set_transform

__all__ = ["StyleGAN2Config", "StyleGAN2Generator", "StyleGAN3Config", "StyleGAN3Generator",
           "make_transform", "set_transform"]
