"""DualStyleGAN's files, as the official repository (williamyang1991/DualStyleGAN) ships them:

    checkpoint/encoder.pt              pSp Z+ encoder: {'state_dict': encoder.* (GradualStyle-
                                       Encoder, IR-SE-50) + decoder.* (a rosinality StyleGAN2),
                                       'opts': dict, 'latent_avg' when it was trained with one}
    checkpoint/<style>/generator.pt    {'g_ema': DualStyleGAN state dict}: generator.* (the
                                       intrinsic StyleGAN2, rosinality's names), style.* (T_s),
                                       res.* (ModRes blocks, then colour transforms)
    checkpoint/<style>/sampler.pt      {'color': N_c, 'structure': N_s} state dicts
    checkpoint/<style>/exstyle_code.npy    ``np.save`` of a dict: exemplar file name -> z+
                                       [1, L, 512] float32; refined_exstyle_code.npy the same
                                       after the paper's refinement (sec. 3.4; preferred)

Torch files load with ``torch.load(weights_only=True)`` (tensors and plain containers only).
The code files are pickled object arrays; they are read by an unpickler that builds NumPy
arrays and nothing else. Every tensor is checked by name and shape against the network the
file's tensors describe (resolution, widths, mapping depth, which layers carry ModRes
blocks), so small networks of the same architecture load too; anything else is refused with
the list of what does not fit.
"""

from __future__ import annotations

import argparse
import io
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.checkpoints.diffusionrig import CheckpointMismatch, check_state_dict
from server.checkpoints.nvidia_pickle import RestrictedUnpickler, UnsafePickleError
from server.checkpoints.stylegan import _rosinality_table, estimate_w_avg, rosinality_to_official
from server.models.dualstylegan import DualStyleGAN, DualStyleGANConfig
from server.models.psp_encoder import COARSE, MIDDLE, PSPEncoder, PSPEncoderConfig
from server.models.style_sampler import StyleSampler, StyleSamplerConfig
from server.models.stylegan2 import StyleGAN2Generator

__all__ = ["CheckpointMismatch", "ZPlusEncoder", "dualstylegan_from_state", "encoder_config",
           "generator_config", "load_dualstylegan", "load_encoder", "load_sampler",
           "read_exstyle_codes"]


def _torch_load(path: Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler names what it refused
        raise CheckpointMismatch(f"{path}: not a {what} readable without running code "
                                 f"({type(exc).__name__}: {exc})") from None


def _dict_entry(data, key: str, path: Path, what: str) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get(key), dict):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointMismatch(f"{path}: a {what} holds a dict with {key!r}, found {found}")
    return data[key]


def _finish(model: torch.nn.Module, state: dict, source: str, device) -> torch.nn.Module:
    check_state_dict(model, state, source)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------ generator

def _intrinsic(ros: dict, source: str):
    """(StyleGAN2Config, our state dict) of rosinality tensors, refusing any it leaves out."""
    try:
        config, state = rosinality_to_official(ros)
    except ValueError as exc:
        raise CheckpointMismatch(f"{source}: {exc}") from None
    known = {r for _, r, _ in _rosinality_table(int(math.log2(config.img_resolution)),
                                                config.mapping_layers)}
    unexpected = sorted(set(ros) - known)
    if unexpected:
        raise CheckpointMismatch(f"{source}: {len(unexpected)} unexpected tensors, e.g. "
                                 f"{unexpected[:4]}")
    return config, state


def generator_config(state: dict, source: str = "state dict"
                     ) -> tuple[DualStyleGANConfig, dict[str, torch.Tensor]]:
    """(configuration, state dict under our names) of an official-layout DualStyleGAN state
    dict (``ckpt['g_ema']``), read from its names and shapes alone. Raises
    ``CheckpointMismatch`` for anything that is not such a network."""
    groups = {"generator": {}, "style": {}, "res": {}}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head not in groups or not isinstance(tensor, torch.Tensor):
            raise CheckpointMismatch(f"{source}: unexpected entry {name!r} (a DualStyleGAN "
                                     "state dict holds generator.*, style.* and res.* tensors)")
        groups[head][rest] = tensor
    g_config, g_state = _intrinsic(groups["generator"], f"{source} (generator.*)")
    structure = sorted(int(m[1]) for k in groups["res"]
                       if (m := re.fullmatch(r"(\d+)\.conv\.0\.weight", k)))
    mlp = sum(1 for k in groups["style"] if re.fullmatch(r"\d+\.weight", k))
    if structure != list(range(len(structure))):
        raise CheckpointMismatch(f"{source}: ModRes blocks res.{structure} are not the first "
                                 "layers")
    try:
        config = DualStyleGANConfig(g_config, structure_layers=len(structure), structure_mlp=mlp)
    except ValueError as exc:
        raise CheckpointMismatch(f"{source}: not a DualStyleGAN: {exc}") from None
    ours = {f"generator.{k}": v for k, v in g_state.items()}
    ours["generator.mapping.w_avg"] = torch.zeros([g_config.w_dim])
    ours.update((f"style.{k}", v) for k, v in groups["style"].items())
    ours.update((f"res.{k}", v) for k, v in groups["res"].items())
    return config, ours


