"""Checkpoint formats: NVIDIA pickles (and their refusal of anything but data), rosinality
checkpoints, our safetensors export."""

import builtins
import dataclasses
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from server.checkpoints import (UnsafePickleError, detect_format, load_generator,
                                load_network_pickle, save_generator)
from server.checkpoints.nvidia_pickle import PersistentObject, module_state_dict, submodule
from server.checkpoints.stylegan import (build_generator, config_from_network, estimate_w_avg,
                                         rosinality_to_official)
from server.models import StyleGAN2Config, StyleGAN2Generator
from tests.support.stylegan_fixtures import (SMALL_SG3_R, SMALL_SG3_T, TINY_SG2,
                                             official_init_kwargs, official_keys,
                                             official_to_rosinality, random_generator,
                                             storage_bytes_calling, write_nvidia_pickle,
                                             write_pickle_calling, write_rosinality_checkpoint)


def assert_same_generator(G, loaded):
    assert loaded.config == G.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ours, theirs = G.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(G(z), loaded(z))


TF_CONVERTED_SG2 = dataclasses.replace(TINY_SG2, num_fp16_res=0, conv_clamp=None)  # as legacy.py


@pytest.mark.parametrize("config, repo", [
    (TINY_SG2, "stylegan2-ada"), (TF_CONVERTED_SG2, "stylegan2-ada-legacy"),
    (TINY_SG2, "stylegan3"), (SMALL_SG3_T, "stylegan3"), (SMALL_SG3_R, "stylegan3")])
def test_nvidia_pickle_loads_without_running_its_source(tmp_path, config, repo):
    G = random_generator(config, seed=3)
    path, marker = tmp_path / "network-snapshot.pkl", tmp_path / "module_src-ran"
    write_nvidia_pickle(path, G, repo, marker_path=marker)
    assert detect_format(path) == "nvidia-pickle"
    assert_same_generator(G, load_generator(path))
    assert not marker.exists()


def test_network_pickle_records(tmp_path):
    G = random_generator(TINY_SG2)
    write_nvidia_pickle(tmp_path / "net.pkl", G, "stylegan2-ada")
    data = load_network_pickle(tmp_path / "net.pkl")
    assert set(data) == {"G", "D", "G_ema", "augment_pipe", "training_set_kwargs"}
    G_ema = data["G_ema"]
    assert isinstance(G_ema, PersistentObject) and G_ema.class_name == "Generator"
    assert type(G_ema.init_kwargs["synthesis_kwargs"]) is dict  # dnnlib.util.EasyDict -> dict
    assert G_ema.init_kwargs["synthesis_kwargs"]["channel_base"] == 256
    assert_same_generator(G, load_generator(tmp_path / "net.pkl", key="G"))
    with pytest.raises(KeyError, match="'G_smooth'"):
        load_generator(tmp_path / "net.pkl", key="G_smooth")


def test_unsupported_generator_options_are_named(tmp_path):
    G = random_generator(TINY_SG2)
    kwargs = official_init_kwargs(G, "stylegan2-ada")
    kwargs["synthesis_kwargs"]["architecture"] = "resnet"
    write_nvidia_pickle(tmp_path / "resnet.pkl", G, "stylegan2-ada",
                        extra_G_ema_state={"_init_kwargs": kwargs})
    with pytest.raises(ValueError, match="architecture='resnet'"):
        load_generator(tmp_path / "resnet.pkl")


HOSTILE = [
    (os.system, lambda m: (f"touch {m}",), f"{os.system.__module__}.system"),
    (builtins.exec, lambda m: (f"open({str(m)!r}, 'w').close()",), "builtins.exec"),
    (builtins.eval, lambda m: (f"open({str(m)!r}, 'w').close()",), "builtins.eval"),
    (torch.save, lambda m: ({}, str(m)), "torch.serialization.save"),
]


