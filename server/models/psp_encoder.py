"""pSp's GradualStyleEncoder (Richardson et al. 2021) as DualStyleGAN trains it to embed
aligned faces (and exemplars) into StyleGAN2's Z+: image -> one code per W+ layer.

Names follow the official ``encoder.*`` tensors of ``checkpoint/encoder.pt``:

* ``input_layer``: 3x3 conv (no bias), batch norm, PReLU -> ``stem`` channels.
* ``body``: IR-SE units (ArcFace's ResNet-50 variant) in four stages of (depth, units),
  official ((64, 3), (128, 4), (256, 14), (512, 3)); each stage's first unit has stride 2.
  A unit is ``res_layer`` = BN, 3x3 conv, PReLU, 3x3 conv (the stride), BN, squeeze-excite
  (reduction 16), plus ``shortcut_layer`` = a 1x1 strided conv and BN where the depth
  changes, else subsampling.
* Feature pyramid: c1, c2, c3 = the outputs of stages 2, 3, 4 (1/4, 1/8, 1/16 of the input);
  p2 = up(c3) + ``latlayer1``(c2), p1 = up(p2) + ``latlayer2``(c1), up = bilinear with
  aligned corners.
* ``styles``: ``n_styles`` heads; heads 0-2 read c3, 3-6 read p2, the rest p1. A head is
  stride-2 3x3 convs (with bias) each followed by a leaky ReLU of slope 0.01, down to 1x1
  (4, 5, 6 of them for a 256 input), then an equalised linear layer.

Input: [B, input_channels, 256, 256] in [-1, 1] (an FFHQ-aligned face, average-pooled to 256).
Output: codes [B, n_styles, style_dim]. DualStyleGAN treats them as z+ (each mapped by the
generator's mapping network); a checkpoint trained with ``start_from_latent_avg`` also adds
its ``latent_avg`` (the loader's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.models.ops import FullyConnectedLayer

COARSE, MIDDLE = 3, 7      # heads below COARSE read c3, below MIDDLE p2, the rest p1


@dataclass(frozen=True)
class PSPEncoderConfig:
    input_channels: int = 3
    stem: int = 64
    stages: tuple[tuple[int, int], ...] = ((64, 3), (128, 4), (256, 14), (512, 3))
    n_styles: int = 18
    style_dim: int = 512
    head_convs: tuple[int, int, int] = (4, 5, 6)   # convs of a coarse, middle, fine head

    def __post_init__(self):
        if len(self.stages) != 4:
            raise ValueError(f"expected 4 stages of IR-SE units, got {len(self.stages)}")
        if self.stages[-1][0] != self.style_dim:
            raise ValueError(f"the last stage's depth {self.stages[-1][0]} must equal the "
                             f"style width {self.style_dim} (the pyramid adds them)")


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class IRSEUnit(nn.Module):
    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)        # plain subsampling
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth), nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth), SqueezeExcite(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class StyleHead(nn.Module):
    """``n_convs`` stride-2 convs + leaky ReLU (0.01), then a linear layer: [B, C, r, r] with
    r <= 2^n_convs -> [B, C]."""

    def __init__(self, channels: int, n_convs: int):
        super().__init__()
        layers = []
        for _ in range(n_convs):
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = FullyConnectedLayer(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"the encoder's features end at {list(x.shape[-2:])} instead of "
                             "1x1: the input must be 256x256")
        return self.linear(x.flatten(1))


class PSPEncoder(nn.Module):
    """images [B, input_channels, 256, 256] in [-1, 1] -> codes [B, n_styles, style_dim]."""

    def __init__(self, config: PSPEncoderConfig = PSPEncoderConfig()):
        super().__init__()
        self.config = c = config
        self.input_layer = nn.Sequential(nn.Conv2d(c.input_channels, c.stem, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(c.stem), nn.PReLU(c.stem))
        units, self.taps, channels = [], [], c.stem
        for depth, count in c.stages:
            for i in range(count):
                units.append(IRSEUnit(channels, depth, 2 if i == 0 else 1))
                channels = depth
            self.taps.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        self.styles = nn.ModuleList(
            StyleHead(c.style_dim, c.head_convs[0 if i < COARSE else 1 if i < MIDDLE else 2])
            for i in range(c.n_styles))
        self.latlayer1 = nn.Conv2d(c.stages[2][0], c.style_dim, 1)
        self.latlayer2 = nn.Conv2d(c.stages[1][0], c.style_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(images)
        features = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                features[i] = x
        c1, c2, c3 = (features[i] for i in self.taps[1:])
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        sources = [c3 if i < COARSE else p2 if i < MIDDLE else p1 for i in range(len(self.styles))]
        return torch.stack([head(x) for head, x in zip(self.styles, sources)], dim=1)


def _upsample_add(x: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=lateral.shape[-2:], mode="bilinear",
                         align_corners=True) + lateral
