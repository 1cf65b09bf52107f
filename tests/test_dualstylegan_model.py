"""DualStyleGAN's networks and files: equality with the official code on fixtures
(tests/support/dualstylegan_fixtures.py says how they were made), strict loading of the official
layouts, routing of the structure and colour weights, refusal of anything else."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from tests.support.dualstylegan_fixtures import (MANIFESTS, OFFICIAL, SEEDS, TINY, TINY_ENCODER,
                                                 TINY_SAMPLER, WEIGHTS_DEFAULT, WEIGHTS_MIXED,
                                                 official_generator_state, official_inputs,
                                                 official_keys, pattern_state, random_dualstylegan,
                                                 random_encoder, random_sampler, write_encoder_pt,
                                                 write_exstyle_codes, write_generator_pt,
                                                 write_sampler_pt)
from server.checkpoints.diffusionrig import check_state_dict
from server.checkpoints.dualstylegan import (CheckpointMismatch, _finish, dualstylegan_from_state,
                                             encoder_config, generator_config, load_dualstylegan,
                                             load_encoder, load_sampler, read_exstyle_codes)
from server.models.dualstylegan import DualStyleGAN, DualStyleGANConfig
from server.models.psp_encoder import PSPEncoder, PSPEncoderConfig
from server.models.style_sampler import StyleSampler, StyleSamplerConfig
from server.models.stylegan2 import StyleGAN2Config

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    with np.load(OFFICIAL) as data:
        return {**official_inputs(), **{k: data[k] for k in data.files}}


@pytest.fixture(scope="module")
def official_size():
    """The fixture's 32x32, 512-channel network with the pattern weights, in float64."""
    state = pattern_state(official_keys("generator"), SEEDS["generator"])
    return dualstylegan_from_state(state).double()


@pytest.fixture(scope="module")
def tiny():
    return random_dualstylegan(TINY, seed=3)


def as64(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array)).double()


# ------------------------------------------------------------------------ official outputs

def test_generator_config_is_read_from_the_tensors(official_size):
    config = official_size.config
    assert (config.generator.img_resolution, config.num_ws, config.structure_layers,
            config.structure_mlp, config.generator.mapping_layers) == (32, 8, 5, 2, 8)


@pytest.mark.parametrize("case, sample, weights, truncation", [
    ("image_default", 0, WEIGHTS_DEFAULT, 0.75), ("image_mixed", 1, WEIGHTS_MIXED, 1.0),
    ("image_content", 0, [0.0] * 8, 1.0)])
def test_generator_matches_official(official_size, reference, case, sample, weights,
                                    truncation):
    """One sample of each official batch (the network is per-sample), to keep it quick."""
    G, rows = official_size, slice(sample, sample + 1)
    exstyle = G.map_codes(as64(reference["exstyle_z"][rows]))
    assert (exstyle - as64(reference["exstyle_w"][rows])).abs().max() < TOLERANCE
    content = G.truncate(G.map_codes(as64(reference["content_z"][rows])), truncation)
    image = G(content, exstyle, torch.tensor(weights, dtype=torch.float64))
    assert (image - as64(reference[case][rows])).abs().max() < TOLERANCE


def test_generator_float32_matches_official_to_rounding(official_size, reference):
    """Float32 differs from the float64 reference by rounding only (the official code's own
    two mapping orders differ by 2e-5 on this random network)."""
    G = official_size.float()
    try:
        content = G.truncate(G.map_codes(torch.from_numpy(reference["content_z"][:1])), 0.75)
        exstyle = G.map_codes(torch.from_numpy(reference["exstyle_z"][:1]))
        image = G(content, exstyle, torch.tensor(WEIGHTS_DEFAULT))
    finally:
        G.double()
    assert image.dtype == torch.float32
    assert (image.double() - as64(reference["image_default"][:1])).abs().max() < 2e-4


def test_encoder_matches_official(reference):
    state = pattern_state(official_keys("encoder"), SEEDS["encoder"])
    with torch.device("meta"):
        net = PSPEncoder(encoder_config(state))
    net = _finish(net, state, "encoder", "cpu").double()
    codes = net(as64(reference["encoder_input"]))
    assert codes.shape == (2, 8, 64)
    assert (codes - as64(reference["encoder_codes"])).abs().max() < TOLERANCE


