"""StyleGAN3 generator: official tensor layout, official outputs, filters, the input transform."""

import math

import numpy as np
import pytest
import scipy.signal
import scipy.special
import torch

from server.checkpoints.stylegan import load_generator
from server.models import StyleGAN3Config, StyleGAN3Generator, make_transform, set_transform
from server.models.ops import kaiser_lowpass
from tests.support.stylegan_fixtures import (DATA, SMALL_SG3_R, SMALL_SG3_T, official_keys,
                                             random_generator)


@pytest.mark.parametrize("preset, key_file", [("t", "stylegan3-t-G_ema-1024"),
                                              ("r", "stylegan3-r-G_ema-1024")])
def test_state_dict_names_and_shapes_equal_official(preset, key_file):
    with torch.device("meta"):
        G = StyleGAN3Generator(StyleGAN3Config.preset(preset, 1024))
    assert [(k, list(v.shape)) for k, v in G.state_dict().items()] == official_keys(key_file)
    assert G.num_ws == 16


@pytest.mark.parametrize("name", ["stylegan3_t_tiny", "stylegan3_r_tiny"])
def test_output_equals_official_code(name):
    """Weights and images written by NVlabs/stylegan3 itself (CPU reference ops)."""
    G = load_generator(DATA / f"{name}.safetensors")
    expected = np.load(DATA / f"{name}_official.npz")
    z = torch.from_numpy(expected["z"])
    with torch.no_grad():
        img = G(z)
        img_trunc = G(z, truncation_psi=0.6, truncation_cutoff=3)
    assert img.dtype == torch.float32 and img.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(img.numpy(), expected["img"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(img_trunc.numpy(), expected["img_trunc"], atol=1e-5, rtol=0)


def test_lowpass_filters_equal_scipy_designs():
    """The Kaiser designs StyleGAN3 makes with scipy (firwin; windowed jinc), without scipy."""
    designs = [(12, 2.0, 12.0, 32), (24, 11.3, 9.4, 64), (12, 128.0, 56.8, 512)]
    for numtaps, cutoff, width, fs in designs:
        ours = kaiser_lowpass(numtaps, cutoff, width, fs)
        want = scipy.signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs)
        np.testing.assert_allclose(ours.numpy(), want, rtol=0, atol=1e-7)
        radial = kaiser_lowpass(numtaps, cutoff, width, fs, radial=True)
        x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
        r = np.hypot(*np.meshgrid(x, x))
        jinc = scipy.special.j1(2 * cutoff * (np.pi * r)) / (np.pi * r)
        beta = scipy.signal.kaiser_beta(scipy.signal.kaiser_atten(numtaps, width / (fs / 2)))
        want = jinc * np.outer(np.kaiser(numtaps, beta), np.kaiser(numtaps, beta))
        np.testing.assert_allclose(radial.numpy(), want / want.sum(), rtol=0, atol=1e-7)
    assert kaiser_lowpass(1, 2.0, 1.0, 16) is None


def test_batch_of_two_equals_two_singles():
    G = random_generator(SMALL_SG3_T)
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = G(z)
        singles = torch.cat([G(z[:1]), G(z[1:])])
    # Only the batch-wide style pre-normalisation (cancelled by demodulation) couples samples.
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=0)
    assert (both[0] - both[1]).abs().max() > 0.05


def test_transform_rotates_config_r_output_by_90_degrees():
    """Config R is exactly equivariant to 90 degree turns: rotating the input features by +90
    degrees must give torch.rot90 of the default image (counter-clockwise as displayed)."""
    G = random_generator(SMALL_SG3_R)
    ws = G.mapping(torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        default = G.synthesis(ws)
        set_transform(G, math.pi / 2)
        turned = G.synthesis(ws)
        set_transform(G)
        restored = G.synthesis(ws)
    assert torch.equal(restored, default)
    torch.testing.assert_close(turned, torch.rot90(default, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    assert (turned - default).abs().max() > 0.05
    assert (turned - torch.rot90(default, -1, dims=(2, 3))).abs().max() > 0.05  # not clockwise


def test_transform_translates_config_t_output():
    """Shifting by tx = 2 / resolution moves the content 2 pixels right (T is translation
    equivariant up to the residual aliasing of a small random network)."""
    G = random_generator(SMALL_SG3_T)
    ws = G.mapping(torch.randn([1, G.z_dim], generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        default = G.synthesis(ws)
        set_transform(G, 0.0, 2 / 16, 0.0)
        shifted = G.synthesis(ws)
    interior = (slice(None), slice(None), slice(3, -3), slice(5, -3))
    moved_right = (shifted - torch.roll(default, 2, dims=3))[interior].abs().max()
    moved_left = (shifted - torch.roll(default, -2, dims=3))[interior].abs().max()
    assert moved_right < 0.01 * moved_left


def test_set_transform_writes_the_inverse_of_make_transform():
    G = random_generator(SMALL_SG3_T)
    set_transform(G, 0.3, 0.1, -0.2)
    forward = torch.from_numpy(make_transform(0.3, 0.1, -0.2))
    product = G.synthesis.input.transform.double() @ forward
    torch.testing.assert_close(product, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert np.allclose(make_transform(math.pi / 2), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]])


def test_cpu_runs_fp32_and_bad_inputs_are_named():
    G = random_generator(SMALL_SG3_T)
    assert any(getattr(G.synthesis, n).use_fp16 for n in G.synthesis.layer_names)
    ws = G.mapping(torch.randn([1, 8]))
    with torch.no_grad():
        assert torch.equal(G.synthesis(ws), G.synthesis(ws, force_fp32=True))
    with pytest.raises(ValueError, match=r"ws must be \[batch, 8, 8\]"):
        G.synthesis(torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="preset"):
        StyleGAN3Config.preset("x")
