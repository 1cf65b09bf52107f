"""StyleGAN3's filtered leaky ReLU: the compiled (fused) path against the plain reference."""

import pytest
import torch

from server.models.ops import filtered_lrelu, filtered_lrelu_fused
from server.models.stylegan3 import set_fused_lrelu
from tests.support.stylegan_fixtures import SMALL_SG3_R, SMALL_SG3_T, random_generator


def layer_inputs(layer, batch=2, device="cpu", dtype=torch.float32, seed=0):
    """A layer's own input shape, filters and padding, with inputs large enough to clamp."""
    side = layer.in_size + layer.conv_kernel - 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layer.out_channels, side, side, generator=g) * 100
    act_gain, slope = (1.0, 1.0) if layer.is_torgb else (2 ** 0.5, 0.2)
    args = (layer.up_filter, layer.down_filter, layer.bias.detach(), layer.up_factor,
            layer.down_factor, layer.padding, act_gain, slope, layer.conv_clamp)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), tuple(a.to(**to) if torch.is_tensor(a) else a for a in args)


def test_plain_filtered_lrelu_is_the_definition():
    """Bias, zero insertion, filter, gain * lrelu, clamp, filter, decimation written out with
    a dense zero-stuffed image and one 2-D convolution per filter (a radial down filter)."""
    layer = getattr(random_generator(SMALL_SG3_R).synthesis, "L0_36_16")
    x, (fu, fd, b, up, down, padding, gain, slope, clamp) = layer_inputs(layer, batch=1)
    x = x * 4
    y = x + b[None, :, None, None]
    stuffed = torch.zeros(*y.shape[:2], y.shape[2] * up, y.shape[3] * up)
    stuffed[:, :, ::up, ::up] = y
    x0, x1, y0, y1 = padding
    padded = torch.nn.functional.pad(stuffed, [x0, x1, y0, y1])
    c = y.shape[1]
    fu2 = torch.outer(fu, fu) * up ** 2
    y = torch.nn.functional.conv2d(padded, fu2.flip([0, 1]).expand(c, 1, -1, -1), groups=c)
    y = (torch.nn.functional.leaky_relu(y, slope) * gain).clamp(-clamp, clamp)
    y = torch.nn.functional.conv2d(y, fd.flip([0, 1]).expand(c, 1, -1, -1), groups=c)
    want = y[:, :, ::down, ::down]
    got = filtered_lrelu(x, fu, fd, b, up, down, padding, gain, slope, clamp)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)  # inputs ~400: 2e-6 relative
    unclamped = filtered_lrelu(x, fu, fd, b, up, down, padding, gain, slope, None)
    assert (got - unclamped).abs().max() > 1                      # the clamp was exercised
    assert got.shape == (1, 16, layer.out_size, layer.out_size)


@pytest.mark.slow
def test_fused_equals_plain_on_cpu():
    """One compiled graph (about a minute on a busy 2-core CPU): a config-R layer, separable
    4x-tap upsampling filter and radial downsampling filter."""
    layer = getattr(random_generator(SMALL_SG3_R).synthesis, "L0_36_16")
    x, args = layer_inputs(layer)
    with torch.no_grad():
        plain = filtered_lrelu(x / 100, *args)
        fused = filtered_lrelu_fused(x / 100, *args)
    assert fused.shape == plain.shape == (2, 16, 36, 36)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [SMALL_SG3_T, SMALL_SG3_R], ids=["T", "R"])
def test_fused_equals_plain_on_cuda(config):
    """Every layer kind (separable and radial filters, cropping padding, ToRGB) in float32
    within 1e-5 and float16 within float16 rounding, then whole generators."""
    G = random_generator(config).cuda()
    for name in G.synthesis.layer_names:
        layer = getattr(G.synthesis, name)
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
            x, args = layer_inputs(layer, device="cuda", dtype=dtype)
            x = x / 100
            with torch.no_grad():
                plain = filtered_lrelu(x, *args)
                fused = filtered_lrelu_fused(x, *args)
            assert fused.dtype == dtype
            torch.testing.assert_close(fused.float(), plain.float(), atol=tol, rtol=0)
    ws = G.mapping(torch.randn([2, G.z_dim], device="cuda"))
    with torch.no_grad():
        plain = G.synthesis(ws, force_fp32=True)
        set_fused_lrelu(G, True)
        fused = G.synthesis(ws, force_fp32=True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
