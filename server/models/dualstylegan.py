"""DualStyleGAN (Yang et al., CVPR 2022, "Pastiche Master"): a portrait in the style of an
exemplar, through an intrinsic (content) and an extrinsic (style) path. Inference only.

Parts, named as the official ``DualStyleGAN`` module names them (the checkpoint loader maps the
intrinsic generator's rosinality names onto ours):

* ``generator``: the intrinsic path, a StyleGAN2 (``StyleGAN2Generator``). Its mapping also
  turns every code of the method into W: content and extrinsic codes are z+ [B, L, z_dim],
  mapped layer by layer (``map_codes``), or W+ latents directly.
* ``style``: the structure transform T_s, pixel norm then ``structure_mlp`` fully connected
  layers (lr multiplier 0.01, leaky ReLU), applied to each layer's extrinsic latent.
* ``res``: one module per W+ layer k = 0..L-1 (L = num_ws). Layers k < ``structure_layers``
  (the official ``res_index + 1``: 7 of 18 at 1024, the coarse layers up to 64x64) carry a
  ModRes block; the others a colour transform T_c (a linear layer of W).

Layer k of W+ drives the k-th modulated convolution of the StyleGAN2 (b4.conv1 is 0, b8.conv0
1, b8.conv1 2, ...) and the ToRGB layer that shares its w (b4.torgb 1, b8.torgb 3, ...). With
the content latent c [B, L, C], the extrinsic latent e [B, L, C] and the weight vector
w [B, L] (the paper's 18 weights; structure = the first ``structure_layers``, colour = the
rest):

* structure layer k: the convolution sees c_k; its output x becomes
  x + w_k ModRes_k(x, T_s(e_k)), ModRes_k(x, s) = conv2(AdaIN2(conv(AdaIN(x, s)), s));
  a ToRGB at a structure index sees c_k.
* colour layer k: the convolution (or ToRGB) sees w_k T_c,k(e_k) + (1 - w_k) c_k.
* b4's ToRGB always sees c_1 (the official forward never routes it through the extrinsic
  path).

w = 0 gives the intrinsic StyleGAN2 image exactly. ``forward`` takes W+ latents; the official
``truncation`` (of the content, towards ``truncation_latent`` = 0 in ``style_transfer.py``) is
the caller's: ``truncate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.models.ops import SQRT2, FullyConnectedLayer, bias_act, normalize_2nd_moment, upsample2d
from server.models.stylegan2 import NOISE_MODES, StyleGAN2Config, StyleGAN2Generator


@dataclass(frozen=True)
class DualStyleGANConfig:
    """``generator``: the intrinsic StyleGAN2. ``structure_layers``: W+ layers with a ModRes
    block (official res_index + 1; odd, below num_ws). ``structure_mlp``: depth of T_s (the
    official n_mlp - 6 = 2)."""
    generator: StyleGAN2Config = StyleGAN2Config()
    structure_layers: int = 7
    structure_mlp: int = 2

    def __post_init__(self):
        n, num_ws = self.structure_layers, self.generator.num_ws
        if isinstance(n, bool) or not isinstance(n, int) or n % 2 == 0 or not 0 < n < num_ws:
            raise ValueError(f"structure_layers must be odd and in 1..{num_ws - 1}, got {n!r}")
        if not (isinstance(self.structure_mlp, int) and self.structure_mlp > 0):
            raise ValueError(f"structure_mlp must be a positive int, got {self.structure_mlp!r}")
        if self.generator.z_dim != self.generator.w_dim or self.generator.c_dim:
            raise ValueError("DualStyleGAN maps z+ codes into W layer by layer: it needs an "
                             "unconditional generator with z_dim == w_dim")

    @property
    def num_ws(self) -> int:
        return self.generator.num_ws

    def layer_resolution(self, k: int) -> int:
        """Output resolution of the convolution driven by W+ layer k (4 for k = 0)."""
        return 2 ** (2 + (k + 1) // 2)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_2nd_moment(x)


class EqualConv2d(nn.Module):
    """k x k convolution, stride 1, 'same' padding, no bias, weight scaled by 1/sqrt(fan in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size,
                                                kernel_size]))
        self.gain = 1 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.gain, padding=self.weight.shape[-1] // 2)


class BiasLeakyReLU(nn.Module):
    """x + bias, leaky ReLU 0.2, times sqrt 2 (rosinality's FusedLeakyReLU)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros([channels]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_act(x, self.bias, slope=0.2, gain=SQRT2)


class AdaIN(nn.Module):
    """Instance norm (eps 1e-5, no affine) then gamma * x + beta, [gamma, beta] = style(s)."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.style = nn.Linear(w_dim, 2 * channels)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(s)[:, :, None, None].chunk(2, dim=1)
        return gamma * F.instance_norm(x, eps=1e-5) + beta


