"""Building blocks of the StyleGAN2 and StyleGAN3 generators, in plain PyTorch.

Written from the papers' equations (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN", Sec. 2.2 and App. B; Karras et al. 2021, "Alias-Free Generative
Adversarial Networks", Sec. 3 and App. C-D). All image tensors are NCHW. FIR filters are
float32 tensors applied in the input's dtype.

Resampling (``upfirdn2d``) follows the classic definition: upsample by zero insertion, pad,
convolve with a FIR filter (a true convolution, i.e. flipped kernel), keep every ``down``-th
sample. It is evaluated without building the zero-stuffed image: a transposed convolution
with stride ``up`` does the insertion and the filtering in one pass, a strided convolution
does the filtering and the decimation in one pass.
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


def _depthwise(f: torch.Tensor, channels: int, axis: str | None, dtype) -> torch.Tensor:
    """Filter f as a depthwise kernel [channels, 1, kh, kw]: a 1-D f along axis 'x' or 'y',
    or a 2-D f (axis None)."""
    k = f if axis is None else (f[None, :] if axis == "x" else f[:, None])
    return k.to(dtype)[None, None].repeat(channels, 1, 1, 1)


def upfirdn2d(x: torch.Tensor, f: torch.Tensor | None, up: int = 1, down: int = 1,
              padding=(0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample by zero insertion, pad, convolve with a FIR filter, then decimate.

    x: [N, C, H, W]. f: [k] (separable: applied along W, then along H), [kh, kw], or None
    (identity). padding: (x0, x1, y0, y1) samples added to the upsampled image; negative
    values crop. The filter is scaled so that its total gain is ``gain`` (a separable filter
    gets sqrt(gain) per axis). Output: [N, C, (H*up + y0 + y1 - kh + 1 + down - 1) // down,
    same for W]. Both ``up`` and ``down`` > 1 at once is supported but never used by the
    generators (they upsample and downsample in separate calls).
    """
    c = x.shape[1]
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    passes = [(f, None)] if f.ndim == 2 else [(f, "x"), (f, "y")]
    per_pass_gain = gain ** (1 / len(passes))
    x0, x1, y0, y1 = padding
    for taps, axis in passes:
        kernel = _depthwise(taps * per_pass_gain, c, axis, x.dtype)
        kh, kw = kernel.shape[2:]
        step_y = 1 if axis == "x" else up
        step_x = 1 if axis == "y" else up
        if up > 1:
            # The transposed convolution's sample o is sample o - (k - 1) of the zero-stuffed
            # image (unpadded, H*up samples); pad or crop its ends to the requested window.
            x = F.conv_transpose2d(x, kernel, stride=(step_y, step_x), groups=c)
            pad_x = [x0 - kw + 1, x1 + step_x - kw] if axis != "y" else [0, 0]
            pad_y = [y0 - kh + 1, y1 + step_y - kh] if axis != "x" else [0, 0]
            x = F.pad(x, pad_x + pad_y)
        else:
            pad_x = [x0, x1] if axis != "y" else [0, 0]
            pad_y = [y0, y1] if axis != "x" else [0, 0]
            stride = (1 if axis == "x" else down, 1 if axis == "y" else down)
            x = F.conv2d(F.pad(x, pad_x + pad_y), kernel.flip([2, 3]), stride=stride, groups=c)
    if up > 1 and down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """Upsample [N, C, H, W] -> [N, C, H*up, W*up] with a FIR filter f [k, k] (gain up^2); the
    ``k - up`` samples the filter adds are split with the larger half before."""
    k = f.shape[-1]
    before, after = (k + up - 1) // 2, (k - up) // 2
    return upfirdn2d(x, f, up=up, padding=(before, after, before, after), gain=up ** 2)


def filtered_lrelu(x: torch.Tensor, fu: torch.Tensor | None, fd: torch.Tensor | None,
                   b: torch.Tensor, up: int, down: int, padding, gain: float, slope: float,
                   clamp: float | None) -> torch.Tensor:
    """StyleGAN3's alias-free nonlinearity (paper Sec. 3.2): add bias b [C], upsample by ``up``
    with the low-pass fu, then ``clamp(gain * lrelu(.))``, then low-pass fd and keep every
    ``down``-th sample. padding (x0, x1, y0, y1) applies to the upsampled image (see
    ``upfirdn2d``). The plain reference; ``filtered_lrelu_fused`` is the compiled path."""
    x = upfirdn2d(bias_act(x, b), fu, up=up, padding=padding, gain=up ** 2)
    return upfirdn2d(bias_act(x, slope=slope, gain=gain, clamp=clamp), fd, down=down)


_fused = None