def test_sampler_matches_official(reference, tmp_path):
    state = pattern_state(official_keys("sampler"), SEEDS["sampler"])
    torch.save({part: {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part)}
                for part in ("color", "structure")}, tmp_path / "sampler.pt")
    sampler = load_sampler(tmp_path / "sampler.pt", code_dim=512).double()
    assert (sampler.config.structure_layers, sampler.config.colour_layers) == (7, 11)
    codes = sampler(as64(reference["sampler_noise"]))
    assert (codes - as64(reference["sampler_codes"])).abs().max() < TOLERANCE


# ------------------------------------------------------------------------ official layouts

def meta_tensors(keys) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in keys}


def test_full_size_official_layouts_are_recognised():
    """The official 1024 networks' names and shapes (listed from the official classes) give
    the paper's configuration and load strictly."""
    keys = json.loads(MANIFESTS.read_text())
    config, ours = generator_config(meta_tensors(keys["generator"]))
    assert config == DualStyleGANConfig()
    with torch.device("meta"):
        check_state_dict(DualStyleGAN(config), ours)
    encoder = {k[len("encoder."):]: v for k, v in meta_tensors(keys["encoder"]).items()}
    assert encoder_config(encoder) == PSPEncoderConfig()
    with torch.device("meta"):
        check_state_dict(PSPEncoder(PSPEncoderConfig()), encoder)
        check_state_dict(StyleSampler(StyleSamplerConfig()), meta_tensors(keys["sampler"]))


def test_files_in_official_layout_round_trip(tmp_path, tiny):
    write_generator_pt(tmp_path / "generator.pt", tiny)
    loaded = load_dualstylegan(tmp_path / "generator.pt")
    assert loaded.config == TINY
    codes = torch.randn(2, 2, 8, 16, generator=torch.Generator().manual_seed(0))
    weights = torch.rand(2, 8, generator=torch.Generator().manual_seed(1))
    content, exstyle = tiny.map_codes(codes[0]), tiny.map_codes(codes[1])
    assert torch.equal(loaded(content, exstyle, weights), tiny(content, exstyle, weights))

    sampler = random_sampler(TINY_SAMPLER, seed=2)
    write_sampler_pt(tmp_path / "sampler.pt", sampler)
    noise = torch.randn(3, 2, TINY_SAMPLER.noise_dim)
    assert torch.equal(load_sampler(tmp_path / "sampler.pt", 16)(noise), sampler(noise))

    encoder = random_encoder(TINY_ENCODER, seed=4)
    avg = torch.randn(16)
    write_encoder_pt(tmp_path / "encoder.pt", encoder, tiny, latent_avg=avg)
    loaded_encoder = load_encoder(tmp_path / "encoder.pt")
    image = torch.rand(1, 3, 256, 256) * 2 - 1
    assert torch.allclose(loaded_encoder(image), encoder(image) + avg, atol=1e-6)

    names = [f"style_{i:03d}.png" for i in range(5)]
    codes = {name: np.random.RandomState(i).randn(1, 8, 16) for i, name in enumerate(names)}
    write_exstyle_codes(tmp_path / "exstyle_code.npy", codes)
    read = read_exstyle_codes(tmp_path / "exstyle_code.npy")
    assert list(read) == names                       # the file's order: official style ids
    assert all(read[n].shape == (8, 16) and read[n].dtype == np.float32 for n in names)
    assert np.allclose(read[names[3]], codes[names[3]][0])


# ------------------------------------------------------------------------ weight routing

