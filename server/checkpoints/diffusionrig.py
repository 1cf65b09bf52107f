"""DiffusionRig's ``model{step}.pt`` files (official stage 1 and our personal models).

The official checkpoint is ``torch.save(model.state_dict())`` of the ``DiffusionRig`` module
(``server.models.diffusionrig``): 712 tensors under ``denoisingUNet.*`` and ``encoder.*``.
Read with ``weights_only=True`` (tensors and plain containers, no code), checked name by name
and shape by shape, the UNet's configuration inferred from the tensors when not given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from server.checkpoints.torch_file import CheckpointError, read_torch_file
from server.models.diffusionrig import DiffusionRig
from server.models.diffusionrig_unet import UNetConfig


class CheckpointMismatch(CheckpointError):
    """A state dict whose names or shapes differ from the model's."""


def check_state_dict(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """Raise ``CheckpointMismatch`` naming every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    shapes = sorted(f"{k}: {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
                    for k, v in expected.items()
                    if k in state_dict and isinstance(state_dict[k], torch.Tensor)
                    and state_dict[k].shape != v.shape)
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected),
                        ("not tensors", not_tensors), ("wrong shape", shapes)):
        if items:
            more = f", ... ({len(items) - 8} more)" if len(items) > 8 else ""
            shown = ", ".join(items[:8]) + more
            problems.append(f"{len(items)} {what}: {shown}")
    if problems:
        raise CheckpointMismatch(f"{source} does not match {type(model).__name__}: "
                                 + "; ".join(problems))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat state dict from a ``.pt`` (``torch.load(weights_only=True)``, never
    unpickling code) or a ``.safetensors`` file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiffusionRig checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state_dict = read_torch_file(path, "a DiffusionRig checkpoint", "diffusionrig")
    except CheckpointError as exc:
        raise CheckpointMismatch(str(exc)) from None
    if not isinstance(state_dict, dict):
        raise CheckpointMismatch(f"{path} holds a {type(state_dict).__name__}, "
                                 "not a state dict")
    return state_dict


def infer_config(state_dict: dict, image_size: int = 256, num_heads: int = 1) -> UNetConfig:
    """The ``UNetConfig`` of an official-layout state dict, read from its names and shapes:
    input/output channels, base channels, channel multipliers, residual blocks per level,
    attention levels and latent size. Two things leave no trace in the tensors: the image size
    (the UNet is convolutional) and the number of attention heads (the legacy qkv layout has
    the same shape for any count); DiffusionRig's are 256 and 1. Raises
    ``CheckpointMismatch`` when the names are not DiffusionRig's."""
    prefix = "denoisingUNet."

    def shape(name: str) -> tuple[int, ...]:
        tensor = state_dict.get(prefix + name)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointMismatch(f"cannot infer the UNet configuration: no tensor "
                                     f"{prefix + name}")
        return tuple(tensor.shape)

    model_channels = shape("time_embed.0.weight")[1]
    in_channels, out_channels = shape("input_blocks.0.0.weight")[1], shape("out.2.weight")[0]
    latent_dim = shape("input_blocks.1.0.cond_emb_layers.1.weight")[1]
    n_out = 1 + max(int(k[len(prefix):].split(".")[1]) for k in state_dict
                    if k.startswith(prefix + "output_blocks."))
    upsampling = {i for i in range(n_out) for j in (1, 2)
                  if prefix + f"output_blocks.{i}.{j}.in_layers.0.weight" in state_dict}
    levels = len(upsampling) + 1
    if n_out % levels:
        raise CheckpointMismatch(f"cannot infer the UNet configuration: {n_out} decoder blocks "
                                 f"do not split into {levels} levels")
    per_level = n_out // levels
    channel_mult, attention_ds = [], set()
    for level in range(levels):
        first = (levels - 1 - level) * per_level
        channel_mult.append(shape(f"output_blocks.{first}.0.in_layers.2.weight")[0]
                            // model_channels)
        if prefix + f"output_blocks.{first}.1.qkv.weight" in state_dict:
            attention_ds.add(2 ** level)
    return UNetConfig(image_size=image_size, in_channels=in_channels, out_channels=out_channels,
                      model_channels=model_channels, channel_mult=tuple(channel_mult),
                      num_res_blocks=per_level - 1, attention_ds=tuple(sorted(attention_ds)),
                      num_heads=num_heads, latent_dim=latent_dim)


def load_diffusionrig(path: str | Path, config: UNetConfig | None = UNetConfig(),
                      device: str | torch.device = "cpu", image_size: int = 256) -> DiffusionRig:
    """Build a float32 ``DiffusionRig`` for ``config`` and load ``path`` into it strictly.

    ``config=None`` reads the architecture from the file (``infer_config``, with
    ``image_size`` and one attention head), so any official-layout checkpoint loads.
    The model is built on the meta device and takes the file's tensors directly (no random
    initialisation, no second copy), then moves to ``device`` in eval mode (dropout off,
    BatchNorm on running statistics) with gradients disabled. Reduced precision is meant to
    come from autocast (the official model was trained under fp16 autocast; GroupNorm32
    keeps its normalisation in float32).
    Raises ``CheckpointMismatch`` listing any missing, unexpected or mis-shaped tensor.
    """
    state_dict = read_state_dict(path)
    if config is None:
        config = infer_config(state_dict, image_size)
    with torch.device("meta"):
        model = DiffusionRig(config)
    check_state_dict(model, state_dict, source=str(path))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
