"""What a model file is, told from its bytes and names without executing or fully loading it.

``identify(path)`` returns one of the ``KINDS`` keys, so the server can say "this is a
DiffusionRig checkpoint, not a StyleGAN generator" instead of a list of tensor names, both at
start (``server.backends.check``) and when a loader refuses a file. It reads:

* safetensors: the header's metadata ``format`` tag (our RigNet, DFR and generator exports)
  or its tensor names (DiffusionRig);
* torch zip checkpoints: the entry names of the top-level dict, read with ``weights_only``
  and ``mmap`` (tensor data is not read);
* pickles: the module names the pickle refers to in its first 256 KiB (NVIDIA's network
  pickles name ``torch_utils``/``training.networks``; FLAME's name ``chumpy``/``scipy``),
  without unpickling anything;
* ``.npz``: the array names (FLAME texture space, FLAME model arrays, latents).
"""

from __future__ import annotations

import json
import zipfile
from os import PathLike
from pathlib import Path

KINDS = {
    "stylegan-generator": "a StyleGAN generator",
    "diffusionrig": "a DiffusionRig checkpoint",
    "rignet": "a RigNet file",
    "dfr": "a StyleRig face reconstruction (DFR) file",
    "deca": "DECA's deca_model.tar",
    "dualstylegan": "a DualStyleGAN generator",
    "photo-encoder": "a pSp / e4e / ReStyle photo encoder",
    "flame-model": "a FLAME face model",
    "flame-texture": "a FLAME texture space",
    "latent": "a latent array",
    "unknown": "not a model file Portrait Rig knows",
}

_PICKLE_HEAD = 256 << 10


def describe(kind: str) -> str:
    return KINDS.get(kind, kind)


def identify(path: str | PathLike) -> str:
    """The ``KINDS`` key of the file at ``path`` ("unknown" when nothing matches; OSError
    when it cannot be read)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(_PICKLE_HEAD)
    if len(head) >= 9 and head[8:9] == b"{":
        return _safetensors(path)
    if head[:4] == b"PK\x03\x04":
        return _npz(path) if path.suffix.lower() == ".npz" else _torch_zip(path)
    if head[:6] == b"\x93NUMPY":
        return "latent"
    if head[:1] == b"\x80":
        if b"torch_utils" in head or b"training.networks" in head or b"dnnlib" in head:
            return "stylegan-generator"
        if b"chumpy" in head or b"J_regressor" in head or b"shapedirs" in head:
            return "flame-model"
    return "unknown"


def _safetensors(path: Path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100 << 20:
            return "unknown"
        try:
            header = json.loads(f.read(size))
        except ValueError:
            return "unknown"
    tag = (header.get("__metadata__") or {}).get("format", "")
    if tag.endswith(".rignet"):
        return "rignet"
    if tag.endswith("-dfr"):
        return "dfr"
    if "generator" in tag or "stylegan" in tag:
        return "stylegan-generator"
    if any(name.startswith("denoisingUNet.") for name in header):
        return "diffusionrig"
    return "unknown"


def _top_level(path: Path) -> dict:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything weights_only refuses is not ours to name
        return {}
    return data if isinstance(data, dict) else {}


def _torch_zip(path: Path) -> str:
    data = _top_level(path)
    names = set(map(str, data))
    if "g_ema" in names:
        inner = data["g_ema"] if isinstance(data["g_ema"], dict) else {}
        if any(str(k).startswith("res.") for k in inner):
            return "dualstylegan"
        return "stylegan-generator"
    if "state_dict" in names and "opts" in names:
        return "photo-encoder"
    if "E_flame" in names:
        return "deca"
    if any(name.startswith("denoisingUNet.") for name in names):
        return "diffusionrig"
    return "unknown"


def _npz(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = {n.removesuffix(".npy") for n in archive.namelist()}
    except zipfile.BadZipFile:
        return "unknown"
    if {"tex_dir", "mean"} <= names:
        return "flame-texture"
    if {"v_template", "shapedirs"} <= names:
        return "flame-model"
    if names & {"z", "w"}:
        return "latent"
    return "unknown"
