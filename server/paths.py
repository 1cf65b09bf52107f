"""Where the server looks for the model files a user brings (the one place that says so).

Everything lives under one folder, ``$PORTRAIT_RIG_HOME`` (default ``~/.portrait_rig``)::

    $PORTRAIT_RIG_HOME/
        diffusionrig/model.pt            DiffusionRig stage-1 checkpoint (official model*.pt,
                                         renamed; .safetensors also accepted)
        personal/<name>/model.pt         personalised (stage-2) DiffusionRig checkpoints,
                                         selected per request by ``appearance.personal_model``
        flame/FLAME_texture.npz          FLAME texture space (albedo of the DiffusionRig buffers)
        flame/landmark_embedding.npy     DECA's FLAME landmark embedding (photo fitting)
        deca/deca_model.tar              DECA's model (photo fitting with its encoder)
        stylegan/generator.pkl           StyleGAN2/3 generator of the stylerig backend (an NVIDIA
                                         network pickle; generator.pt, rosinality's format, or
                                         generator.safetensors, our export, also accepted)
        stylerig/rignet.safetensors      RigNet trained for that generator (optional)
        dualstylegan/encoder.pt          DualStyleGAN's Z+ pSp encoder (optional: photo
                                         identities and new exemplars)
        dualstylegan/<style>/            one folder per style family (cartoon, anime, ...), as
                                         the official checkpoint/ folder: generator.pt,
                                         exstyle_code.npy or refined_exstyle_code.npy (preferred),
                                         sampler.pt (optional: random styles)

Backend options (``portrait-rig-server --option diffusionrig.checkpoint=FILE``,
``--option stylerig.generator=FILE``) override the defaults. Personal model names are plain
folder names (letters, digits, ``.``, ``_``, ``-``), never paths, so a request cannot point
the server at an arbitrary file by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOME_ENV = "PORTRAIT_RIG_HOME"
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
GENERATOR_SUFFIXES = (".pkl", ".pt", ".safetensors")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def home() -> Path:
    """The model folder: ``$PORTRAIT_RIG_HOME`` or ``~/.portrait_rig``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".portrait_rig").expanduser()


def diffusionrig_checkpoint() -> Path:
    """Default DiffusionRig stage-1 checkpoint: ``diffusionrig/model.pt`` (or ``.safetensors``
    when only that exists)."""
    return _checkpoint_in(home() / "diffusionrig")


def diffusionrig_problem(checkpoint=None, **_) -> str | None:
    """Why the ``diffusionrig`` backend cannot start with these options (its checkpoint is
    missing), or None. Cheap, loads nothing: the server reports it at start."""
    path = Path(checkpoint).expanduser() if checkpoint else diffusionrig_checkpoint()
    if not path.is_file():
        return (f"DiffusionRig checkpoint not found: {path} (pass --option "
                f"diffusionrig.checkpoint=FILE, or place the official model*.pt there)")
    return None


def stylegan_generator() -> Path:
    """Default StyleGAN generator: the first of ``stylegan/generator.pkl``, ``.pt``,
    ``.safetensors`` that exists (``generator.pkl`` when none does)."""
    folder = home() / "stylegan"
    for suffix in GENERATOR_SUFFIXES:
        if (folder / f"generator{suffix}").is_file():
            return folder / f"generator{suffix}"
    return folder / f"generator{GENERATOR_SUFFIXES[0]}"


def stylerig_rignet() -> Path:
    """Default RigNet weights of the stylerig backend: ``stylerig/rignet.safetensors``."""
    return home() / "stylerig" / "rignet.safetensors"


def stylerig_problem(generator=None, **_) -> str | None:
    """Why the ``stylerig`` backend cannot start with these options (its generator file is
    missing), or None. RigNet weights are optional. Cheap, loads nothing."""
    path = Path(generator).expanduser() if generator else stylegan_generator()
    if not path.is_file():
        return (f"StyleGAN generator not found: {path} (pass --option stylerig.generator=FILE, "
                f"or place an NVIDIA network pickle there)")
    return None


DUALSTYLEGAN_CODES = ("refined_exstyle_code.npy", "exstyle_code.npy")


def dualstylegan_dir() -> Path:
    """Default DualStyleGAN folder: ``dualstylegan/`` (the official ``checkpoint/`` layout)."""
    return home() / "dualstylegan"


def dualstylegan_families(folder=None) -> list[str]:
    """Style families under ``folder`` (default ``dualstylegan_dir()``): the names of its
    sub-folders holding a ``generator.pt``, sorted."""
    root = Path(folder).expanduser() if folder else dualstylegan_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if _NAME.fullmatch(p.name) and (p / "generator.pt").is_file())


def dualstylegan_family(name: str, folder=None) -> Path:
    """The folder of style family ``name``. Raises ValueError for a name that is not a plain
    folder name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"style family {name!r} must be 1-64 letters, digits, '.', '_' or "
                         "'-' (a folder name, not a path)")
    return (Path(folder).expanduser() if folder else dualstylegan_dir()) / name


def dualstylegan_codes(family_dir: Path) -> Path:
    """A family's exemplar codes: ``refined_exstyle_code.npy`` when present, else
    ``exstyle_code.npy`` (the official scripts' choice)."""
    for name in DUALSTYLEGAN_CODES:
        if (family_dir / name).is_file():
            return family_dir / name
    return family_dir / DUALSTYLEGAN_CODES[-1]


def dualstylegan_problem(folder=None, **_) -> str | None:
    """Why the ``dualstylegan`` backend cannot start (no style family), or None. Cheap."""
    root = Path(folder).expanduser() if folder else dualstylegan_dir()
    if not dualstylegan_families(root):
        return (f"no DualStyleGAN style under {root}: download a style folder (e.g. "
                "'cartoon': generator.pt, exstyle_code.npy, sampler.pt) from "
                "github.com/williamyang1991/DualStyleGAN's 'Pretrained Models' into "
                f"{root}/<style>/, or pass --option dualstylegan.folder=DIR")
    return None


def flame_texture() -> Path:
    """Default FLAME texture space: ``flame/FLAME_texture.npz``."""
    return home() / "flame" / "FLAME_texture.npz"


def deca_model() -> Path:
    """Default DECA model for photo fitting: ``deca/deca_model.tar``."""
    return home() / "deca" / "deca_model.tar"


def landmark_embedding() -> Path:
    """Default FLAME landmark embedding for photo fitting: ``flame/landmark_embedding.npy``."""
    return home() / "flame" / "landmark_embedding.npy"


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