def dualstylegan_from_state(state: dict, device="cpu", source: str = "state dict"
                            ) -> DualStyleGAN:
    """A ``DualStyleGAN`` holding an official-layout state dict (``ckpt['g_ema']``), its
    configuration read from the tensors (``generator_config``), float32, eval mode. The
    intrinsic mapping's w_avg, which the file does not hold, is estimated from 4096
    fixed-seed z (as for rosinality generators)."""
    config, ours = generator_config(state, source)
    with torch.device("meta"):
        model = DualStyleGAN(config)
    model = _finish(model, ours, source, device)
    model.generator.mapping.w_avg.copy_(estimate_w_avg(model.generator))
    return model


def load_dualstylegan(path: str | Path, device="cpu") -> DualStyleGAN:
    """The network of an official ``generator.pt`` (its ``g_ema``) on ``device``, eval mode."""
    ckpt = _torch_load(Path(path), "DualStyleGAN generator")
    return dualstylegan_from_state(_dict_entry(ckpt, "g_ema", path, "DualStyleGAN generator.pt"),
                                   device, str(path))


# ------------------------------------------------------------------------------ exemplar codes

class _ArrayUnpickler(RestrictedUnpickler):
    """Builds NumPy arrays and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] != "numpy":
            raise UnsafePickleError(f"refusing to load global '{module}.{name}': an exemplar "
                                    "code file holds NumPy arrays only")
        return super().find_class(module, name)


def read_exstyle_codes(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """Exemplar name -> z+ code [L, C] float32, in the file's order (the official
    ``--style_id`` indexes it). Reads ``np.save``'d dicts without running anything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exemplar codes not found: {path}")
    stream = io.BytesIO(path.read_bytes())
    try:
        version = np.lib.format.read_magic(stream)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = header(stream)
        if dtype != np.dtype(object) or shape != ():
            raise ValueError(f"a {dtype} array of shape {shape}, not a saved dict")
        data = _ArrayUnpickler(stream).load()
        data = data.item() if isinstance(data, np.ndarray) and data.shape == () else data
    except UnsafePickleError as exc:
        raise CheckpointMismatch(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed file
        raise CheckpointMismatch(f"{path}: not an exemplar code file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise CheckpointMismatch(f"{path}: expected a non-empty dict of exemplar codes, got "
                                 f"{type(data).__name__}")
    codes, first = OrderedDict(), None
    for name, code in data.items():
        code = np.asarray(code)
        while code.ndim > 2 and code.shape[0] == 1:
            code = code[0]
        if (not isinstance(name, str) or code.ndim != 2 or code.dtype.kind != "f"
                or not np.isfinite(code).all() or (first is not None and code.shape != first)):
            raise CheckpointMismatch(f"{path}: entry {name!r} is not a finite z+ code "
                                     f"[1, layers, dim] like the others ({code.dtype} "
                                     f"{list(code.shape)})")
        first = code.shape
        codes[name] = code.astype(np.float32)
    return codes


# ------------------------------------------------------------------------------ sampler

def load_sampler(path: str | Path, code_dim: int, device="cpu") -> StyleSampler:
    """The official ``sampler.pt`` for codes of ``code_dim`` (the generator's z_dim); layer
    counts are read from the output sizes."""
    ckpt = _torch_load(Path(path), "style sampler")
    parts = {key: _dict_entry(ckpt, key, path, "style sampler.pt") for key in ("structure",
                                                                              "color")}
    if set(ckpt) != {"structure", "color"}:
        raise CheckpointMismatch(f"{path}: unexpected entries {sorted(set(ckpt) - set(parts))}")
    try:
        hidden, noise_dim = parts["structure"]["lin1.weight"].shape
        layers = {}
        for key in parts:
            rows = parts[key]["lin_out.weight"].shape[0]
            if rows % code_dim:
                raise ValueError(f"{key} outputs {rows} values, not whole codes of {code_dim}")
            layers[key] = rows // code_dim
    except (KeyError, ValueError, AttributeError) as exc:
        raise CheckpointMismatch(f"{path}: not a DualStyleGAN style sampler ({exc})") from None
    config = StyleSamplerConfig(noise_dim, hidden, layers["structure"], layers["color"], code_dim)
    state = {f"{key}.{name}": t for key, part in parts.items() for name, t in part.items()}
    with torch.device("meta"):
        model = StyleSampler(config)
    return _finish(model, state, str(path), device)


# ------------------------------------------------------------------------------ encoder

@dataclass
class ZPlusEncoder:
    """The pSp encoder of ``encoder.pt``: images [B, 3, 256, 256] in [-1, 1] -> z+ codes
    [B, n_styles, dim] (+ ``latent_avg`` [n_styles, dim] when trained from it)."""
    net: PSPEncoder
    latent_avg: torch.Tensor | None = None

    @property
    def n_styles(self) -> int:
        return self.net.config.n_styles

    @property
    def dim(self) -> int:
        return self.net.config.style_dim

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        codes = self.net(images)
        return codes if self.latent_avg is None else codes + self.latent_avg


def encoder_config(state: dict, source: str = "state dict") -> PSPEncoderConfig:
    """The ``PSPEncoderConfig`` of an ``encoder.*`` state dict (prefix removed), from its
    names and shapes."""
    def shape(name: str) -> tuple[int, ...]:
        if not isinstance(state.get(name), torch.Tensor):
            raise CheckpointMismatch(f"{source}: not a pSp GradualStyleEncoder (no {name})")
        return tuple(state[name].shape)

    stem, channels = shape("input_layer.0.weight")[:2]
    units = 1 + max((int(m[1]) for k in state if (m := re.match(r"body\.(\d+)\.", k))),
                    default=-1)
    stages: list[list[int]] = []
    for i in range(units):
        depth = shape(f"body.{i}.res_layer.1.weight")[0]
        if stages and stages[-1][0] == depth:
            stages[-1][1] += 1
        else:
            stages.append([depth, 1])
    n_styles = sum(1 for k in state if re.fullmatch(r"styles\.\d+\.linear\.weight", k))

    def convs(i: int, default: int) -> int:
        count = sum(1 for k in state if re.fullmatch(rf"styles\.{i}\.convs\.\d+\.weight", k))
        return count if i < n_styles else default

    try:
        return PSPEncoderConfig(channels, stem, tuple(map(tuple, stages)), n_styles,
                                shape("styles.0.linear.weight")[0],
                                (convs(0, 4), convs(COARSE, 5), convs(MIDDLE, 6)))
    except ValueError as exc:
        raise CheckpointMismatch(f"{source}: not a pSp GradualStyleEncoder: {exc}") from None


def load_encoder(path: str | Path, device="cpu") -> ZPlusEncoder:
    """The encoder of DualStyleGAN's ``encoder.pt``. Its decoder (the StyleGAN2 that trained
    it) is checked tensor by tensor and not kept: DualStyleGAN's own generator renders."""
    path = Path(path)
    ckpt = _torch_load(path, "pSp encoder")
    state = _dict_entry(ckpt, "state_dict", path, "pSp encoder.pt")
    opts = ckpt.get("opts") or {}
    if not isinstance(opts, dict):
        opts = vars(opts) if isinstance(opts, argparse.Namespace) else {}
    kind = opts.get("encoder_type", "GradualStyleEncoder")
    if kind != "GradualStyleEncoder" or opts.get("learn_in_w"):
        raise CheckpointMismatch(f"{path}: a pSp {kind} encoder (learn_in_w "
                                 f"{opts.get('learn_in_w')}); only the GradualStyleEncoder of "
                                 "DualStyleGAN's encoder.pt is supported")
    parts = {"encoder": {}, "decoder": {}}
    for name, tensor in state.items():
        head, _, rest = name.partition(".")
        if head not in parts:
            raise CheckpointMismatch(f"{path}: unexpected tensor {name!r}")
        parts[head][rest] = tensor
    decoder_config, decoder_state = _intrinsic(parts["decoder"], f"{path} (decoder.*)")
    decoder_state.setdefault("mapping.w_avg", torch.zeros([decoder_config.w_dim]))
    with torch.device("meta"):
        check_state_dict(StyleGAN2Generator(decoder_config), decoder_state, f"{path} (decoder.*)")
    config = encoder_config(parts["encoder"], str(path))
    with torch.device("meta"):
        net = PSPEncoder(config)
    net = _finish(net, parts["encoder"], str(path), device)
    latent_avg = None
    if opts.get("start_from_latent_avg"):
        avg = ckpt.get("latent_avg")
        if not isinstance(avg, torch.Tensor) or avg.shape[-1] != config.style_dim:
            raise CheckpointMismatch(f"{path}: trained from latent_avg but holds none of width "
                                     f"{config.style_dim}")
        latent_avg = avg.float().reshape(-1, config.style_dim).expand(
            config.n_styles, -1).to(device)
    return ZPlusEncoder(net, latent_avg)