def test_structure_and_colour_weights_reach_their_layers(tiny):
    """Zero weights leave the intrinsic StyleGAN2; colour weights replace the colour layers'
    latents by T_c of the exemplar's (so the image is a plain StyleGAN2 image of that W+);
    the exemplar's structure layers matter only through structure weights, its colour
    layers only through colour weights."""
    G, n_s = tiny, TINY.structure_layers
    g = torch.Generator().manual_seed(7)
    content = G.map_codes(torch.randn(2, 8, 16, generator=g))
    exstyle = G.map_codes(torch.randn(2, 8, 16, generator=g))
    other = G.map_codes(torch.randn(2, 8, 16, generator=g))
    synthesis = G.generator.synthesis

    def weights(structure, colour):
        return torch.tensor([structure] * n_s + [colour] * (8 - n_s))

    plain = synthesis(content, noise_mode="const", fused_modconv=False)
    assert torch.allclose(G(content, exstyle, weights(0, 0)), plain, atol=1e-5)

    colour_ws = content.clone()
    for k in range(n_s, 8):
        colour_ws[:, k] = G.res[k](exstyle[:, k])
    recoloured = synthesis(colour_ws, noise_mode="const", fused_modconv=False)
    assert torch.allclose(G(content, exstyle, weights(0, 1)), recoloured, atol=1e-5)

    structure_only = G(content, exstyle, weights(1, 0))
    assert (structure_only - plain).abs().max() > 1e-2
    swap_colour = torch.cat([exstyle[:, :n_s], other[:, n_s:]], dim=1)
    swap_structure = torch.cat([other[:, :n_s], exstyle[:, n_s:]], dim=1)
    assert torch.equal(G(content, swap_colour, weights(1, 0)), structure_only)
    assert (G(content, swap_structure, weights(1, 0)) - structure_only).abs().max() > 1e-2
    colour_only = G(content, exstyle, weights(0, 1))
    assert torch.equal(G(content, swap_structure, weights(0, 1)), colour_only)
    assert (G(content, swap_colour, weights(0, 1)) - colour_only).abs().max() > 1e-2


# ------------------------------------------------------------------------ refusals

def test_generator_files_that_do_not_fit_are_refused(tmp_path, tiny):
    state = official_generator_state(tiny)
    cases = {"extra": {**state, "res.8.weight": torch.zeros(16, 16)},
             "missing": {k: v for k, v in state.items() if k != "res.6.bias"},
             "shape": {**state, "res.2.norm.style.weight": torch.zeros(3, 16)},
             "stranger": {**state, "discriminator.x": torch.zeros(1)}}
    expected = {"extra": "res.8.weight", "missing": "res.6.bias",
                "shape": "res.2.norm.style.weight", "stranger": "discriminator.x"}
    for case, broken in cases.items():
        torch.save({"g_ema": broken}, tmp_path / f"{case}.pt")
        with pytest.raises(CheckpointMismatch, match=expected[case].replace(".", r"\.")):
            load_dualstylegan(tmp_path / f"{case}.pt")
    torch.save({"g": state}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointMismatch, match="g_ema"):
        load_dualstylegan(tmp_path / "no_ema.pt")


class _Payload:
    def __reduce__(self):
        import os
        return os.system, ("touch should-not-exist",)


def test_code_files_run_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "evil.npy", np.array({"a.png": _Payload()}, dtype=object),
            allow_pickle=True)
    with pytest.raises(CheckpointMismatch, match="os.system|posix.system"):
        read_exstyle_codes(tmp_path / "evil.npy")
    assert not (tmp_path / "should-not-exist").exists()
    np.save(tmp_path / "plain.npy", np.zeros((1, 8, 16), np.float32))
    with pytest.raises(CheckpointMismatch, match="not a saved dict"):
        read_exstyle_codes(tmp_path / "plain.npy")
    write_exstyle_codes(tmp_path / "ragged.npy", {"a": np.zeros((1, 8, 16)),
                                                  "b": np.zeros((1, 7, 16))})
    with pytest.raises(CheckpointMismatch, match="'b'"):
        read_exstyle_codes(tmp_path / "ragged.npy")
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointMismatch):
        read_exstyle_codes(tmp_path / "pickle.npy")


def test_encoder_of_another_kind_is_refused(tmp_path, tiny):
    write_encoder_pt(tmp_path / "encoder.pt", random_encoder(TINY_ENCODER), tiny)
    ckpt = torch.load(tmp_path / "encoder.pt", weights_only=True)
    ckpt["opts"]["encoder_type"] = "BackboneEncoderUsingLastLayerIntoWPlus"
    torch.save(ckpt, tmp_path / "backbone.pt")
    with pytest.raises(CheckpointMismatch, match="GradualStyleEncoder"):
        load_encoder(tmp_path / "backbone.pt")
    ckpt["opts"]["encoder_type"] = "GradualStyleEncoder"
    ckpt["opts"]["start_from_latent_avg"] = True
    torch.save(ckpt, tmp_path / "no_avg.pt")
    with pytest.raises(CheckpointMismatch, match="latent_avg"):
        load_encoder(tmp_path / "no_avg.pt")


def test_config_refuses_an_even_structure_split():
    with pytest.raises(ValueError, match="odd"):
        DualStyleGANConfig(StyleGAN2Config(img_resolution=32, z_dim=16, w_dim=16), 4)
