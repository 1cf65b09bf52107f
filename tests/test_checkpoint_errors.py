"""A file that cannot be used is named as what it is, with its path; torch's advice to load a
file unsafely never reaches the user (``server.checkpoints.torch_file``, ``identify``)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from server.checkpoints.deca import load_deca_encoder
from server.checkpoints.nvidia_pickle import UnsafePickleError
from server.checkpoints.diffusionrig import load_diffusionrig
from server.checkpoints.stylegan import load_generator
from server.checkpoints.stylerig import save_rignet
from server.checkpoints.torch_file import CheckpointError
from server.models.rignet import ControlLayout, RigNet
from tests.support.stylegan_fixtures import TINY_SG2, random_generator, write_nvidia_pickle


class Hostile:
    def __reduce__(self):
        return (os.system, ("echo hostile",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wrong")
    torch.save({"denoisingUNet.input_blocks.0.0.weight": torch.zeros(2)}, folder / "unet.pt")
    save_rignet(RigNet(4, 8, layout=ControlLayout(2)), folder / "rignet.safetensors")
    with open(folder / "hostile.pt", "wb") as f:
        pickle.dump({"x": Hostile()}, f, protocol=2)
    write_nvidia_pickle(folder / "sg2.pkl", random_generator(TINY_SG2, seed=1),
                        repo="stylegan2-ada")
    whole = (folder / "sg2.pkl").read_bytes()
    (folder / "truncated.pkl").write_bytes(whole[: len(whole) // 2])
    return folder


def test_a_wrong_kind_file_is_named_as_what_it_is(files):
    with pytest.raises(CheckpointError, match="it is a DiffusionRig checkpoint"):
        load_generator(files / "unet.pt")
    with pytest.raises(CheckpointError, match="it is a RigNet file"):
        load_generator(files / "rignet.safetensors")
    with pytest.raises(CheckpointError, match="it is a DiffusionRig checkpoint"):
        load_deca_encoder(files / "unet.pt")


@pytest.mark.parametrize("load", [load_generator, load_deca_encoder, load_diffusionrig])
def test_hostile_files_are_refused_without_unsafe_advice(files, load, capfd):
    with pytest.raises((CheckpointError, UnsafePickleError)) as err:
        load(files / "hostile.pt")
    message = str(err.value)
    assert str(files / "hostile.pt") in message
    assert "weights_only" not in message and "trusted source" not in message
    assert "hostile" not in capfd.readouterr().out              # nothing ran


def test_a_truncated_file_names_its_path(files):
    with pytest.raises(CheckpointError, match=str(files / "truncated.pkl")):
        load_generator(files / "truncated.pkl")
    assert load_generator(files / "sg2.pkl").img_resolution == TINY_SG2.img_resolution
