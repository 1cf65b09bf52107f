"""Load StyleGAN2 / StyleGAN3 generators from the official checkpoint formats, and our export.

Formats (``detect_format`` sniffs the bytes, not the suffix):
- 'nvidia-pickle': stylegan2-ada-pytorch / stylegan3 snapshot ``.pkl`` (``G_ema`` by default),
  read by the restricted unpickler of ``nvidia_pickle``; the config comes from the pickled
  ``init_kwargs`` and module attributes.
- 'torch': rosinality/stylegan2-pytorch ``.pt`` (``ckpt['g_ema']``, ``ckpt['latent_avg']``),
  read with ``torch.load(weights_only=True)``; names converted to the official ones.
- 'safetensors': ``save_generator`` output; the config is JSON in the metadata.

``load_generator(path)`` returns a ready generator: official tensor names, eval mode, no
parameter gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle
import re
from collections import OrderedDict
from os import PathLike
from pathlib import Path

import torch

from portrait_rig.files import atomic_path
from server.models.ops import setup_filter
from server.models.stylegan2 import StyleGAN2Config, StyleGAN2Generator
from server.models.stylegan3 import StyleGAN3Config, StyleGAN3Generator

from server.checkpoints.nvidia_pickle import (PersistentObject, UnsafePickleError,
                                             load_network_pickle, module_state_dict, submodule)
from server.checkpoints.torch_file import CheckpointError, read_torch_file, what_it_is

Config = StyleGAN2Config | StyleGAN3Config
Generator = StyleGAN2Generator | StyleGAN3Generator
StateDict = dict[str, torch.Tensor]

SAFETENSORS_FORMAT = "portrait-rig.stylegan"
_GENERATORS = {"stylegan2": (StyleGAN2Config, StyleGAN2Generator),
               "stylegan3": (StyleGAN3Config, StyleGAN3Generator)}
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickled value of a non-zip torch.save file


def load_generator(path: str | PathLike, device: str | torch.device = "cpu",
                   key: str = "G_ema") -> Generator:
    """Load any supported file (see module docstring). ``key`` picks the network of an
    NVIDIA pickle ('G_ema', or 'G')."""
    try:
        fmt = detect_format(path)
        if fmt == "safetensors":
            config, state = read_safetensors(path)
        elif fmt == "torch":
            config, state = read_rosinality_checkpoint(path)
        else:
            config, state = read_nvidia_pickle(path, key)
    except CheckpointError:
        raise
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (ValueError, pickle.UnpicklingError, EOFError) as exc:
        # Name what the file is rather than which tensor or class was unexpected.
        raise CheckpointError(f"{path}: not a StyleGAN generator this server reads: "
                              f"{str(exc).splitlines()[0][:300]}"
                              f"{what_it_is(Path(path), 'stylegan-generator')}") from None
    # Files without w_avg (rosinality's training checkpoints) get an estimate, as rosinality's
    # generate.py makes one.
    estimate = "mapping.w_avg" not in state
    if estimate:
        state["mapping.w_avg"] = torch.zeros([config.w_dim])
    G = build_generator(config, state, device)
    if estimate:
        G.mapping.w_avg.copy_(estimate_w_avg(G))
    return G


def build_generator(config: Config, state_dict: StateDict,
                    device: str | torch.device = "cpu") -> Generator:
    """Generator for ``config`` holding ``state_dict`` (official names, loaded strictly),
    on ``device``, in eval mode with gradients off for its parameters."""
    with torch.device("meta"):  # skip random initialisation: every tensor comes from the file
        G = _GENERATORS[config.architecture][1](config)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        G.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint tensors do not fit a {config.architecture} generator "
                         f"with {config}:\n{e}") from None
    return G.to(device).eval().requires_grad_(False)


def detect_format(path: str | PathLike) -> str:
    """'safetensors', 'torch' (zip or legacy torch.save) or 'nvidia-pickle', from the bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"  # u64 header length, then the JSON header
    magic = int.from_bytes(head[4:14], "little")
    legacy = head[:4] == b"\x80\x02\x8a\x0a" and magic == _TORCH_LEGACY_MAGIC
    if head[:4] == b"PK\x03\x04" or legacy:
        return "torch"
    if head[:1] == b"\x80":
        return "nvidia-pickle"
    raise ValueError(f"{path}: not a safetensors file, a torch checkpoint or a network pickle")


