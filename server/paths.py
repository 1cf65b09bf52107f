"""Where the server looks for the model files a user brings (the one place that says so).

Everything lives under one folder, ``$PORTRAIT_RIG_HOME`` (default ``~/.portrait_rig``)::

    $PORTRAIT_RIG_HOME/
        diffusionrig/model.pt            DiffusionRig stage-1 checkpoint (official model*.pt,
                                         renamed; .safetensors also accepted)
        personal/<name>/model.pt         personalised (stage-2) DiffusionRig checkpoints,
                                         selected per request by ``appearance.personal_model``
        flame/FLAME_texture.npz          FLAME texture space (albedo of the DiffusionRig buffers)

Backend options (``portrait-rig-server --option diffusionrig.checkpoint=FILE``) override the
first and last. Personal model names are plain folder names (letters, digits, ``.``, ``_``,
``-``), never paths, so a request cannot point the server at an arbitrary file by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOME_ENV = "PORTRAIT_RIG_HOME"
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def home() -> Path:
    """The model folder: ``$PORTRAIT_RIG_HOME`` or ``~/.portrait_rig``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".portrait_rig").expanduser()


def diffusionrig_checkpoint() -> Path:
    """Default DiffusionRig stage-1 checkpoint: ``diffusionrig/model.pt`` (or ``.safetensors``
    when only that exists)."""
    return _checkpoint_in(home() / "diffusionrig")


def flame_texture() -> Path:
    """Default FLAME texture space: ``flame/FLAME_texture.npz``."""
    return home() / "flame" / "FLAME_texture.npz"


def personal_dir() -> Path:
    return home() / "personal"


def personal_checkpoint(name: str, root: Path | None = None) -> Path:
    """Checkpoint of personal model ``name``: ``<root>/<name>/model.pt`` (or
    ``.safetensors``), root defaulting to ``personal_dir()``. Raises ValueError for a name
    that is not a plain folder name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"personal model name {name!r} must be 1-64 letters, digits, '.', '_' "
                         "or '-' (a folder name, not a path)")
    return _checkpoint_in((root or personal_dir()) / name)


def _checkpoint_in(folder: Path) -> Path:
    for suffix in CHECKPOINT_SUFFIXES:
        if (folder / f"model{suffix}").is_file():
            return folder / f"model{suffix}"
    return folder / "model.pt"
