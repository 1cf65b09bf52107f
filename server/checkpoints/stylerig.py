"""RigNet and DFR files: the StyleRig networks our training writes and the backend reads.

Our own format: safetensors (tensors only, nothing executed on load) whose metadata holds a
``format`` tag, the network's ``config`` as JSON, RigNet's ``control_layout`` and free string
entries the trainer adds (the generator and face model it was trained for, the step).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from os import PathLike

import torch

from portrait_rig.files import atomic_path
from server.models.dfr import FaceParamLayout, FaceReconstructionNet
from server.models.rignet import ControlLayout, RigNet

RIGNET_FORMAT = "portrait-rig.rignet"
DFR_FORMAT = "portrait-rig.stylerig-dfr"


def _save(net: torch.nn.Module, path, format_tag: str, config: dict,
          metadata: Mapping[str, str] | None, **extra: str) -> None:
    from safetensors.torch import save_file

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=format_tag, config=json.dumps(config), **extra)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    # Replaced whole: training rewrites the file while the backend or a resumed stage reads it.
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _metadata(path, format_tag: str, what: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != format_tag or "config" not in meta:
        raise ValueError(f"{path}: not a {what} (metadata {meta})")
    return meta


def _fill(net: torch.nn.Module, path, config, optional: tuple[str, ...] = ()) -> None:
    """Load ``path``'s tensors into ``net`` strictly; names in ``optional`` (added to the format
    later) keep ``net``'s defaults when the file lacks them."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    own = net.state_dict()
    tensors.update({name: own[name] for name in optional if name not in tensors})
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: tensors do not fit {config}:\n{exc}") from None


def save_rignet(net: RigNet, path: str | PathLike, metadata: Mapping[str, str] | None = None
                ) -> None:
    """Write ``net``'s tensors (float32) with its config, its layout (if any) and the string
    entries of ``metadata`` (e.g. the generator it was trained for)."""
    extra = {} if net.layout is None else {"control_layout": json.dumps(net.layout.to_dict())}
    _save(net, path, RIGNET_FORMAT, net.config(), metadata, **extra)


def read_rignet_metadata(path: str | PathLike) -> dict[str, str]:
    """The metadata of a ``save_rignet`` file (raises ValueError for other files)."""
    return _metadata(path, RIGNET_FORMAT, "RigNet written by save_rignet")


def load_rignet(path: str | PathLike, device: str | torch.device = "cpu") -> RigNet:
    """A ``save_rignet`` file -> RigNet on ``device``, eval mode, no parameter gradients."""
    meta = read_rignet_metadata(path)
    layout = (ControlLayout.from_dict(json.loads(meta["control_layout"]))
              if "control_layout" in meta else None)
    net = RigNet(**json.loads(meta["config"]), layout=layout)
    # Files from before the light map load with the identity map.
    _fill(net, path, f"RigNet {net.config()}", optional=("light_mean", "light_map"))
    return net.to(device).eval().requires_grad_(False)


def save_dfr(net: FaceReconstructionNet, path: str | PathLike,
             metadata: Mapping[str, str] | None = None) -> None:
    """Write F's tensors with its config (and string ``metadata``, e.g. the face model's
    name)."""
    _save(net, path, DFR_FORMAT, net.config(), metadata)


def load_dfr(path: str | PathLike, device: str | torch.device = "cpu"
             ) -> tuple[FaceReconstructionNet, dict[str, str]]:
    """A ``save_dfr`` file -> (F on ``device`` in eval mode without gradients, metadata)."""
    meta = _metadata(path, DFR_FORMAT, "face reconstruction network written by save_dfr")
    config = json.loads(meta["config"])
    net = FaceReconstructionNet(config["num_ws"], config["w_dim"],
                                FaceParamLayout(**config["layout"]), config["hidden"],
                                heads=config.get("heads", False))
    _fill(net, path, config)
    return net.to(device).eval().requires_grad_(False), meta
