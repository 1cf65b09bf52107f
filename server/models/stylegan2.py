"""StyleGAN2 generator (config F, 'skip' ToRGB architecture), inference only.

Module, parameter and buffer names equal those of NVlabs/stylegan2-ada-pytorch
(training/networks.py) and NVlabs/stylegan3 (training/networks_stylegan2.py), so the official
``G_ema`` tensors load with ``load_state_dict(strict=True)`` and give the official images.

Conventions
- z: [B, z_dim] float, standard normal. c: [B, c_dim] labels, or None when c_dim == 0.
- ws: [B, num_ws, w_dim] with num_ws = 2 log2(res) - 2 (18 at 1024, 14 at 256). Block
  ``b{r}`` reads the window of ws starting at 2 log2(r) - 5 (b4 at 0): conv0, conv1, torgb;
  a block's torgb shares its w with the next block's conv0.
- img: [B, img_channels, res, res] float32, nominal range [-1, 1], not clamped.
- noise_mode: 'const' adds the stored ``noise_const`` maps (deterministic), 'random' draws
  fresh N(0, 1) noise, 'none' adds none. The official default is 'random'; ours is 'const'.
- Precision: on CUDA the blocks at the ``num_fp16_res`` highest resolutions (never b4) run in
  float16, with activations clamped to +-``conv_clamp``; elsewhere everything is float32.
  The ToRGB sum ``img`` always stays float32.
- Moving averages (``mapping.w_avg``) are read, never updated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from server.models.ops import (SQRT2, FullyConnectedLayer, bias_act, modulated_conv2d,
                               normalize_2nd_moment, setup_filter, upsample2d)

NOISE_MODES = ("const", "random", "none")


@dataclass(frozen=True)
class StyleGAN2Config:
    """Hyper-parameters that fix the tensor shapes (and the fp16 / clamp behaviour).

    ``channel_base`` / ``channel_max``: block ``b{r}`` has min(channel_base // r,
    channel_max) channels (config F: 32768 at 1024; NVIDIA's 256 models use 16384).
    ``num_fp16_res``: how many of the highest-resolution blocks run in float16 on CUDA
    (stylegan2-ada trains with 4 and conv_clamp 256; TF-converted pickles use 0 / None).
    """
    img_resolution: int = 1024
    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0
    img_channels: int = 3
    channel_base: int = 32768
    channel_max: int = 512
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    use_noise: bool = True
    resample_filter: tuple = (1, 3, 3, 1)

    architecture = "stylegan2"

    def __post_init__(self):
        r = self.img_resolution
        if not (isinstance(r, int) and r >= 4 and r & (r - 1) == 0):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {r!r}")
        for name in ("z_dim", "w_dim", "img_channels", "channel_base", "channel_max",
                     "mapping_layers"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.c_dim < 0 or self.num_fp16_res < 0:
            raise ValueError("c_dim and num_fp16_res must be >= 0")
        object.__setattr__(self, "resample_filter", tuple(self.resample_filter))
        # Count only blocks that can run in float16 (b4 never does): equal networks compare equal.
        object.__setattr__(self, "num_fp16_res", min(self.num_fp16_res, int(math.log2(r)) - 2))

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.img_resolution)) - 2

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), resample_filter=list(self.resample_filter))

    @classmethod
    def from_dict(cls, d: dict) -> "StyleGAN2Config":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown StyleGAN2Config fields: {sorted(unknown)}")
        return cls(**d)


class MappingNetwork(nn.Module):
    """z [B, z_dim] (+ c [B, c_dim]) -> ws [B, num_ws, w_dim].

    z, and the label embedding ``embed(c)``, are normalised to unit mean square, concatenated,
    and passed through ``fc0 .. fc{n-1}`` (leaky ReLU, equalised lr_multiplier). Truncation moves
    the first ``truncation_cutoff`` ws (all if None) towards ``w_avg``:
    w' = w_avg + psi * (w - w_avg).
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int, num_layers: int,
                 lr_multiplier: float = 0.01):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.num_ws, self.num_layers = num_ws, num_layers
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, w_dim)
        width = z_dim + (w_dim if c_dim > 0 else 0)
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnectedLayer(width, w_dim, "lrelu", lr_multiplier))
            width = w_dim
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be [batch, {self.z_dim}], got {list(z.shape)}")
        inputs = [normalize_2nd_moment(z.to(torch.float32))]
        if self.c_dim > 0:
            if c is None or c.shape != (z.shape[0], self.c_dim):
                got = None if c is None else list(c.shape)
                raise ValueError(f"c must be [{z.shape[0]}, {self.c_dim}] for this conditional "
                                 f"generator, got {got}")
            inputs.append(normalize_2nd_moment(self.embed(c.to(torch.float32))))
        w = torch.cat(inputs, dim=1)
        for i in range(self.num_layers):
            w = getattr(self, f"fc{i}")(w)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if truncation_psi == 1:
            return ws.contiguous()
        cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
        truncated = torch.arange(self.num_ws, device=w.device)[:, None] < cutoff
        return torch.where(truncated, self.w_avg + truncation_psi * (ws - self.w_avg), ws)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling), noise, bias, leaky ReLU * sqrt 2, clamp.
    x [N, in, r/up, r/up] -> [N, out, r, r]; w [N, w_dim]."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 up: int = 1, use_noise: bool = True, conv_clamp: float | None = None,
                 resample_filter=(1, 3, 3, 1), kernel_size: int = 3):
        super().__init__()
        self.resolution, self.up, self.padding = resolution, up, kernel_size // 2
        self.use_noise, self.conv_clamp = use_noise, conv_clamp
        k = kernel_size
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, k, k]))
        if use_noise:
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)

    def noise(self, x: torch.Tensor, noise_mode: str) -> torch.Tensor | None:
        """Per-pixel noise [N or 1, 1, r, r] scaled by ``noise_strength``, or None."""
        if not self.use_noise or noise_mode == "none":
            return None
        if noise_mode == "const":
            return self.noise_strength * self.noise_const
        r = self.resolution
        return self.noise_strength * torch.randn([x.shape[0], 1, r, r], device=x.device)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "const",
                fused: bool = True) -> torch.Tensor:
        y = modulated_conv2d(x, self.weight, self.affine(w), padding=self.padding, up=self.up,
                             blur=self.resample_filter, fused=fused)
        noise = self.noise(y, noise_mode)
        if noise is not None:
            y = y + noise.to(y.dtype)
        return bias_act(y, self.bias.to(y.dtype), slope=0.2, gain=SQRT2, clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation, plus bias: [N, in, r, r] -> [N, out, r, r]."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int,
                 conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.style_scale = 1 / math.sqrt(in_channels)  # the 1x1 kernel's fan-in

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        y = modulated_conv2d(x, self.weight, self.affine(w), demodulate=False,
                             gain=self.style_scale, fused=fused)
        return bias_act(y, self.bias.to(y.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution r: (const | conv0 with 2x upsampling), conv1, torgb; the running RGB
    image from the previous block is upsampled with ``resample_filter`` and summed ('skip').
    ``num_conv`` + 1 ws are consumed, [N, num_conv + 1, w_dim]."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 img_channels: int, use_fp16: bool, conv_clamp: float | None, use_noise: bool,
                 resample_filter):
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        layer = dict(w_dim=w_dim, resolution=resolution, use_noise=use_noise, conv_clamp=conv_clamp,
                     resample_filter=resample_filter)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **layer)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2

    def forward(self, x, img, ws, noise_mode="const", force_fp32=False, fused_modconv=None):
        half = self.use_fp16 and not force_fp32 and ws.device.type == "cuda"
        dtype = torch.float16 if half else torch.float32
        if fused_modconv is None:
            # Per-sample float16 kernels of a batch risk overflow: scale activations instead.
            fused_modconv = not self.training and (not half or ws.shape[0] == 1)
        convs = [self.conv1] if self.in_channels == 0 else [self.conv0, self.conv1]
        if self.in_channels == 0:
            x = self.const.expand(ws.shape[0], -1, -1, -1)
        x = x.to(dtype)
        for conv, w in zip(convs, ws.unbind(dim=1)):
            x = conv(x, w, noise_mode, fused_modconv)
        rgb = self.torgb(x, ws[:, -1], fused_modconv).to(torch.float32)
        if img is not None:
            rgb = rgb + upsample2d(img, self.resample_filter)
        return x, rgb


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] -> img [B, img_channels, res, res] float32 (blocks b4 .. b{res})."""

    def __init__(self, cfg: StyleGAN2Config):
        super().__init__()
        self.w_dim, self.img_resolution, self.num_ws = cfg.w_dim, cfg.img_resolution, cfg.num_ws
        log2 = int(math.log2(cfg.img_resolution))
        self.block_resolutions = [2 ** i for i in range(2, log2 + 1)]
        fp16_resolution = max(2 ** (log2 + 1 - cfg.num_fp16_res), 8)
        for res in self.block_resolutions:
            block = SynthesisBlock(cfg.channels(res // 2) if res > 4 else 0, cfg.channels(res),
                                   cfg.w_dim, res, cfg.img_channels,
                                   use_fp16=res >= fp16_resolution, conv_clamp=cfg.conv_clamp,
                                   use_noise=cfg.use_noise, resample_filter=cfg.resample_filter)
            setattr(self, f"b{res}", block)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [batch, {self.num_ws}, {self.w_dim}], "
                             f"got {list(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        ws = ws.to(torch.float32)
        x = img = None
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            first = max(2 * int(math.log2(res)) - 5, 0)
            x, img = block(x, img, ws[:, first:first + block.num_conv + 1], noise_mode,
                           force_fp32, fused_modconv)
        return img


class Generator(nn.Module):
    """``synthesis`` and ``mapping`` as in the official ``Generator`` (same registration
    order), for either architecture: subclasses name their ``Synthesis`` network and default
    config. ``G(z, c)`` = ``G.synthesis(G.mapping(z, c, psi, cutoff), noise_mode)``."""

    Synthesis: type
    default_config: object

    def __init__(self, config=None):
        super().__init__()
        config = self.default_config if config is None else config
        self.config = config
        self.z_dim, self.c_dim, self.w_dim = config.z_dim, config.c_dim, config.w_dim
        self.img_resolution, self.img_channels = config.img_resolution, config.img_channels
        self.num_ws = config.num_ws
        self.synthesis = self.Synthesis(config)
        self.mapping = MappingNetwork(config.z_dim, config.c_dim, config.w_dim, config.num_ws,
                                      config.mapping_layers, config.mapping_lr_multiplier)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const",
                force_fp32: bool = False) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32)


class StyleGAN2Generator(Generator):
    Synthesis = SynthesisNetwork
    default_config = StyleGAN2Config()
