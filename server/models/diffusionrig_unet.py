"""DiffusionRig's denoiser: an ADM UNet (Dhariwal & Nichol 2021) whose residual blocks are
modulated twice, by the diffusion time and by a global appearance latent ``z``.

Module and parameter names equal the official ``UNetModel`` (adobe-research/diffusion-rig,
diffusion/model.py), so the official state dict loads strictly: ``time_embed``,
``input_blocks.i.j``, ``middle_block.j``, ``output_blocks.i.j``, ``out``; inside a residual
block ``in_layers``, ``emb_layers``, ``cond_emb_layers``, ``out_layers``, ``skip_connection``;
inside an attention block ``norm``, ``qkv``, ``proj_out``. This is the configuration
DiffusionRig trains, and only that one: scale-shift norm, residual up/down sampling, 2-D.

Tensors are NCHW. Images (``x_t``, the eps output) have 3 channels; the physical buffers are
9 channels (rendered RGB, normal XYZ, albedo RGB) at the same resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters. The defaults are DiffusionRig's 256x256 stage-1 model.

    ``attention_ds`` lists *downsampling factors* (not resolutions) at which the encoder and
    decoder levels get self-attention: 256 / 16 = 16 means attention at 16x16. The middle
    block always has attention.
    """
    image_size: int = 256
    in_channels: int = 12            # x_t (3) + rendered (3) + normal (3) + albedo (3)
    out_channels: int = 3            # eps (learn_sigma False)
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    latent_dim: int = 64

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, evaluated in float32 and cast back (stable under fp16)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps ``t`` [N]:
    ``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period^(-k / (dim/2))``, k = 0..dim/2-1.
    float32 whatever ``t``'s dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half
                      * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, then two FiLMs, then GN-SiLU-dropout-conv, plus skip.

    After the second GroupNorm, ``h = h * (1 + s_t) + b_t`` with (s_t, b_t) from the time
    embedding, then ``h = h * (1 + s_z) + b_z`` with (s_z, b_z) from the global latent z.
    ``resample`` 'down' (2x2 average pool) or 'up' (2x nearest) is applied to both paths,
    between the first normalisation and the first convolution on the residual path.
    """

    def __init__(self, channels: int, out_channels: int, emb_dim: int, latent_dim: int,
                 dropout: float, resample: str | None = None):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(latent_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(),
                                        nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, H, W], emb [N, emb_dim], z [N, latent_dim] -> [N, C_out, H', W']."""
        norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
        h = conv(self._resample(norm_act(x)))
        x = self._resample(x)
        scale_t, shift_t = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        scale_z, shift_z = self.cond_emb_layers(z).type(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale_t) + shift_t
        h = h * (1 + scale_z) + shift_z
        return self.skip_connection(x) + self.out_layers[1:](h)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, residual: ``x + proj_out(attn(qkv(norm(x))))``.

    ``qkv`` (a 1x1 Conv1d to 3C channels) is laid out head-major ("legacy" ADM order): for
    head i, channels [3*c*i, 3*c*i + 3*c) hold its q, k, v of c = C / heads channels each.
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> [N, C, H, W]."""
        n, c, height, width = x.shape
        x = x.reshape(n, c, height * width)
        qkv = self.qkv(self.norm(x)).reshape(n * self.num_heads, 3 * c // self.num_heads, -1)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=2)              # each [N*heads, T, c]
        h = F.scaled_dot_product_attention(q, k, v)                # softmax(q k^T / sqrt(c)) v
        h = h.transpose(1, 2).reshape(n, c, -1)
        return (x + self.proj_out(h)).reshape(n, c, height, width)


class TimestepSequential(nn.Sequential):
    """A UNet stage: residual blocks receive (emb, z), every other layer only the features."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, z) if isinstance(layer, ResBlock) else layer(x)
        return x


class DiffusionRigUNet(nn.Module):
    """eps-prediction UNet conditioned on physical buffers (by concatenation) and on a global
    latent (by FiLM in every residual block)."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg = config
        if cfg.image_size % 2 ** (len(cfg.channel_mult) - 1):
            raise ValueError(f"image_size {cfg.image_size} does not halve "
                             f"{len(cfg.channel_mult) - 1} times")
        emb_dim = cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(c_in, c_out, resample=None):
            return ResBlock(c_in, c_out, emb_dim, cfg.latent_dim, cfg.dropout, resample)

        ch = cfg.channel_mult[0] * cfg.model_channels
        self.input_blocks = nn.ModuleList([
            TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(res(ch, ch, "down")))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(res(ch, ch), AttentionBlock(ch, cfg.num_heads),
                                               res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_ds:
                    layers.append(AttentionBlock(ch, cfg.num_heads))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up"))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor | None,
                z: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x_t``.

        x_t:     [N, 3, S, S] noisy image (S = image_size, data range [-1, 1]).
        t:       [N] diffusion timesteps of the 1000-step training process (integer or float).
        buffers: [N, in_channels - 3, S, S] physical buffers cat([rendered, normal, albedo]),
                 or None when ``x_t`` already holds all ``in_channels`` channels.
        z:       [N, latent_dim] global latent from the encoder.
        Returns eps [N, out_channels, S, S] in ``x_t``'s dtype.
        """
        h = x_t if buffers is None else torch.cat([x_t, buffers], dim=1)
        if h.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects {self.config.in_channels} input channels "
                             f"(x_t + buffers), got {h.shape[1]}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(h.dtype))
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, z)
            skips.append(h)
        h = self.middle_block(h, emb, z)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, z)
        return self.out(h.type(x_t.dtype))
