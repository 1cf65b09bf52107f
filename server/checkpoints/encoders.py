"""Load the official photo-encoder checkpoints (e4e, ReStyle-pSp, ReStyle-e4e).

Files, as their training coaches save them (``torch.save`` of a dict):

===============================  ================  =============================  ===========
file (repository)                ``encoder_type``  generator                      styles
===============================  ================  =============================  ===========
e4e_ffhq_encode.pt               Encoder4Editing   StyleGAN2 1024 (rosinality)    18
(omertov/encoder4editing)
restyle_psp_ffhq_encode.pt,      BackboneEncoder,  StyleGAN2 1024 (rosinality)    18
restyle_e4e_ffhq_encode.pt       ProgressiveBack-
(yuval-alaluf/restyle-encoder)   boneEncoder
restyle_pSp_ffhq.pt,             BackboneEncoder,  StyleGAN3-R 1024 (NVIDIA       16
restyle_e4e_ffhq.pt              ProgressiveBack-  names)
(yuval-alaluf/stylegan3-editing) boneEncoder
===============================  ================  =============================  ===========

Each holds ``state_dict`` (``encoder.*`` and ``decoder.*`` tensors), ``opts`` (the training
options: a dict, ``encoder_type`` among them) and ``latent_avg`` ([n_styles, 512] or [512]);
training snapshots add ``global_step``, ``optimizer`` and the like, which are ignored. Only
``encoder.*`` is used: the generator is the server's own (``server.checkpoints.stylegan``),
checked to be of the family and latent size the encoder was trained for.

Loading executes nothing from the file: ``torch.load(weights_only=True)`` (memory-mapped when
the file is a zip archive, so the decoder and optimizer tensors are never read), with
``pathlib.PosixPath`` and ``argparse.Namespace`` allowed as option values. The encoder's
tensors must match our module exactly (strict loading); any other file, and the ResNet-34 or
pSp variants, are refused with the reason.
"""

from __future__ import annotations

import argparse
import pathlib
from os import PathLike

import torch

from server.models.encoders import STYLE_DIM, E4EEncoder, PhotoEncoder, ReStyleEncoder

SUPPORTED = {"Encoder4Editing": "e4e", "BackboneEncoder": "restyle_psp",
             "ProgressiveBackboneEncoder": "restyle_e4e"}
# ReStyle's default number of passes at test time: restyle-encoder options/test_options.py (5),
# stylegan3-editing inversion/options/test_options.py (3).
DEFAULT_ITERATIONS = {"stylegan2": 5, "stylegan3": 3}


class EncoderCheckpointError(ValueError):
    """A file that is not an encoder checkpoint we can load; the message says why."""


def load_encoder(path: str | PathLike, device: str | torch.device = "cpu") -> PhotoEncoder:
    """The encoder in an official checkpoint (see the module notes), in eval mode, without
    gradients, on ``device``. Raises ``EncoderCheckpointError``."""
    ckpt = _read(path)
    where = str(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EncoderCheckpointError(f"{where}: not an encoder checkpoint (expected a dict with "
                                     f"'state_dict', 'opts' and 'latent_avg'; found {keys})")
    opts = ckpt.get("opts")
    opts = vars(opts) if isinstance(opts, argparse.Namespace) else opts
    if not isinstance(opts, dict) or "encoder_type" not in opts:
        raise EncoderCheckpointError(f"{where}: its 'opts' do not name an encoder_type; "
                                     "expected an e4e or ReStyle checkpoint")
    encoder_type = str(opts["encoder_type"])
    if encoder_type not in SUPPORTED:
        raise EncoderCheckpointError(
            f"{where}: a {encoder_type} encoder; supported: {', '.join(SUPPORTED)} "
            "(e4e_ffhq_encode.pt, and the IR-SE-50 ReStyle checkpoints)")
    state = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith("encoder.")}
    generator = _generator_family(ckpt["state_dict"], where)
    net = _build(SUPPORTED[encoder_type], state, where)
    latent_avg = ckpt.get("latent_avg")
    if not isinstance(latent_avg, torch.Tensor) or latent_avg.shape[-1] != STYLE_DIM or \
            latent_avg.ndim not in (1, 2):
        got = list(latent_avg.shape) if isinstance(latent_avg, torch.Tensor) else latent_avg
        raise EncoderCheckpointError(f"{where}: 'latent_avg' must be [{STYLE_DIM}] or "
                                     f"[n_styles, {STYLE_DIM}], got {got}")
    latent_avg = latent_avg.float().reshape(-1, STYLE_DIM).expand(net.n_styles, -1).clone()
    iterations = int(opts.get("n_iters_per_batch") or DEFAULT_ITERATIONS[generator])
    return PhotoEncoder(net=net.to(device), latent_avg=latent_avg.to(device),
                        add_average=bool(opts.get("start_from_latent_avg", True)),
                        generator=generator,
                        iterations=iterations if SUPPORTED[encoder_type] != "e4e" else 1)