@torch.no_grad()
def generator_fingerprint(G: Generator) -> str:
    """A short hash of the generator's tensors: names what was trained for which generator
    in a way that survives renaming or moving the file (RigNet files and corpora record it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(G.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def estimate_w_avg(G: Generator, num_samples: int = 4096, seed: int = 0) -> torch.Tensor:
    """Mean of mapping(z) over ``num_samples`` fixed-seed z (unconditional generators)."""
    if G.c_dim:
        raise ValueError("cannot estimate w_avg of a conditional generator without labels")
    z = torch.randn([num_samples, G.z_dim], generator=torch.Generator().manual_seed(seed))
    return G.mapping(z.to(G.mapping.w_avg.device))[:, 0].mean(dim=0)


# --- NVIDIA network pickles ----------------------------------------------------------------

# Options that change memory layout, numerics at float rounding level, or training only.
_SG2_IGNORED = {"fp16_channels_last", "fused_modconv_default", "w_avg_beta"}
_SG3_IGNORED = {"magnitude_ema_beta", "w_avg_beta"}


def read_nvidia_pickle(path: str | PathLike, key: str = "G_ema") -> tuple[Config, StateDict]:
    """(config, official state dict) of network ``key`` of a stylegan2-ada / stylegan3 pickle."""
    data = load_network_pickle(path)
    net = data.get(key)
    if not isinstance(net, PersistentObject):
        raise KeyError(f"{path}: no network {key!r} in this pickle "
                       f"(keys: {sorted(map(str, data))})")
    return config_from_network(net), module_state_dict(net)


def config_from_network(net: PersistentObject) -> Config:
    """Our config for a pickled official ``Generator``: its init kwargs, except for settings
    whose defaults differ between the stylegan2-ada and stylegan3 repositories (fp16 blocks,
    clamping, noise, mapping depth), which are read from the module attributes."""
    state = net.state
    if net.class_name != "Generator" or "synthesis" not in (state.get("_modules") or {}):
        raise ValueError(f"expected a StyleGAN Generator, got {net.class_name}")
    if len(state.get("_init_args") or ()) > 5:
        raise ValueError("Generator pickled with positional mapping/synthesis kwargs: "
                         "not supported")
    base = {k: state[k] for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")}
    kw = net.init_kwargs
    mapping_kw = dict(kw.pop("mapping_kwargs", None) or {})
    synthesis_kw = dict(kw.pop("synthesis_kwargs", None) or {})  # stylegan2-ada nests them
    synthesis_kw.update((k, v) for k, v in kw.items() if k not in base)  # stylegan3 flattens them
    mapping_kw.pop("num_layers", None)
    common = dict(base, mapping_layers=int(submodule(net, "mapping").state["num_layers"]),
                  mapping_lr_multiplier=float(mapping_kw.pop("lr_multiplier", 0.01)))
    for name, default in (("embed_features", None), ("layer_features", None),
                          ("activation", "lrelu")):
        value = mapping_kw.pop(name, default)
        if value not in (default, base["w_dim"]):
            raise ValueError(f"unsupported mapping option {name}={value!r}")
    _reject_unknown(mapping_kw, {"w_avg_beta"}, "mapping")

    synthesis = submodule(net, "synthesis")
    if "input" in synthesis.state["_modules"]:
        fields = {f.name for f in dataclasses.fields(StyleGAN3Config)} - set(common)
        _reject_unknown(synthesis_kw, fields | _SG3_IGNORED, "synthesis")
        options = {k: _plain(v) for k, v in synthesis_kw.items() if k in fields}
        return StyleGAN3Config(**common, **options)

    for name, supported in (("architecture", "skip"), ("activation", "lrelu"), ("kernel_size", 3)):
        value = synthesis_kw.pop(name, supported)
        if value != supported:
            raise ValueError(f"unsupported StyleGAN2 option {name}={value!r} (only {supported!r})")
    blocks = [b for n, b in synthesis.state["_modules"].items() if re.fullmatch(r"b\d+", n)]
    layer = submodule(synthesis, "b4.conv1").state
    effective = dict(num_fp16_res=sum(bool(b.state.get("use_fp16")) for b in blocks),
                     conv_clamp=_plain(layer.get("conv_clamp")),
                     use_noise=bool(layer.get("use_noise", True)))
    for name in effective:
        synthesis_kw.pop(name, None)
    sg2 = dict(effective, channel_base=synthesis_kw.pop("channel_base", 32768),
               channel_max=synthesis_kw.pop("channel_max", 512),
               resample_filter=tuple(synthesis_kw.pop("resample_filter", (1, 3, 3, 1))))
    _reject_unknown(synthesis_kw, _SG2_IGNORED, "synthesis")
    return StyleGAN2Config(**common, **sg2)


def _reject_unknown(kwargs: dict, known: set, what: str) -> None:
    unknown = sorted(set(kwargs) - known)
    if unknown:
        listed = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
        raise ValueError(f"unsupported {what} options in the pickle: {listed}")


def _plain(v):
    """NumPy scalars (as pickled attributes) -> Python numbers, so configs serialise to JSON."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, tuple)) else v