def filtered_lrelu_fused(x, fu, fd, b, up, down, padding, gain, slope, clamp):
    """``filtered_lrelu`` compiled by ``torch.compile`` (inductor: C++ on CPU, Triton and
    cuDNN on CUDA): the bias, activation, gain and clamp are fused into the passes around the
    resampling convolutions, which run channels-last. Same arguments and results (within
    float rounding) as ``filtered_lrelu``, which stays the reference it is tested against.

    One graph per layer shape and batch size, compiled at its first call (seconds to a
    minute each on a busy CPU): dynamic shapes trip inductor on these grouped convolutions,
    so the recompile limit is raised to cover a generator's 16 layers at a few batch sizes.
    """
    global _fused
    if _fused is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        _fused = torch.compile(filtered_lrelu, dynamic=False, fullgraph=True)
    return _fused(x, fu, fd, b, up, down, padding, gain, slope, clamp)


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


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor,
                     demodulate: bool = True, padding: int = 0, up: int = 1,
                     blur: torch.Tensor | None = None, gain: torch.Tensor | float = 1.0,
                     fused: bool = True) -> torch.Tensor:
    """Modulated convolution (StyleGAN2 paper, Eq. 1-3), as both generators use it.

    x [N, I, H, W], weight [O, I, k, k], styles [N, I]. Sample n is correlated with the
    kernel w'[o, i] = weight[o, i] * styles[n, i] * d[n, o] * gain, where the demodulation
    d[n, o] = 1 / sqrt(sum_{i,k} (weight[o, i] * styles[n, i])^2 + 1e-8) gives every output
    channel unit L2 norm (d = 1 without ``demodulate``). ``padding`` zeros on each side.

    up > 1 (StyleGAN2's conv0): the kernel is applied as a true convolution (flipped) to x
    with zeros inserted between samples (a strided transposed convolution), then the FIR
    ``blur`` [kf, kf] (gain up^2) suppresses the spectral images; output [N, O, H*up, W*up]
    for k = 3, ``padding`` ignored.

    ``fused`` builds per-sample kernels and runs one grouped convolution; otherwise x is
    scaled by ``styles`` before and by ``d * gain`` after one shared convolution (cheaper for
    large batches). Demodulation cancels any per-output-channel scale of ``weight`` and any
    per-sample scale of ``styles``; for float16 x both are first scaled to a largest
    magnitude of 1 / sqrt(I k k) and 1, which keeps the scaled activations in range.
    """
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape
    if demodulate:
        if x.dtype == torch.float16:
            fan_in = in_channels * kh * kw
            weight = weight / (weight.abs().amax(dim=[1, 2, 3], keepdim=True) * math.sqrt(fan_in))
            styles = styles / styles.abs().amax(dim=1, keepdim=True)
        # sum_{i,k} (w s)^2 = sum_i s_i^2 sum_k w_ik^2: no per-sample kernels needed.
        energy = styles.square() @ weight.square().sum(dim=[2, 3]).t()  # [N, O]
        out_scale = (energy + 1e-8).rsqrt() * gain
    else:
        out_scale = styles.new_ones([n, 1]) * gain  # no host copy: CUDA-graph capturable

    if fused:
        kernels = weight[None] * styles[:, None, :, None, None] * out_scale[..., None, None, None]
        kernels = kernels.to(x.dtype)  # [N, O, I, k, k]
        x = x.reshape(1, n * in_channels, *x.shape[2:])
        if up == 1:
            x = F.conv2d(x, kernels.reshape(n * out_channels, in_channels, kh, kw),
                         padding=padding, groups=n)
        else:  # transposed convolutions take [in, out, k, k] kernels
            x = F.conv_transpose2d(x, kernels.transpose(1, 2).reshape(n * in_channels,
                                                                      out_channels, kh, kw),
                                   stride=up, groups=n)
        x = x.reshape(n, out_channels, *x.shape[2:])
    else:
        x = x * styles.to(x.dtype)[:, :, None, None]
        w = weight.to(x.dtype)
        if up == 1:
            x = F.conv2d(x, w, padding=padding)
        else:
            x = F.conv_transpose2d(x, w.transpose(0, 1), stride=up)
        x = x * out_scale.to(x.dtype)[:, :, None, None]
    if up > 1:
        # The transposed convolution gives (H - 1) up + k samples; the blur brings them to H up.
        excess = blur.shape[-1] - kh + up - 1
        before, after = (excess + 1) // 2, excess // 2
        x = upfirdn2d(x, blur, padding=(before, after, before, after), gain=up ** 2)
    return x


class FullyConnectedLayer(nn.Module):
    """y = act(x (scale W)^T + lr_multiplier b), the equalised-learning-rate linear layer.

    weight W [out, in] is stored as N(0, weight_init^2) / lr_multiplier and multiplied at run
    time by scale = lr_multiplier / sqrt(in); bias b [out] is stored as bias_init /
    lr_multiplier (a scalar or [out]). ``activation``: 'linear' or 'lrelu' (slope 0.2, then
    times sqrt 2 to keep unit variance)."""

    def __init__(self, in_features: int, out_features: int, activation: str = "linear",
                 lr_multiplier: float = 1.0, weight_init: float = 1.0, bias_init=0.0):
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}")
        self.activation, self.lr_multiplier = activation, lr_multiplier
        self.scale = lr_multiplier / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.randn([out_features, in_features])
                                   .mul_(weight_init / lr_multiplier))
        bias = torch.zeros([out_features]) + torch.as_tensor(bias_init, dtype=torch.float32)
        self.bias = nn.Parameter(bias / lr_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype) * self.scale,
                     self.bias.to(x.dtype) * self.lr_multiplier)
        return y if self.activation == "linear" else F.leaky_relu(y, 0.2) * SQRT2
