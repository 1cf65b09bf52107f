"""StyleGAN2 generator: official tensor layout, official outputs, batching, noise, truncation."""

import copy

import numpy as np
import pytest
import torch

from server.checkpoints.stylegan import load_generator
from server.models import StyleGAN2Config, StyleGAN2Generator
from server.models.ops import modulated_conv2d, setup_filter, upfirdn2d
from tests.support.stylegan_fixtures import DATA, TINY_SG2, official_keys, random_generator


@pytest.mark.parametrize("config, key_file", [
    (StyleGAN2Config(img_resolution=256, channel_base=16384), "stylegan2-ada-G_ema-256"),
    (StyleGAN2Config(img_resolution=1024), "stylegan2-ada-G_ema-1024"),
])
def test_state_dict_names_and_shapes_equal_official(config, key_file):
    with torch.device("meta"):
        G = StyleGAN2Generator(config)
    ours = [(k, list(v.shape)) for k, v in G.state_dict().items()]
    assert ours == official_keys(key_file)


def test_output_equals_official_code():
    """Weights and images written by NVlabs/stylegan2-ada-pytorch itself (CPU reference ops)."""
    G = load_generator(DATA / "stylegan2_tiny.safetensors")
    expected = np.load(DATA / "stylegan2_tiny_official.npz")
    z = torch.from_numpy(expected["z"])
    with torch.no_grad():
        img = G(z, noise_mode="const")
        img_trunc = G(z, truncation_psi=0.6, truncation_cutoff=3, noise_mode="const")
    assert img.dtype == torch.float32 and img.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(img.numpy(), expected["img"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(img_trunc.numpy(), expected["img_trunc"], atol=1e-5, rtol=0)


def test_batch_of_two_equals_two_singles():
    G = random_generator(TINY_SG2)
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = G(z)
        singles = torch.cat([G(z[:1]), G(z[1:])])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=0)
    assert (both[0] - both[1]).abs().max() > 0.1  # the two latents give different images
    with torch.no_grad():  # activations scaled around one shared conv (official fp16 batches)
        unfused = G.synthesis(G.mapping(z), fused_modconv=False)
    torch.testing.assert_close(unfused, both, atol=1e-5, rtol=0)


def test_modulated_conv_paths_agree_in_float32_and_float16():
    """Fused (per-sample kernels) and unfused (scaled activations) modulation, with 2x
    upsampling; float16 inputs (CUDA fp16 blocks) stay float16 and close; both equal the
    definition (per-sample demodulated kernels on the zero-stuffed input, then the blur)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, 8, 8, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    styles = torch.randn(2, 8, generator=g) + 1
    blur = setup_filter()
    ref = modulated_conv2d(x, w, styles, up=2, blur=blur, fused=True)
    assert ref.shape == (2, 4, 16, 16)
    kernels = w[None] * styles[:, None, :, None, None]
    kernels = kernels / kernels.square().sum(dim=[2, 3, 4], keepdim=True).sqrt()
    for n in range(2):  # transposed conv = correlation of the zero-stuffed, padded input
        stuffed = upfirdn2d(x[n:n + 1], None, up=2, padding=(2, 1, 2, 1))
        conv = torch.nn.functional.conv2d(stuffed, kernels[n].flip([2, 3]))
        want = upfirdn2d(conv, blur, padding=(1, 1, 1, 1), gain=4)
        torch.testing.assert_close(ref[n:n + 1], want, atol=1e-5, rtol=0)
    for fused in (True, False):
        out = modulated_conv2d(x, w, styles, up=2, blur=blur, fused=fused)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        half = modulated_conv2d(x.half(), w, styles, up=2, blur=blur, fused=fused)
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), ref, atol=0.01 * ref.abs().max().item(), rtol=0)


def test_noise_modes():
    G = random_generator(TINY_SG2)
    ws = G.mapping(torch.randn([1, G.z_dim]))
    with torch.no_grad():
        const = G.synthesis(ws, noise_mode="const")
        assert torch.equal(const, G.synthesis(ws, noise_mode="const"))
        random = G.synthesis(ws, noise_mode="random")
        assert not torch.allclose(random, G.synthesis(ws, noise_mode="random"))
        silent = copy.deepcopy(G)
        for name, p in silent.named_parameters():
            if name.endswith("noise_strength"):
                p.zero_()
        none = G.synthesis(ws, noise_mode="none")
        assert torch.equal(none, silent.synthesis(ws, noise_mode="const"))
        assert not torch.allclose(none, const)


def test_truncation_pulls_the_first_layers_to_w_avg():
    G = random_generator(TINY_SG2)
    z = torch.randn([3, G.z_dim])
    with torch.no_grad():
        ws = G.mapping(z)
        cut = G.mapping(z, truncation_psi=0.0, truncation_cutoff=4)
        half = G.mapping(z, truncation_psi=0.5)
    assert ws.shape == (3, G.num_ws, G.w_dim) == (3, 8, 16)
    torch.testing.assert_close(cut[:, :4], G.mapping.w_avg.expand(3, 4, -1))
    assert torch.equal(cut[:, 4:], ws[:, 4:])
    torch.testing.assert_close(half, (ws + G.mapping.w_avg) / 2)


def test_fp16_blocks_are_the_highest_resolutions_and_cpu_stays_fp32():
    cfg = StyleGAN2Config(img_resolution=32, z_dim=8, w_dim=8, channel_base=128, channel_max=8,
                          mapping_layers=1, num_fp16_res=2, conv_clamp=256)
    G = random_generator(cfg)
    fp16 = {r: G.synthesis.get_submodule(f"b{r}").use_fp16 for r in (4, 8, 16, 32)}
    assert fp16 == {4: False, 8: False, 16: True, 32: True}
    assert StyleGAN2Config(img_resolution=32, num_fp16_res=9).num_fp16_res == 3  # b4 stays fp32
    ws = G.mapping(torch.randn([2, 8]))
    with torch.no_grad():
        img = G.synthesis(ws)
        assert img.dtype == torch.float32
        assert torch.equal(img, G.synthesis(ws, force_fp32=True))


def test_upsample2d_filter_matches_direct_convolution():
    """upfirdn2d (zero insertion + flipped-kernel FIR) against a hand-written transposed conv."""
    x = torch.randn(1, 2, 5, 5)
    f = torch.tensor([1.0, 2.0, 3.0, 4.0])
    f2 = torch.outer(f, torch.tensor([1.0, 0.0, -1.0, 2.0]))
    got = upfirdn2d(x, f2, up=2, padding=(2, 1, 2, 1))
    stuffed = torch.zeros(1, 2, 10, 10)
    stuffed[:, :, ::2, ::2] = x
    padded = torch.nn.functional.pad(stuffed, [2, 1, 2, 1])
    kernel = f2.flip([0, 1])[None, None].repeat(2, 1, 1, 1)  # true convolution: flipped
    want = torch.nn.functional.conv2d(padded, kernel, groups=2)
    torch.testing.assert_close(got, want)
    assert torch.allclose(setup_filter().sum(), torch.tensor(1.0))


def test_bad_inputs_are_named():
    G = random_generator(TINY_SG2)
    with pytest.raises(ValueError, match=r"z must be \[batch, 16\]"):
        G(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"ws must be \[batch, 8, 16\]"):
        G.synthesis(torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(torch.randn(2, 8, 16), noise_mode="fixed")
    with pytest.raises(ValueError, match="power of two"):
        StyleGAN2Config(img_resolution=48)
    conditional = StyleGAN2Generator(StyleGAN2Config(img_resolution=8, z_dim=4, w_dim=4, c_dim=3,
                                                     channel_base=32, channel_max=4,
                                                     mapping_layers=1))
    assert conditional.mapping.embed.weight.shape == (4, 3)
    with pytest.raises(ValueError, match=r"c must be \[2, 3\]"):
        conditional(torch.randn(2, 4))
    assert conditional(torch.randn(2, 4), torch.eye(3)[:2]).shape == (2, 3, 8, 8)