# --- rosinality/stylegan2-pytorch -----------------------------------------------------------

def _rosinality_table(log2_res: int, mapping_layers: int) -> list[tuple[str, str, str]]:
    """(official name, rosinality name, kind) for every tensor rosinality stores, kinds:
    'same'; 'lead1' / 'lead2' (rosinality adds 1 / 2 leading unit dims); 'scalar' ([] vs [1]);
    'rgb_bias' ([C] vs [1, C, 1, 1]); 'filter' (rosinality's kernel is ours x up^2 = 4)."""
    rows = []
    for i in range(mapping_layers):
        rows += [(f"mapping.fc{i}.{p}", f"style.{i + 1}.{p}", "same") for p in ("weight", "bias")]
    rows.append(("synthesis.b4.const", "input.input", "lead1"))

    def conv(official, ros, noise_index, up):
        rows.extend([(f"{official}.weight", f"{ros}.conv.weight", "lead1"),
                     (f"{official}.affine.weight", f"{ros}.conv.modulation.weight", "same"),
                     (f"{official}.affine.bias", f"{ros}.conv.modulation.bias", "same"),
                     (f"{official}.noise_strength", f"{ros}.noise.weight", "scalar"),
                     (f"{official}.bias", f"{ros}.activate.bias", "same"),
                     (f"{official}.noise_const", f"noises.noise_{noise_index}", "lead2")])
        if up:
            rows.append((f"{official}.resample_filter", f"{ros}.conv.blur.kernel", "filter"))

    def torgb(official, ros):
        rows.extend([(f"{official}.weight", f"{ros}.conv.weight", "lead1"),
                     (f"{official}.affine.weight", f"{ros}.conv.modulation.weight", "same"),
                     (f"{official}.affine.bias", f"{ros}.conv.modulation.bias", "same"),
                     (f"{official}.bias", f"{ros}.bias", "rgb_bias")])

    conv("synthesis.b4.conv1", "conv1", 0, up=False)
    torgb("synthesis.b4.torgb", "to_rgb1")
    for i in range(1, log2_res - 1):
        block = f"synthesis.b{4 * 2 ** i}"
        conv(f"{block}.conv0", f"convs.{2 * i - 2}", 2 * i - 1, up=True)
        conv(f"{block}.conv1", f"convs.{2 * i - 1}", 2 * i, up=False)
        torgb(f"{block}.torgb", f"to_rgbs.{i - 1}")
        rows.append((f"{block}.resample_filter", f"to_rgbs.{i - 1}.upsample.kernel", "filter"))
    return rows


_TO_OFFICIAL = {"same": lambda t: t, "lead1": lambda t: t[0], "lead2": lambda t: t[0, 0],
                "scalar": lambda t: t.reshape([]), "rgb_bias": lambda t: t.reshape([-1]),
                "filter": lambda t: t / 4}
_TO_ROSINALITY = {"same": lambda t: t, "lead1": lambda t: t[None], "lead2": lambda t: t[None, None],
                  "scalar": lambda t: t.reshape([1]),
                  "rgb_bias": lambda t: t.reshape([1, -1, 1, 1]), "filter": lambda t: t * 4}


