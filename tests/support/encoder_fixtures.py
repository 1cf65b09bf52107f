"""Photo-encoder weights and checkpoints in the official layouts, small enough for tests.

The official encoders have fixed widths (IR-SE-50 and 512-channel style heads: 150-230 M
parameters). ``random_encoder_state`` gives every tensor seeded random values without
allocating them all: the convolution weights of one fan-in are overlapping windows of one
shared random vector (scaled by 1/sqrt(fan-in), so activations stay O(1) through the 50
layers), everything else (batch norms, PReLU slopes, biases, the equalised linear layers) is
drawn per tensor. Windows start at offsets derived from the tensor's name, so tensors differ.
``torch.save`` stores shared storages once, so a checkpoint of such a state dict is a few MB,
and loading it keeps the sharing.

The same recipe gave the official outputs in tests/data/encoders/*.npz (the official encoder
classes fed with these tensors on the CPU).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch

from server.checkpoints.encoders import encoder_keys

DATA = Path(__file__).resolve().parents[1] / "data" / "encoders"
WINDOW_SLACK = 4099


def random_encoder_state(kind: str, n_styles: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Name -> tensor for our/the official encoder ``kind`` (see the module notes)."""
    shapes = encoder_keys(kind, n_styles)
    conv = {k: s for k, s in shapes.items() if len(s) == 4}
    bases = {}
    for fan_in in sorted({math.prod(s[1:]) for s in conv.values()}):
        size = max(math.prod(s) for s in conv.values() if math.prod(s[1:]) == fan_in)
        g = torch.Generator().manual_seed(seed * 100_003 + fan_in)
        bases[fan_in] = torch.randn(size + WINDOW_SLACK, generator=g) / math.sqrt(fan_in)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name in conv:
            base = bases[math.prod(shape[1:])]
            offset = zlib.crc32(name.encode()) % WINDOW_SLACK
            stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
            state[name] = base.as_strided(shape, stride, offset)
            continue
        noise = torch.randn(shape, generator=g)
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = 1.0 + 0.5 * noise.abs()
        elif name.endswith(".linear.weight"):
            state[name] = noise                        # the layer scales by 1/sqrt(512)
        elif _is_scale(name):                          # batch-norm gains, PReLU slopes
            state[name] = (0.25 if _is_prelu(name) else 1.0) + 0.1 * noise
        else:                                          # biases, running means
            state[name] = 0.1 * noise
    return state


def _is_prelu(name: str) -> bool:
    return name in ("input_layer.2.weight",) or name.endswith("res_layer.2.weight")


def _is_scale(name: str) -> bool:
    if not name.endswith(".weight"):
        return False
    return _is_prelu(name) or name.endswith(("input_layer.1.weight", "res_layer.0.weight",
                                             "res_layer.4.weight", "shortcut_layer.1.weight"))


def write_encoder_checkpoint(path, kind: str, n_styles: int, seed: int = 0,
                             generator: str = "stylegan2", extra: dict | None = None,
                             latent_avg: torch.Tensor | None = None) -> Path:
    """An official-layout checkpoint: ``{'state_dict': encoder.* + a decoder marker,
    'opts', 'latent_avg'}`` (+ ``extra`` entries). The decoder is represented by the one
    tensor name that tells the loader its family (the real files hold the whole generator)."""
    encoder_type = {"e4e": "Encoder4Editing", "restyle_psp": "BackboneEncoder",
                    "restyle_e4e": "ProgressiveBackboneEncoder"}[kind]
    state = {f"encoder.{k}": v for k, v in random_encoder_state(kind, n_styles, seed).items()}
    marker = "decoder.synthesis.input.weight" if generator == "stylegan3" else "decoder.style.1.weight"
    state[marker] = torch.zeros(4, 4)
    if latent_avg is None:
        g = torch.Generator().manual_seed(seed + 7)
        latent_avg = torch.randn([512] if generator == "stylegan3" else [n_styles, 512], generator=g)
    opts = {"encoder_type": encoder_type, "input_nc": 3 if kind == "e4e" else 6,
            "start_from_latent_avg": True, "exp_dir": Path("/tmp/experiment")}
    torch.save({"state_dict": state, "opts": opts, "latent_avg": latent_avg, **(extra or {})},
               path)
    return Path(path)