def check_generator(encoder: PhotoEncoder, G) -> None:
    """Raise ``EncoderCheckpointError`` unless ``G`` is of the family and latent shape the
    encoder was trained for."""
    from server.models.stylegan3 import StyleGAN3Generator

    family = "stylegan3" if isinstance(G, StyleGAN3Generator) else "stylegan2"
    if family != encoder.generator or (G.num_ws, G.w_dim) != (encoder.n_styles, STYLE_DIM):
        raise EncoderCheckpointError(
            f"the {encoder.kind} encoder was trained for a {encoder.generator} generator with "
            f"latents [{encoder.n_styles}, {STYLE_DIM}]; the server's generator is {family} "
            f"with [{G.num_ws}, {G.w_dim}]")


def encoder_keys(kind: str, n_styles: int) -> dict[str, list[int]]:
    """Name -> shape of every tensor of our encoder module ``kind`` ('e4e', 'restyle_psp',
    'restyle_e4e'), as the official ``encoder.*`` tensors are named (without the prefix)."""
    with torch.device("meta"):
        net = _module(kind, n_styles, 3 if kind == "e4e" else 6)
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def _read(path) -> object:
    allowed = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise EncoderCheckpointError(f"{path}: cannot be read safely ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - any unreadable or refused file
            raise EncoderCheckpointError(f"{path}: cannot be read safely ({exc})") from None
        try:                                    # the legacy (non-zip) format cannot be mapped
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise EncoderCheckpointError(f"{path}: cannot be read safely ({exc})") from None


def _generator_family(state_dict: dict, where: str) -> str:
    if "decoder.synthesis.input.weight" in state_dict:
        return "stylegan3"
    if "decoder.style.1.weight" in state_dict or "decoder.input.input" in state_dict:
        return "stylegan2"
    raise EncoderCheckpointError(f"{where}: no StyleGAN2 (rosinality) or StyleGAN3 decoder "
                                 "tensors: cannot tell which generator the encoder is for")


def _module(kind: str, n_styles: int, input_channels: int):
    if kind == "e4e":
        return E4EEncoder(n_styles, input_channels)
    return ReStyleEncoder(n_styles, kind == "restyle_e4e", input_channels)


def _build(kind: str, state: dict, where: str):
    n_styles = sum(1 for k in state if k.startswith("styles.") and k.endswith(".linear.weight"))
    first = state.get("input_layer.0.weight")
    if not n_styles or first is None or first.ndim != 4:
        raise EncoderCheckpointError(f"{where}: no encoder.input_layer / encoder.styles "
                                     "tensors")
    with torch.device("meta"):
        net = _module(kind, n_styles, int(first.shape[1]))
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as exc:
        raise EncoderCheckpointError(f"{where}: its encoder tensors do not fit a {kind} "
                                     f"encoder with {n_styles} styles:\n{exc}") from None
    return net.eval().requires_grad_(False)
