"""StyleGAN3 (alias-free) generator, configs T and R, inference only.

Names equal those of NVlabs/stylegan3 training/networks_stylegan3.py, so the official
``G_ema`` tensors load with ``load_state_dict(strict=True)`` and give the official images.

Conventions
- z: [B, z_dim]; c: [B, c_dim] or None; ws: [B, num_ws, w_dim] with num_ws = num_layers + 2
  (16): ws[:, 0] drives ``synthesis.input``, ws[:, i + 1] layer ``L{i}``.
- img: [B, img_channels, res, res] float32, nominal range [-1, 1] (output_scale applied).
- Image coordinates: the image spans [-0.5, 0.5] in x (right) and y (down). The buffer
  ``synthesis.input.transform`` [3, 3] maps output coordinates to input (Fourier feature)
  coordinates, so writing the inverse of ``make_transform(angle, tx, ty)`` rotates the image
  content by ``angle`` (counter-clockwise as displayed) and then shifts it by (tx, ty) image
  widths; see ``set_transform``.
- Layers have no noise inputs; ``noise_mode`` is accepted for API parity and ignored.
- Precision: on CUDA, layers whose sampling rate * 2^num_fp16_res exceeds the resolution
  run in float16 (activations clamped to +-conv_clamp); elsewhere float32.
- ``magnitude_ema`` and ``w_avg`` are read, never updated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from server.models.ops import (SQRT2, FullyConnectedLayer, filtered_lrelu, filtered_lrelu_fused,
                               kaiser_lowpass, modulated_conv2d)
from server.models.stylegan2 import NOISE_MODES, Generator


@dataclass(frozen=True)
class StyleGAN3Config:
    """Hyper-parameters of the official ``Generator``. Defaults are config T; config R is
    ``StyleGAN3Config.preset('r', res)`` (1x1 convs, radial down filters, 2x channels)."""
    img_resolution: int = 1024
    z_dim: int = 512
    w_dim: int = 512
    c_dim: int = 0
    img_channels: int = 3
    channel_base: int = 32768
    channel_max: int = 512
    num_layers: int = 14
    num_critical: int = 2
    first_cutoff: float = 2.0
    first_stopband: float = 2 ** 2.1
    last_stopband_rel: float = 2 ** 0.3
    margin_size: int = 10
    output_scale: float = 0.25
    num_fp16_res: int = 4
    conv_kernel: int = 3
    filter_size: int = 6
    lrelu_upsampling: int = 2
    use_radial_filters: bool = False
    conv_clamp: float | None = 256
    mapping_layers: int = 2
    mapping_lr_multiplier: float = 0.01

    architecture = "stylegan3"

    def __post_init__(self):
        for name in ("img_resolution", "z_dim", "w_dim", "img_channels", "channel_base",
                     "channel_max", "num_layers", "conv_kernel", "filter_size", "lrelu_upsampling",
                     "mapping_layers"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.num_critical < self.num_layers:
            raise ValueError(f"num_critical must be in [0, num_layers), got {self.num_critical}")

    @classmethod
    def preset(cls, name: str, img_resolution: int = 1024, **overrides) -> "StyleGAN3Config":
        """'t' (translation equivariant) or 'r' (rotation equivariant), as NVlabs' train.py."""
        if name == "t":
            return cls(img_resolution=img_resolution, **overrides)
        if name == "r":
            kw = dict(channel_base=65536, channel_max=1024, conv_kernel=1, use_radial_filters=True)
            return cls(img_resolution=img_resolution, **{**kw, **overrides})
        raise ValueError(f"StyleGAN3 preset must be 't' or 'r', got {name!r}")

    @property
    def num_ws(self) -> int:
        return self.num_layers + 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StyleGAN3Config":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown StyleGAN3Config fields: {sorted(unknown)}")
        return cls(**d)

    def layer_schedule(self) -> dict[str, np.ndarray]:
        """Per-layer design, index 0 .. num_layers (the last is ToRGB): cutoff f_c, sampling
        rate s, transition half-width f_h, spatial size (with margins) and channels.
        Cutoffs and minimum stopbands grow geometrically until the critically sampled tail."""
        n = self.num_layers
        last_cutoff = self.img_resolution / 2
        last_stopband = last_cutoff * self.last_stopband_rel
        exponents = np.minimum(np.arange(n + 1) / (n - self.num_critical), 1)
        cutoffs = self.first_cutoff * (last_cutoff / self.first_cutoff) ** exponents
        stopbands = self.first_stopband * (last_stopband / self.first_stopband) ** exponents
        rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, self.img_resolution))))
        half_widths = np.maximum(stopbands, rates / 2) - cutoffs
        sizes = rates + self.margin_size * 2
        sizes[-2:] = self.img_resolution
        channels = np.rint(np.minimum((self.channel_base / 2) / cutoffs, self.channel_max))
        channels[-1] = self.img_channels
        return dict(cutoffs=cutoffs, sampling_rates=rates, half_widths=half_widths,
                    sizes=sizes.astype(int), channels=channels.astype(int))