class ModRes(nn.Module):
    """Modulative residual block: x [B, C, r, r], s [B, w_dim], weight [B] ->
    x + weight * conv2(AdaIN2(conv(AdaIN(x, s)), s))."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.conv = nn.Sequential(EqualConv2d(channels, channels), BiasLeakyReLU(channels))
        self.conv2 = nn.Sequential(EqualConv2d(channels, channels), BiasLeakyReLU(channels))
        self.norm = AdaIN(channels, w_dim)
        self.norm2 = AdaIN(channels, w_dim)

    def forward(self, x: torch.Tensor, s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.norm2(self.conv(self.norm(x, s)), s))
        return out * weight[:, None, None, None] + x


class DualStyleGAN(nn.Module):
    """See the module notes. ``forward(content, exstyle, weights)`` -> images."""

    def __init__(self, config: DualStyleGANConfig = DualStyleGANConfig()):
        super().__init__()
        self.config = config
        g = config.generator
        self.num_ws, self.w_dim, self.z_dim = g.num_ws, g.w_dim, g.z_dim
        self.img_resolution = g.img_resolution
        self.structure_layers = config.structure_layers
        self.style = nn.Sequential(PixelNorm(), *[
            FullyConnectedLayer(g.w_dim, g.w_dim, "lrelu", lr_multiplier=0.01)
            for _ in range(config.structure_mlp)])
        self.generator = StyleGAN2Generator(g)
        self.res = nn.ModuleList(
            ModRes(g.channels(config.layer_resolution(k)), g.w_dim) if k < self.structure_layers
            else FullyConnectedLayer(g.w_dim, g.w_dim) for k in range(g.num_ws))

    def map_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """z+ codes [B, L, z_dim] -> W+ [B, L, w_dim]: each layer's code through the mapping
        network, without truncation, in the codes' dtype."""
        return map_codes(self.generator.mapping, codes)

    @staticmethod
    def truncate(ws: torch.Tensor, psi: float, centre: torch.Tensor | float = 0.0
                 ) -> torch.Tensor:
        """centre + psi (ws - centre): the official content truncation (centre 0 in
        ``style_transfer.py`` and ``generate.py``)."""
        return centre + psi * (ws - centre) if psi != 1 else ws

    def forward(self, content: torch.Tensor, exstyle: torch.Tensor, weights: torch.Tensor,
                noise_mode: str = "const", fused_modconv: bool | None = None) -> torch.Tensor:
        """content, exstyle: W+ [B, L, w_dim] (exstyle = ``map_codes`` of the exemplar's z+);
        weights [B, L] or [L]. Returns images [B, 3, S, S] in the latents' dtype (float32 or
        float64 with the network's parameters in that dtype), nominally [-1, 1].
        ``noise_mode`` as ``StyleGAN2Generator``; ``fused_modconv`` None picks per-sample
        kernels except for CPU batches (a shared convolution is faster there)."""
        batch, shape = content.shape[0], (self.num_ws, self.w_dim)
        if content.ndim != 3 or content.shape[1:] != shape or exstyle.shape != content.shape:
            raise ValueError(f"content and exstyle must both be [batch, {self.num_ws}, "
                             f"{self.w_dim}], got {list(content.shape)} and "
                             f"{list(exstyle.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        weights = torch.as_tensor(weights, dtype=content.dtype, device=content.device)
        weights = weights.expand(batch, self.num_ws) if weights.ndim == 1 else weights
        if weights.shape != (batch, self.num_ws):
            raise ValueError(f"weights must be [{self.num_ws}] or [batch, {self.num_ws}], "
                             f"got {list(weights.shape)}")
        fused = fused_modconv
        if fused is None:
            fused = not (content.device.type == "cpu" and batch > 1)
        n_s = self.structure_layers
        structure = self.style(exstyle[:, :n_s].reshape(-1, self.w_dim)).reshape(batch, n_s, -1)

        def style_of(k: int) -> torch.Tensor:
            if k < n_s:
                return content[:, k]
            w = weights[:, k, None]
            return w * self.res[k](exstyle[:, k]) + (1 - w) * content[:, k]

        net, k = self.generator.synthesis, 0
        x = img = None
        for res in net.block_resolutions:
            block = getattr(net, f"b{res}")
            if res == 4:
                x = block.const.unsqueeze(0).repeat([batch, 1, 1, 1])
            for layer in ([block.conv1] if res == 4 else [block.conv0, block.conv1]):
                x = layer(x, style_of(k), noise_mode, fused)
                if k < n_s:
                    x = self.res[k](x, structure[:, k], weights[:, k])
                k += 1
            y = block.torgb(x, content[:, k] if res == 4 else style_of(k), fused)
            img = y if img is None else upsample2d(img, block.resample_filter) + y
        return img


def map_codes(mapping, codes: torch.Tensor) -> torch.Tensor:
    """z codes [..., z_dim] -> w [..., w_dim] through a StyleGAN2 ``MappingNetwork``'s layers
    (pixel norm, fully connected layers; no truncation, no broadcast), in the codes' dtype."""
    x = normalize_2nd_moment(codes.reshape(-1, codes.shape[-1]))
    for i in range(mapping.num_layers):
        x = getattr(mapping, f"fc{i}")(x)
    return x.reshape(*codes.shape[:-1], -1)
