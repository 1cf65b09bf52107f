"""Low-level ops shared by the StyleGAN2 and StyleGAN3 generators, in plain PyTorch.

They reproduce the reference (non-CUDA-kernel) semantics of NVlabs' ``torch_utils.ops``
(``upfirdn2d``, ``bias_act``, ``filtered_lrelu``) so that official weights give the official
images. All image tensors are NCHW. Filters are float32 and applied in the input's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``x`` [N, C] to unit mean square (StyleGAN's pixel norm of z)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, slope: float | None = None,
             gain: float = 1.0, clamp: float | None = None) -> torch.Tensor:
    """``clamp(gain * act(x + b))``: b [C] is added along dim 1; ``act`` is a leaky ReLU with
    negative ``slope`` (None: linear); the result is clamped to [-clamp, clamp] if given."""
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if slope is not None:
        x = F.leaky_relu(x, slope)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """2-D FIR filter [k, k]: outer product of ``taps`` normalised to unit DC gain (float32)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 1, down: int = 1,
              padding=(0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a FIR filter, then decimate.

    x: [N, C, H, W]. f: [k] (separable: applied along W, then along H), [kh, kw], or None
    (identity). padding: (x0, x1, y0, y1) samples added to the upsampled image; negative
    values crop. The filter is scaled so that its total gain is ``gain`` (a separable filter
    gets sqrt(gain) per pass); a true convolution (flipped kernel), as NVlabs' upfirdn2d.
    Output: [N, C, (H*up + y0 + y1 - kh + 1 + down - 1) // down, same for W].
    """
    n, c, h, w = x.shape
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x0, x1, y0, y1 = padding
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0):x.shape[2] - max(-y1, 0), max(-x0, 0):x.shape[3] - max(-x1, 0)]
    if f is None:
        x = x * gain if gain != 1 else x
    else:
        f = (f * gain ** (f.ndim / 2)).to(x.dtype).flip(list(range(f.ndim)))
        if f.ndim == 2:
            x = F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)
        else:
            f = f[None, None].repeat(c, 1, 1)
            x = F.conv2d(x, f.unsqueeze(2), groups=c)
            x = F.conv2d(x, f.unsqueeze(3), groups=c)
    return x[:, :, ::down, ::down]


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Upsample [N, C, H, W] -> [N, C, H*up, W*up] with a 2-D FIR filter f [k, k] (gain up^2,
    padding centred as NVlabs' ``upfirdn2d.upsample2d``)."""
    k = f.shape[-1]
    p0, p1 = (k + up - 1) // 2, (k - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up ** 2)


def filtered_lrelu(x: torch.Tensor, fu: torch.Tensor | None, fd: torch.Tensor | None,
                   b: torch.Tensor, up: int, down: int, padding, gain: float, slope: float,
                   clamp: float | None) -> torch.Tensor:
    """StyleGAN3's alias-free nonlinearity: add bias b [C], upsample by ``up`` with filter fu,
    leaky ReLU (``slope``) times ``gain`` clamped to +-clamp, downsample by ``down`` with fd.
    padding (x0, x1, y0, y1) applies to the upsampled image (see ``upfirdn2d``)."""
    x = bias_act(x, b)
    x = upfirdn2d(x, fu, up=up, padding=padding, gain=up ** 2)
    x = bias_act(x, slope=slope, gain=gain, clamp=clamp)
    return upfirdn2d(x, fd, down=down)


def kaiser_lowpass(numtaps: int, cutoff: float, width: float, fs: float,
                   radial: bool = False) -> torch.Tensor | None:
    """Kaiser-windowed low-pass FIR filter (float32) as StyleGAN3 designs them.

    Separable: [numtaps], the windowed sinc of ``scipy.signal.firwin(numtaps, cutoff,
    width=width, fs=fs)``. Radial: [numtaps, numtaps], a windowed jinc (circularly symmetric),
    normalised to unit sum. ``cutoff`` and ``width`` (transition band) are in the units of the
    sampling rate ``fs``. numtaps == 1 returns None (identity filter).
    """
    if numtaps == 1:
        return None
    nyquist = fs / 2
    atten = 2.285 * (numtaps - 1) * math.pi * (width / nyquist) + 7.95
    if atten > 50:
        beta = 0.1102 * (atten - 8.7)
    elif atten > 21:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21)
    else:
        beta = 0.0
    window = np.kaiser(numtaps, beta)
    t = np.arange(numtaps) - (numtaps - 1) / 2
    if not radial:
        h = (cutoff / nyquist) * np.sinc((cutoff / nyquist) * t) * window
        return torch.as_tensor(h / h.sum(), dtype=torch.float32)
    r = torch.as_tensor(np.hypot(*np.meshgrid(t / fs, t / fs)), dtype=torch.float64, device="cpu")
    jinc = torch.special.bessel_j1(2 * cutoff * (math.pi * r)) / (math.pi * r)
    h = jinc.numpy() * np.outer(window, window)
    return torch.as_tensor(h / h.sum(), dtype=torch.float32)


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalised learning rate: stored weight [out, in] and bias [out] are
    scaled at run time by ``lr_multiplier / sqrt(in)`` and ``lr_multiplier``. ``activation``
    is 'linear' or 'lrelu' (slope 0.2, gain sqrt 2). ``bias_init`` may be a scalar or [out]."""

    def __init__(self, in_features: int, out_features: int, activation: str = "linear",
                 lr_multiplier: float = 1.0, weight_init: float = 1.0, bias_init=0.0):
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}")
        self.activation = activation
        weight = torch.randn([out_features, in_features]) * (weight_init / lr_multiplier)
        self.weight = nn.Parameter(weight)
        bias = torch.as_tensor(bias_init, dtype=torch.float32).broadcast_to([out_features])
        self.bias = nn.Parameter(bias / lr_multiplier)
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype)
        if self.bias_gain != 1:
            b = b * self.bias_gain
        if self.activation == "linear":
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, slope=0.2, gain=SQRT2)