def make_transform(angle_rad: float = 0.0, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    """[3, 3] float64 image-space transform [[c, s, tx], [-s, c, ty], [0, 0, 1]], c = cos(angle),
    s = sin(angle): maps a content point p to R p + t (rotation first, then translation), in
    image coordinates (x right, y down, image spanning [-0.5, 0.5])."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, s, tx], [-s, c, ty], [0.0, 0.0, 1.0]])


@torch.no_grad()
def set_transform(G: nn.Module, angle_rad: float = 0.0, tx: float = 0.0, ty: float = 0.0) -> None:
    """Rotate the generated content by ``angle_rad`` (counter-clockwise as displayed) about the
    image centre, then translate it by (tx, ty) image widths (x right, y down): writes
    ``synthesis.input.transform`` = inverse of ``make_transform``. Angle 0, shift 0 restores
    the identity (the default)."""
    if not isinstance(getattr(G.synthesis, "input", None), SynthesisInput):
        raise TypeError(f"set_transform needs a StyleGAN3 generator, got {type(G).__name__}")
    transform = G.synthesis.input.transform
    transform.copy_(torch.from_numpy(np.linalg.inv(make_transform(angle_rad, tx, ty))))


def set_fused_lrelu(G: nn.Module, enabled: bool = True) -> None:
    """Run every synthesis layer's filtered leaky ReLU through ``filtered_lrelu_fused``
    (``torch.compile``; the first frame pays the compilation) or, disabled, the plain ops."""
    for name in G.synthesis.layer_names:
        getattr(G.synthesis, name).fused_lrelu = bool(enabled)


class SynthesisInput(nn.Module):
    """Fourier features (paper Sec. 3.1, App. D): w [N, w_dim] -> [N, channels, size, size].

    Channel c at image point p is a_c sin(2 pi (f_c . q(p) + phi_c)), mixed across channels by
    ``weight`` / sqrt(channels). ``freqs`` f_c [C, 2] (cycles per unit, inside the disc of
    radius ``bandwidth``) and ``phases`` phi_c [C] are fixed. The feature coordinates are
    q(p) = R (U p - t): U the user ``transform`` (an affine [3, 3] from output to feature
    coordinates, see ``set_transform``), R and t the rotation (cos, sin) and translation
    (t_x, t_y) given by ``affine(w)`` once (cos, sin) is normalised to unit length (t is
    divided by the same length). The amplitude a_c fades a frequency out linearly as the
    transformed |f_c| goes from ``bandwidth`` to sampling_rate / 2. Pixel centres sit at
    (i + 1/2 - size/2) / sampling_rate on both axes (x right, y down).
    """

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float,
                 bandwidth: float):
        super().__init__()
        self.channels, self.size = channels, int(size)
        self.sampling_rate, self.bandwidth = float(sampling_rate), float(bandwidth)
        # Uniform on the disc |f| < bandwidth: uniform angle, radius bandwidth * sqrt(U(0, 1)).
        angle = torch.rand([channels]) * (2 * math.pi)
        radius = bandwidth * torch.rand([channels]).sqrt()
        freqs = torch.stack([angle.cos(), angle.sin()], dim=1) * radius[:, None]
        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.register_buffer("transform", torch.eye(3, 3))
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", torch.rand([channels]) - 0.5)
        self.affine = FullyConnectedLayer(w_dim, 4, weight_init=0, bias_init=[1, 0, 0, 0])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        params = self.affine(w)
        params = params / params[:, :2].norm(dim=1, keepdim=True)
        cos, sin, shift = params[:, 0], params[:, 1], params[:, 2:]
        rotation = torch.stack([cos, -sin, sin, cos], dim=1).reshape(-1, 2, 2)  # [N, 2, 2]
        user_linear, user_shift = self.transform[:2, :2], self.transform[:2, 2]
        # f . R (U p - t) = (f R U_lin) . p + f . R (U_shift - t)
        linear = rotation @ user_linear  # [N, 2, 2]
        offset = (rotation @ (user_shift - shift)[:, :, None])[:, :, 0]  # [N, 2]
        freqs = self.freqs @ linear  # [N, C, 2], cycles per unit of output coordinates
        phases = self.phases + offset @ self.freqs.t()  # [N, C]
        nyquist = self.sampling_rate / 2
        fade = (nyquist - freqs.norm(dim=2)) / (nyquist - self.bandwidth)  # [N, C]

        centres = (torch.arange(self.size, device=w.device) + (1 - self.size) / 2)
        centres = centres / self.sampling_rate  # [S]
        fx, fy = freqs[..., 0, None, None], freqs[..., 1, None, None]  # [N, C, 1, 1]
        cycles = fx * centres + fy * centres[:, None] + phases[..., None, None]  # [N, C, S, S]
        features = torch.sin(cycles * (2 * math.pi)) * fade.clamp(0, 1)[..., None, None]
        mix = self.weight / math.sqrt(self.channels)
        return torch.einsum("dc,nchw->ndhw", mix, features)


class SynthesisLayer(nn.Module):
    """Modulated conv, then filtered leaky ReLU:
    [N, in_channels, in_size, in_size] -> [N, out_channels, out_size, out_size].

    The nonlinearity runs at ``lrelu_upsampling`` x the higher of the two sampling rates:
    upsample with ``up_filter`` (cutoff in_cutoff), leaky ReLU, downsample with
    ``down_filter`` (cutoff out_cutoff; radial for non-critical layers of config R). Filters
    of one tap are omitted (None, absent from the state dict). ToRGB: 1x1 conv, no
    demodulation, no activation, no resampling. ``fused_lrelu`` (default False) runs the
    compiled ``filtered_lrelu_fused`` instead of the plain op (``set_fused_lrelu``).
    """

    def __init__(self, w_dim, is_torgb, is_critically_sampled, use_fp16, in_channels,
                 out_channels, in_size, out_size, in_sampling_rate, out_sampling_rate, in_cutoff,
                 out_cutoff, in_half_width, out_half_width, conv_kernel=3, filter_size=6,
                 lrelu_upsampling=2, use_radial_filters=False, conv_clamp=256):
        super().__init__()
        self.is_torgb, self.use_fp16, self.conv_clamp = is_torgb, use_fp16, conv_clamp
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size, self.out_size = in_size, out_size
        self.fused_lrelu = False
        k = self.conv_kernel = 1 if is_torgb else conv_kernel
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, k, k]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))

        rate = max(in_sampling_rate, out_sampling_rate) * (1 if is_torgb else lrelu_upsampling)
        self.up_factor = int(round(rate / in_sampling_rate))
        self.down_factor = int(round(rate / out_sampling_rate))
        up_taps = filter_size * self.up_factor if self.up_factor > 1 and not is_torgb else 1
        down_taps = filter_size * self.down_factor if self.down_factor > 1 and not is_torgb else 1
        radial = use_radial_filters and not is_critically_sampled
        up_filter = kaiser_lowpass(up_taps, in_cutoff, in_half_width * 2, rate)
        down_filter = kaiser_lowpass(down_taps, out_cutoff, out_half_width * 2, rate, radial)
        self.register_buffer("up_filter", up_filter)
        self.register_buffer("down_filter", down_filter)
        # Along each axis the full convolution leaves in_size + k - 1 samples, upsampling
        # multiplies them by up, each filter eats taps - 1, and keeping every down-th sample
        # of n leaves (n - 1) // down + 1. Pad the upsampled signal to end with out_size.
        needed = (out_size - 1) * self.down_factor + 1 + (up_taps - 1) + (down_taps - 1)
        extra = needed - (in_size + k - 1) * self.up_factor
        # Larger half first by up / 2 samples: output samples then sit halfway between
        # input ones, the symmetric sampling of the paper's App. C.3.
        before = (extra + self.up_factor) // 2
        self.padding = (before, extra - before, before, extra - before)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)

    def forward(self, x: torch.Tensor, w: torch.Tensor, force_fp32: bool = False) -> torch.Tensor:
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        x = x.to(torch.float16 if half else torch.float32)
        # The input is divided by its expected RMS (tracked in training) via the kernel.
        gain = self.magnitude_ema.rsqrt()
        if self.is_torgb:
            gain = gain / math.sqrt(self.in_channels * self.conv_kernel ** 2)
        x = modulated_conv2d(x, self.weight, self.affine(w), demodulate=not self.is_torgb,
                             padding=self.conv_kernel - 1, gain=gain)
        act_gain, slope = (1.0, 1.0) if self.is_torgb else (SQRT2, 0.2)
        act = filtered_lrelu_fused if self.fused_lrelu else filtered_lrelu
        return act(x, self.up_filter, self.down_filter, self.bias.to(x.dtype), self.up_factor,
                   self.down_factor, self.padding, act_gain, slope, self.conv_clamp)


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] -> img [B, img_channels, res, res]: ``input`` then the layers
    ``L{i}_{size}_{channels}`` (names in ``layer_names``), times ``output_scale``."""

    def __init__(self, cfg: StyleGAN3Config):
        super().__init__()
        self.w_dim, self.num_ws, self.img_resolution = cfg.w_dim, cfg.num_ws, cfg.img_resolution
        self.output_scale, self.num_fp16_res = cfg.output_scale, cfg.num_fp16_res
        s = cfg.layer_schedule()
        cutoffs, rates, widths = s["cutoffs"], s["sampling_rates"], s["half_widths"]
        sizes, channels = s["sizes"], s["channels"]
        self.input = SynthesisInput(cfg.w_dim, int(channels[0]), int(sizes[0]), rates[0],
                                    cutoffs[0])
        self.layer_names = []
        for i in range(cfg.num_layers + 1):
            j = max(i - 1, 0)
            layer = SynthesisLayer(
                cfg.w_dim, is_torgb=i == cfg.num_layers,
                is_critically_sampled=i >= cfg.num_layers - cfg.num_critical,
                use_fp16=bool(rates[i] * 2 ** cfg.num_fp16_res > cfg.img_resolution),
                in_channels=int(channels[j]), out_channels=int(channels[i]),
                in_size=int(sizes[j]), out_size=int(sizes[i]),
                in_sampling_rate=int(rates[j]), out_sampling_rate=int(rates[i]),
                in_cutoff=cutoffs[j], out_cutoff=cutoffs[i],
                in_half_width=widths[j], out_half_width=widths[i],
                conv_kernel=cfg.conv_kernel, filter_size=cfg.filter_size,
                lrelu_upsampling=cfg.lrelu_upsampling, use_radial_filters=cfg.use_radial_filters,
                conv_clamp=cfg.conv_clamp)
            name = f"L{i}_{layer.out_size}_{layer.out_channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)

    def forward(self, ws: torch.Tensor, noise_mode: str = "const",
                force_fp32: bool = False) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [batch, {self.num_ws}, {self.w_dim}], "
                             f"got {list(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        ws = ws.to(torch.float32).unbind(dim=1)
        x = self.input(ws[0])
        for name, w in zip(self.layer_names, ws[1:]):
            x = getattr(self, name)(x, w, force_fp32=force_fp32)
        if self.output_scale != 1:
            x = x * self.output_scale
        return x.to(torch.float32)


class StyleGAN3Generator(Generator):
    Synthesis = SynthesisNetwork
    default_config = StyleGAN3Config()