@pytest.mark.parametrize("func, args, name", HOSTILE, ids=[h[2] for h in HOSTILE])
@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-G_ema"])
def test_pickle_calling_anything_else_is_refused(tmp_path, func, args, name, nested):
    marker = tmp_path / "side-effect"
    G = random_generator(TINY_SG2) if nested else None
    write_pickle_calling(tmp_path / "evil.pkl", func, args(marker), G=G)
    with pytest.raises(UnsafePickleError, match=f"'{name}'"):
        load_generator(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-G_ema"])
def test_storage_bytes_are_loaded_weights_only(tmp_path, nested):
    """torch.storage._load_from_bytes would unpickle the inner stream with weights_only=False."""
    marker = tmp_path / "side-effect"
    payload = storage_bytes_calling(os.system, (f"touch {marker}",))
    write_pickle_calling(tmp_path / "evil.pkl", torch.storage._load_from_bytes, (payload,),
                         G=random_generator(TINY_SG2) if nested else None)
    with pytest.raises(UnsafePickleError, match="weights_only"):
        load_generator(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_rosinality_mapping_round_trips_bit_exactly():
    G = random_generator(TINY_SG2)
    ros, latent_avg = official_to_rosinality(G.state_dict(), G.config)
    config, back = rosinality_to_official(ros, latent_avg)
    # rosinality files carry no fp16 / clamp settings
    assert config == dataclasses.replace(G.config, num_fp16_res=0, conv_clamp=None)
    official = G.state_dict()
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in official)


def test_rosinality_mapping_matches_both_official_key_lists():
    with torch.device("meta"):
        official = StyleGAN2Generator(StyleGAN2Config()).state_dict()
    ros, latent_avg = official_to_rosinality(official, StyleGAN2Config())
    ros_keys = dict(official_keys("rosinality-g_ema-1024"))
    assert {k: list(v.shape) for k, v in ros.items()} == ros_keys
    assert list(latent_avg.shape) == [512]
    ros_file = {k: torch.empty(shape, device="meta") for k, shape in ros_keys.items()}
    config, converted = rosinality_to_official(ros_file, torch.empty([512], device="meta"))
    assert config == StyleGAN2Config()
    official_keys_1024 = dict(official_keys("stylegan2-ada-G_ema-1024"))
    assert {k: list(v.shape) for k, v in converted.items()} == official_keys_1024


def test_rosinality_checkpoints_load(tmp_path):
    G = random_generator(dataclasses.replace(TINY_SG2, num_fp16_res=0, conv_clamp=None))
    write_rosinality_checkpoint(tmp_path / "converted.pt", G)
    assert detect_format(tmp_path / "converted.pt") == "torch"
    assert_same_generator(G, load_generator(tmp_path / "converted.pt"))

    # A training checkpoint: options namespace, no latent_avg -> w_avg estimated from the mapping.
    write_rosinality_checkpoint(tmp_path / "train.pt", G, latent_avg=False, training=True)
    loaded = load_generator(tmp_path / "train.pt")
    assert torch.equal(loaded.mapping.w_avg, estimate_w_avg(G))
    assert not torch.equal(loaded.mapping.w_avg, G.mapping.w_avg)
    torch.save({"g": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'g_ema'"):
        load_generator(tmp_path / "other.pt")


@pytest.mark.parametrize("config", [TINY_SG2, SMALL_SG3_R], ids=["stylegan2", "stylegan3-r"])
def test_safetensors_export_round_trips_bit_exactly(tmp_path, config):
    G = random_generator(config, seed=5)
    save_generator(G, tmp_path / "g.safetensors")
    assert detect_format(tmp_path / "g.safetensors") == "safetensors"
    assert_same_generator(G, load_generator(tmp_path / "g.safetensors"))


def test_foreign_files_are_rejected_by_name(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a generator exported by save_generator"):
        load_generator(tmp_path / "plain.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a safetensors file, a torch checkpoint or a network"):
        load_generator(tmp_path / "notes.txt")
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="expected a network pickle holding a dict"):
        load_generator(tmp_path / "list.pkl")


def test_tensors_that_do_not_fit_the_config_are_reported(tmp_path):
    write_nvidia_pickle(tmp_path / "sg.pkl", random_generator(TINY_SG2))
    G_ema = load_network_pickle(tmp_path / "sg.pkl")["G_ema"]
    conv0 = submodule(G_ema, "synthesis.b8.conv0").state
    conv0["_parameters"]["weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(ValueError, match="(?s)do not fit a stylegan2 generator.*b8.conv0.weight"):
        build_generator(config_from_network(G_ema), module_state_dict(G_ema))


def test_hostile_pickles_do_run_under_a_plain_unpickler(tmp_path):
    """Control for the refusal tests: unpickled normally, these files do leave their mark
    (a storage record too: torch.storage._load_from_bytes uses weights_only=False)."""
    exec_marker, storage_marker = tmp_path / "exec-ran", tmp_path / "storage-ran"
    write_pickle_calling(tmp_path / "exec.pkl", builtins.exec,
                         (f"open({str(exec_marker)!r}, 'w').close()",))
    write_pickle_calling(tmp_path / "storage.pkl", torch.storage._load_from_bytes,
                         (storage_bytes_calling(os.system, (f"touch {storage_marker}",)),))
    for name in ("exec.pkl", "storage.pkl"):
        with open(tmp_path / name, "rb") as f:
            pickle.load(f)
    assert exec_marker.exists() and storage_marker.exists()
