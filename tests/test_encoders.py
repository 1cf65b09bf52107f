"""Photo encoders (e4e, ReStyle-pSp/e4e for StyleGAN2 and StyleGAN3): official names, the
official forward passes and ReStyle's refinement loop, strict loading of the official files.

tests/data/encoders/*.npz hold what the official classes computed on the CPU from the weights
of ``encoder_fixtures.random_encoder_state`` (64 x 64 inputs: the architecture is defined
for any multiple of 16; ReStyle's loop with its feedback pooled to 64 instead of 256, and
tiny generators of latent width 512 from ``stylegan_fixtures.random_generator``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.support.encoder_fixtures import DATA, random_encoder_state, write_encoder_checkpoint
from server.checkpoints.encoders import (EncoderCheckpointError, check_generator, encoder_keys,
                                         load_encoder)
from server.models import StyleGAN2Config, StyleGAN3Config
from server.models.encoders import E4EEncoder, PhotoEncoder, ReStyleEncoder
from tests.support.stylegan_fixtures import random_generator

TOLERANCE = 1e-5
MANIFEST = DATA.parent / "encoder_checkpoint_keys.json"
FILES = {"e4e_ffhq_encode": ("e4e", 18), "restyle_psp_ffhq_encode": ("restyle_psp", 18),
         "restyle_e4e_ffhq_encode": ("restyle_e4e", 18), "restyle_pSp_ffhq": ("restyle_psp", 16),
         "restyle_e4e_ffhq": ("restyle_e4e", 16)}
GENERATORS = {"sg2": StyleGAN2Config(img_resolution=16, z_dim=512, w_dim=512, mapping_layers=8),
              "sg3": StyleGAN3Config.preset("r", 16, z_dim=512, w_dim=512, channel_base=512,
                                            channel_max=16, mapping_layers=2)}


def built(kind: str, n_styles: int, seed: int):
    net = (E4EEncoder(n_styles) if kind == "e4e" else
           ReStyleEncoder(n_styles, progressive=kind == "restyle_e4e"))
    net.load_state_dict(random_encoder_state(kind, n_styles, seed), strict=True, assign=True)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize("name", FILES)
def test_module_names_and_shapes_are_the_official_ones(name):
    official = json.loads(MANIFEST.read_text())[name]["tensors"]
    ours = {f"encoder.{k}": v for k, v in encoder_keys(*FILES[name]).items()}
    assert list(ours.items()) == list(official.items())


def test_e4e_forward_matches_the_official_encoder():
    ref = np.load(DATA / "e4e.npz")
    net = built("e4e", 18, int(ref["seed"]))
    with torch.no_grad():
        codes = net(torch.from_numpy(ref["x"]))
    assert codes.shape == (1, 18, 512)
    np.testing.assert_allclose(codes.numpy(), ref["codes"], atol=TOLERANCE, rtol=0)
    assert np.abs(ref["codes"][0, 1:] - ref["codes"][0, :1]).min() > 0   # every delta applied


@pytest.mark.parametrize("kind", ["restyle_psp", "restyle_e4e"])
@pytest.mark.parametrize("family", ["sg2", "sg3"])
def test_restyle_forward_and_refinement_match_the_official_loop(kind, family):
    ref = np.load(DATA / f"{kind}_{family}.npz")
    n_styles = ref["latents"].shape[-2]
    net = built(kind, n_styles, int(ref["seed"]))
    with torch.no_grad():
        codes = net(torch.from_numpy(ref["x6"]))
    np.testing.assert_allclose(codes.numpy(), ref["codes"], atol=TOLERANCE, rtol=0)

    G = random_generator(GENERATORS[family], seed=int(ref["generator_seed"]))
    average = torch.from_numpy(ref["latent_avg"]).reshape(-1, 512).expand(n_styles, -1)
    encoder = PhotoEncoder(net, average, generator="stylegan3" if family == "sg3" else "stylegan2",
                           iterations=2)
    latents, bases = [], []

    def synthesize(ws):
        # The encoder is compared pass by pass: each pass sees the official generator's image
        # (the average image first, then the previous pass's), as a random-weight encoder
        # amplifies generator differences of a few 1e-6 a hundredfold over the loop. The
        # generators themselves are held to the official ones in test_stylegan2/3.
        bases.append(ws.clone())
        ours = G.synthesis(ws, noise_mode="const", force_fp32=True)
        if len(bases) == 1:                                # the official average image
            return torch.from_numpy(ref["average_image"])[None]
        return torch.from_numpy(ref["images"][len(bases) - 2])[None].expand_as(ours)

    with torch.no_grad():
        ws = encoder.encode(torch.from_numpy(ref["x"]), synthesize, size=64,
                            on_iteration=lambda i, w, image: latents.append(w.clone()))
    assert torch.equal(bases[0][0], average)              # the average image comes first
    np.testing.assert_allclose(torch.stack(latents)[:, 0].numpy(), ref["latents"],
                               atol=TOLERANCE, rtol=0)
    assert torch.equal(ws, latents[-1])


def test_checkpoints_load_strictly_and_refuse_everything_else(tmp_path):
    path = write_encoder_checkpoint(tmp_path / "restyle_e4e_ffhq.pt", "restyle_e4e", 16,
                                    generator="stylegan3",
                                    extra={"global_step": 3, "best_val_loss": 0.5,
                                           "optimizer": {"state": {}, "param_groups": []}})
    assert path.stat().st_size < 40 << 20                # shared storages are stored once
    encoder = load_encoder(path)
    assert (encoder.kind, encoder.generator, encoder.n_styles, encoder.iterations) == \
        ("restyle_e4e", "stylegan3", 16, 3)
    assert encoder.latent_avg.shape == (16, 512)
    assert torch.equal(encoder.latent_avg[0], encoder.latent_avg[15])     # [512] repeated
    reference = random_encoder_state("restyle_e4e", 16)
    assert torch.equal(encoder.net.styles[5].linear.weight, reference["styles.5.linear.weight"])
    assert not any(p.requires_grad for p in encoder.net.parameters())

    e4e = load_encoder(write_encoder_checkpoint(tmp_path / "e4e.pt", "e4e", 18))
    assert (e4e.kind, e4e.generator, e4e.iterations, e4e.add_average) == \
        ("e4e", "stylegan2", 1, True)
    check_generator(e4e, SimpleNamespace(num_ws=18, w_dim=512))         # a StyleGAN2 1024
    with pytest.raises(EncoderCheckpointError, match="trained for a stylegan2 generator"):
        check_generator(e4e, random_generator(GENERATORS["sg3"]))

    # a ReStyle file whose opts say e4e but whose tensors are ReStyle's
    bad = torch.load(path, weights_only=False)
    bad["opts"]["encoder_type"] = "Encoder4Editing"
    torch.save(bad, tmp_path / "mislabelled.pt")
    with pytest.raises(EncoderCheckpointError, match="do not fit a e4e encoder"):
        load_encoder(tmp_path / "mislabelled.pt")
    bad["opts"]["encoder_type"] = "ResNetBackboneEncoder"
    torch.save(bad, tmp_path / "resnet.pt")
    with pytest.raises(EncoderCheckpointError, match="a ResNetBackboneEncoder encoder"):
        load_encoder(tmp_path / "resnet.pt")
    torch.save({"g_ema": {}, "latent_avg": torch.zeros(512)}, tmp_path / "generator.pt")
    with pytest.raises(EncoderCheckpointError, match="not an encoder checkpoint"):
        load_encoder(tmp_path / "generator.pt")
    (tmp_path / "evil.pt").write_bytes(_pickle_calling_print())
    with pytest.raises(EncoderCheckpointError, match="cannot be read safely"):
        load_encoder(tmp_path / "evil.pt")


def _pickle_calling_print() -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return print, ("executed",)
    return pickle.dumps({"state_dict": Evil()}, protocol=2)
