"""``deca_model.tar``: DECA's released checkpoint (the user's download; research licence).

``torch.save`` of a dict whose ``'E_flame'`` entry is the state dict of DECA's coarse encoder
(``server.models.deca_encoder``). The other entries (``E_detail``, ``D_detail``, optimiser
state) are not used. Loaded with ``weights_only=True``: tensors and plain containers only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.checkpoints.torch_file import CheckpointError, read_torch_file, what_it_is
from server.models.deca_encoder import DecaEncoder


class DecaModelError(CheckpointError):
    """A ``deca_model.tar`` that does not hold DECA's encoder."""


def load_deca_encoder(path, device="cpu") -> DecaEncoder:
    """``E_flame`` of a ``deca_model.tar``, loaded strictly (``torch.load`` with
    ``weights_only=True``: tensors and plain containers only, no code), in eval mode."""
    path = Path(path).expanduser()
    try:
        checkpoint = read_torch_file(path, "DECA's model", "deca")
    except CheckpointError as exc:
        raise DecaModelError(str(exc)) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("E_flame"), dict):
        keys = ", ".join(map(str, list(checkpoint)[:8])) if isinstance(checkpoint, dict) else "none"
        raise DecaModelError(f"{path} has no 'E_flame' state dict (keys: {keys})"
                             f"{what_it_is(path, 'deca')}")
    state = checkpoint["E_flame"]
    with torch.device("meta"):                      # no random initialisation to overwrite
        encoder = DecaEncoder()
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected
             and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]
    if missing or unexpected or wrong:
        raise DecaModelError(f"{path}: E_flame does not match DECA's encoder: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes "
                             f"{wrong[:5]}")
    encoder.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in state.items()}, strict=True, assign=True)
    return encoder.to(device).eval().requires_grad_(False)
