"""Photo encoders into a StyleGAN's W+: e4e and ReStyle (pSp and e4e heads) on IR-SE-50.

Module and tensor names equal those of the official code (omertov/encoder4editing
``Encoder4Editing``; yuval-alaluf/restyle-encoder and stylegan3-editing ``BackboneEncoder`` and
``ProgressiveBackboneEncoder``) without their ``encoder.`` prefix, so the ``encoder.*`` tensors
of the official checkpoints load with ``load_state_dict(strict=True)``
(``server.checkpoints.encoders``).

Conventions
- Input: FFHQ-aligned faces resized to 256 x 256, RGB in [-1, 1] ((x / 255 - 0.5) / 0.5), as
  the official transforms give them. ReStyle encoders take 6 channels: the photo and the
  current reconstruction (pooled to 256), concatenated along channels.
- Output: styles [B, n_styles, 512], offsets that the caller adds to a base latent (the
  average latent, or the previous ReStyle iterate): see ``PhotoEncoder.encode``.
- The backbone: an input layer (3x3 conv, batch norm, PReLU) and 24 IR-SE units in four
  stages of 3, 4, 14 and 3 units with 64, 128, 256 and 512 channels, each stage halving the
  resolution in its first unit (a 256 input ends at 16 x 16). Batch norms use their running
  statistics (inference only).
- A style head (map2style, ``GradualStyleBlock``) halves a 512-channel map log2(spatial) times
  with stride-2 3x3 convolutions and leaky ReLUs (slope 0.01) down to 1 x 1, then applies an
  equalised-learning-rate linear layer 512 -> 512.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.models.ops import FullyConnectedLayer

STAGES = ((64, 3), (128, 4), (256, 14), (512, 3))   # IR-SE-50: (channels, units) per stage
STYLE_DIM = 512
SE_REDUCTION = 16
INPUT_SIZE = 256
COARSE, MIDDLE = 3, 7          # e4e: styles [0, 3) read 16x16, [3, 7) 32x32, the rest 64x64
FPN_TAPS = (6, 20, 23)         # e4e: body units whose outputs feed the feature pyramid


class SqueezeExcite(nn.Module):
    """Channel gates: x * sigmoid(fc2(relu(fc1(mean over space of x)))), 1x1 convs, no bias."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class IRSEUnit(nn.Module):
    """Improved residual unit with squeeze-excitation: [N, in, H, W] -> [N, out, H/s, W/s].

    ``res_layer``: BN, 3x3 conv, PReLU, 3x3 conv with stride s, BN, SE. The shortcut
    subsamples x (stride s) when the channel count stays, else projects it (1x1 conv with
    stride s, BN): ``shortcut_layer``."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        if in_channels != channels:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels),
            SqueezeExcite(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "shortcut_layer"):
            shortcut = self.shortcut_layer(x)
        else:
            shortcut = x[:, :, ::self.stride, ::self.stride]   # a 1x1 max pool with stride s
        return self.res_layer(x) + shortcut


class StyleHead(nn.Module):
    """map2style: [N, 512, S, S] -> [N, 512], for maps of side ``spatial`` (a power of two)."""

    def __init__(self, spatial: int, channels: int = STYLE_DIM):
        super().__init__()
        layers = []
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = FullyConnectedLayer(channels, channels)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.channels))


class IRSE50(nn.Module):
    """The IR-SE-50 trunk: ``input_layer`` then ``body`` (24 units)."""

    def __init__(self, input_channels: int):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(input_channels, 64, 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(64), nn.PReLU(64))
        units, channels = [], 64
        for depth, count in STAGES:
            for i in range(count):
                units.append(IRSEUnit(channels, depth, 2 if i == 0 else 1))
                channels = depth
        self.body = nn.Sequential(*units)


class E4EEncoder(IRSE50):
    """encoder4editing (Tov et al. 2021): 3-channel input, a feature pyramid over body units
    6, 20 and 23 (c1 at 1/4, c2 at 1/8, c3 at 1/16 of the input) with ``latlayer1/2`` (1x1
    convs) and bilinear upsampling (align_corners=True). w = style_0(c3) on every layer, then
    style_i adds its delta to layer i: from c3 (i < 3), p2 = up(c3) + latlayer1(c2) (i < 7) or
    p1 = up(p2) + latlayer2(c1)."""

    kind = "e4e"

    def __init__(self, n_styles: int, input_channels: int = 3):
        super().__init__(input_channels)
        self.n_styles = n_styles
        self.styles = nn.ModuleList(
            StyleHead(16 if i < COARSE else 32 if i < MIDDLE else 64) for i in range(n_styles))
        self.latlayer1 = nn.Conv2d(256, STYLE_DIM, 1)
        self.latlayer2 = nn.Conv2d(128, STYLE_DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        taps = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in FPN_TAPS:
                taps.append(x)
        c1, c2, c3 = taps
        w = self.styles[0](c3)[:, None].repeat(1, self.n_styles, 1)
        features = c3
        for i in range(1, self.n_styles):
            if i == COARSE:
                features = features_p2 = _upsample_add(c3, self.latlayer1(c2))
            elif i == MIDDLE:
                features = _upsample_add(features_p2, self.latlayer2(c1))
            w[:, i] += self.styles[i](features)
        return w


class ReStyleEncoder(IRSE50):
    """ReStyle (Alaluf et al. 2021) backbone encoder: every style head reads the last 16x16
    map. ``progressive`` False: ReStyle-pSp, each head gives its layer's offset;
    True: ReStyle-e4e, head 0 gives a shared offset for every layer and head i adds a delta
    to layer i. Input: 6 channels (photo, current reconstruction)."""

    def __init__(self, n_styles: int, progressive: bool, input_channels: int = 6):
        super().__init__(input_channels)
        self.n_styles, self.progressive = n_styles, progressive
        self.kind = "restyle_e4e" if progressive else "restyle_psp"
        self.styles = nn.ModuleList(StyleHead(16) for _ in range(n_styles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.input_layer(x))
        if not self.progressive:
            return torch.stack([head(x) for head in self.styles], dim=1)
        w = self.styles[0](x)[:, None].repeat(1, self.n_styles, 1)
        for i in range(1, self.n_styles):
            w[:, i] += self.styles[i](x)
        return w


def _upsample_add(x: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=lateral.shape[-2:], mode="bilinear",
                         align_corners=True) + lateral


@dataclass
class PhotoEncoder:
    """A loaded encoder: ``net`` (``E4EEncoder`` or ``ReStyleEncoder``), ``latent_avg``
    [n_styles, 512] (the base the first pass adds its offsets to), ``add_average`` (e4e's
    ``start_from_latent_avg``), ``generator`` ('stylegan2' or 'stylegan3': the family it was
    trained for) and ``iterations`` (ReStyle's default number of passes)."""
    net: nn.Module
    latent_avg: torch.Tensor
    add_average: bool = True
    generator: str = "stylegan2"
    iterations: int = 1

    @property
    def kind(self) -> str:
        return self.net.kind

    @property
    def n_styles(self) -> int:
        return self.net.n_styles

    @property
    def iterative(self) -> bool:
        return isinstance(self.net, ReStyleEncoder)

    def encode(self, photo: torch.Tensor, synthesize, iterations: int | None = None,
               size: int = INPUT_SIZE, on_iteration=None) -> torch.Tensor:
        """W+ [B, n_styles, 512] of ``photo`` [B, 3, size, size] in [-1, 1].

        e4e: one pass, offsets + ``latent_avg`` (when ``add_average``). ReStyle: pass 0 sees
        the photo beside the average image (``synthesize(latent_avg)``) and adds its offsets to
        ``latent_avg``; each later pass sees the previous reconstruction and adds to the
        previous latent. ``synthesize(ws [B, n, 512]) -> images [B, 3, R, R]`` renders with
        the aligned (identity) transform; images are average-pooled to ``size`` before they
        are fed back. ``on_iteration(i, ws, image)`` is called after every pass."""
        base = self.latent_avg.to(photo)[None].expand(photo.shape[0], -1, -1)
        if not self.iterative:
            codes = self.net(photo)
            ws = codes + base if self.add_average else codes
            if on_iteration is not None:
                on_iteration(0, ws, None)
            return ws
        current = F.adaptive_avg_pool2d(synthesize(base[:1]), size).expand(len(photo), -1, -1, -1)
        ws = base
        for i in range(self.iterations if iterations is None else iterations):
            ws = self.net(torch.cat([photo, current], dim=1)) + ws
            image = synthesize(ws)
            current = F.adaptive_avg_pool2d(image, size)
            if on_iteration is not None:
                on_iteration(i, ws, image)
        return ws
