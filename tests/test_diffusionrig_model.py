"""DiffusionRig model: official tensor names and shapes, strict loading, and outputs equal to
the official code's on a tiny model (fixture made by tests/support/diffusionrig_fixtures.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.diffusionrig_fixtures import (CHECKPOINT_KEYS, TINY, load_fixture,
                                                 official_checkpoint_state, patterned_encoder_state)
from server.models.diffusionrig import DiffusionRig
from server.checkpoints.diffusionrig import CheckpointMismatch, check_state_dict, load_diffusionrig
from server.models.diffusionrig_unet import UNetConfig, timestep_embedding
from server.models.global_encoder import GlobalEncoder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_model() -> DiffusionRig:
    model = DiffusionRig(TINY)
    model.load_state_dict(official_checkpoint_state(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def fixture_arrays() -> dict[str, torch.Tensor]:
    return load_fixture()[1]


def test_full_size_state_dict_has_every_official_name_and_shape():
    official = json.loads(CHECKPOINT_KEYS.read_text())["tensors"]
    with torch.device("meta"):
        ours = DiffusionRig().state_dict()
    assert len(official) == 712
    assert sorted(ours) == sorted(official)
    wrong = {k: (list(v.shape), official[k]) for k, v in ours.items()
             if list(v.shape) != official[k]}
    assert not wrong


def test_full_size_strict_load_of_official_names_on_meta():
    official = json.loads(CHECKPOINT_KEYS.read_text())["tensors"]
    state = {k: torch.empty(shape, device="meta", dtype=torch.int64 if k.endswith(
        "num_batches_tracked") else torch.float32) for k, shape in official.items()}
    with torch.device("meta"):
        model = DiffusionRig()
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    assert model.denoisingUNet.input_blocks[0][0].weight.shape == (128, 12, 3, 3)


def test_load_diffusionrig_reads_official_names_strictly(tmp_path):
    state = official_checkpoint_state()
    path = tmp_path / "model000000.pt"
    torch.save(state, path)
    model = load_diffusionrig(path, TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("change, expected", [
    ("drop", "1 missing: denoisingUNet.middle_block.1.qkv.bias"),
    ("extra", "1 unexpected: denoisingUNet.middle_block.1.qkv_extra"),
    ("shape", "1 wrong shape: encoder.fc.weight: (32, 512) (expected (8, 512))"),
])
def test_strict_load_names_the_offending_tensor(tmp_path, change, expected):
    state = official_checkpoint_state()
    if change == "drop":
        del state["denoisingUNet.middle_block.1.qkv.bias"]
    elif change == "extra":
        state["denoisingUNet.middle_block.1.qkv_extra"] = torch.zeros(3)
    else:
        state["encoder.fc.weight"] = torch.zeros(32, 512)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_diffusionrig(path, TINY)


def test_loader_rejects_files_that_are_not_state_dicts(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointMismatch, match="holds a list"):
        load_diffusionrig(path, TINY)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_diffusionrig(tmp_path / "nowhere.pt", TINY)


def test_unet_eps_equals_official(tiny_model, fixture_arrays):
    a = fixture_arrays
    with torch.no_grad():
        eps = tiny_model(a["x_t"], a["t"], a["buffers"], a["z"])
    assert a["eps"].abs().max() > 0.5                      # a live network, not zeros
    torch.testing.assert_close(eps, a["eps"], rtol=0, atol=1e-5)


def test_unet_accepts_buffers_already_concatenated(tiny_model, fixture_arrays):
    a = fixture_arrays
    with torch.no_grad():
        split = tiny_model(a["x_t"], a["t"], a["buffers"], a["z"])
        joined = tiny_model(torch.cat([a["x_t"], a["buffers"]], 1), a["t"], None, a["z"])
        with pytest.raises(ValueError, match="12 input channels"):
            tiny_model(a["x_t"], a["t"], a["buffers"][:, :6], a["z"])
    assert torch.equal(split, joined)


def test_latent_and_time_both_condition_the_output(tiny_model, fixture_arrays):
    a = fixture_arrays
    with torch.no_grad():
        base = tiny_model(a["x_t"], a["t"], a["buffers"], a["z"])
        other_z = tiny_model(a["x_t"], a["t"], a["buffers"], a["z"].flip(0))
        other_t = tiny_model(a["x_t"], a["t"] + 1, a["buffers"], a["z"])
    assert (base - other_z).abs().max() > 1e-2
    assert (base - other_t).abs().max() > 1e-4


def test_encoder_equals_torchvision_resnet18(fixture_arrays):
    encoder = GlobalEncoder(64)
    encoder.load_state_dict(patterned_encoder_state(), strict=True)
    with torch.no_grad():
        z = encoder.eval()(fixture_arrays["image"])
    assert z.shape == (1, 64)
    torch.testing.assert_close(z, fixture_arrays["encoder_z"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        encoder(torch.zeros(1, 4, 32, 32))


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 2.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2 * freqs), torch.sin(2 * freqs)]))


def test_config_rejects_an_image_size_that_does_not_halve():
    with pytest.raises(ValueError, match="does not halve"):
        DiffusionRig(UNetConfig(image_size=18, model_channels=32, channel_mult=(1, 1, 1)))