def rosinality_to_official(ros: StateDict, latent_avg: torch.Tensor | None = None
                           ) -> tuple[StyleGAN2Config, StateDict]:
    """Convert a rosinality ``g_ema`` state dict (+ ``latent_avg`` [w_dim]) to our config and
    the official names. The official model also keeps copies of the [1,3,3,1] resampling
    filter where rosinality has none (b4, every conv1); they are filled from rosinality's."""
    mapping_layers = sum(1 for k in ros if re.fullmatch(r"style\.\d+\.weight", k))
    num_rgbs = sum(1 for k in ros if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k))
    if not mapping_layers or "input.input" not in ros:
        raise ValueError("not a rosinality StyleGAN2 generator state dict "
                         "(no style.N / input.input tensors)")
    log2_res = num_rgbs + 2
    channels = {4: ros["input.input"].shape[1]}
    for i in range(1, log2_res - 1):
        channels[4 * 2 ** i] = ros[f"convs.{2 * i - 2}.conv.weight"].shape[1]
    channel_base, channel_max = _infer_channel_base(channels)
    w_dim, z_dim = ros["style.1.weight"].shape
    config = StyleGAN2Config(img_resolution=2 ** log2_res, z_dim=z_dim, w_dim=w_dim,
                             channel_base=channel_base, channel_max=channel_max,
                             mapping_layers=mapping_layers)
    table = _rosinality_table(log2_res, mapping_layers)
    missing = [r for _, r, _ in table if r not in ros]
    if missing:
        raise ValueError(f"rosinality state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    out = OrderedDict((o, _TO_OFFICIAL[kind](ros[r])) for o, r, kind in table)
    resample = out.get("synthesis.b8.conv0.resample_filter", setup_filter(config.resample_filter))
    for res in (2 ** i for i in range(2, log2_res + 1)):
        out[f"synthesis.b{res}.conv1.resample_filter"] = resample.clone()
    out["synthesis.b4.resample_filter"] = resample.clone()
    if latent_avg is not None:
        out["mapping.w_avg"] = latent_avg.reshape([w_dim])
    return config, out


def _infer_channel_base(channels: dict[int, int]) -> tuple[int, int]:
    channel_max = max(channels.values())
    below_max = [c * r for r, c in channels.items() if c < channel_max]
    channel_base = max(below_max, default=channel_max * max(channels))
    if any(min(channel_base // r, channel_max) != c for r, c in channels.items()):
        raise ValueError(f"channel counts {channels} do not follow "
                         "min(channel_base / resolution, channel_max)")
    return channel_base, channel_max


def read_rosinality_checkpoint(path: str | PathLike) -> tuple[StyleGAN2Config, StateDict]:
    """(config, official state dict) of a rosinality checkpoint; ``mapping.w_avg`` is absent
    when the file has no 'latent_avg'. Loaded with ``weights_only=True`` (training checkpoints
    also hold an argparse.Namespace of options, which is allowed)."""
    ckpt = read_torch_file(path, "a StyleGAN generator", "stylegan-generator",
                           allowed=(argparse.Namespace,))
    if not isinstance(ckpt, dict) or "g_ema" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: no 'g_ema' generator in this checkpoint ({keys})"
                              f"{what_it_is(Path(path), 'stylegan-generator')}")
    return rosinality_to_official(ckpt["g_ema"], ckpt.get("latent_avg"))


# --- our safetensors export -----------------------------------------------------------------

def save_generator(G: Generator, path: str | PathLike) -> None:
    """Write G's state dict (official names, float32) with its config as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in G.state_dict().items()}
    metadata = {"format": SAFETENSORS_FORMAT, "architecture": G.config.architecture,
                "config": json.dumps(G.config.to_dict())}
    with atomic_path(path) as tmp:        # replaced whole: a PTI model may be in use
        save_file(tensors, tmp, metadata=metadata)


def read_safetensors(path: str | PathLike) -> tuple[Config, StateDict]:
    """(config, state dict) of a ``save_generator`` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SAFETENSORS_FORMAT or meta.get("architecture") not in _GENERATORS:
            raise ValueError(f"{path}: not a generator exported by save_generator "
                             f"(metadata {meta})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = _GENERATORS[meta["architecture"]][0].from_dict(json.loads(meta["config"]))
    return config, state
