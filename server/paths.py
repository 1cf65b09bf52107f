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
        stylegan/encoder.pt              photo encoder for that generator (optional: e4e or
                                         ReStyle, official checkpoint renamed)
        stylegan/directions/<name>.npy   latent edit directions (InterFaceGAN boundaries,
                                         stylegan3-editing's; StyleSpace directions)
        lpips/vgg16-397923af.pth, lpips/vgg.pth
                                         LPIPS's backbone (torchvision) and calibration (the
                                         lpips package): the perceptual loss of inversion and
                                         pivotal tuning (optional; AlexNet's pair also works)
        identities/<name>/latent.npz     identities inverted from photos (W+ 'w'), with
                                         identity.json and preview.png; written by the server
        personal/<name>/generator.safetensors
                                         StyleGAN generators tuned to one photo (pivotal
                                         tuning), with pivot.npz; ``appearance.personal_model``

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


def flame_texture() -> Path:
    """Default FLAME texture space: ``flame/FLAME_texture.npz``."""
    return home() / "flame" / "FLAME_texture.npz"


def deca_model() -> Path:
    """Default DECA model for photo fitting: ``deca/deca_model.tar``."""
    return home() / "deca" / "deca_model.tar"


def landmark_embedding() -> Path:
    """Default FLAME landmark embedding for photo fitting: ``flame/landmark_embedding.npy``."""
    return home() / "flame" / "landmark_embedding.npy"


def stylegan_encoder() -> Path:
    """Default photo encoder of the stylegan generator: ``stylegan/encoder.pt``."""
    return home() / "stylegan" / "encoder.pt"


def directions_dir() -> Path:
    """Latent edit directions of the stylegan generator: ``stylegan/directions/``."""
    return home() / "stylegan" / "directions"


LPIPS_FILES = {"vgg": ("vgg16-397923af.pth", "vgg.pth"),
               "alex": ("alexnet-owt-7be5be79.pth", "alex.pth")}


def lpips_files() -> tuple[Path, Path] | None:
    """(backbone, calibration) of the first LPIPS pair present under ``lpips/`` (VGG first,
    PTI's projection loss), or None."""
    for backbone, calibration in LPIPS_FILES.values():
        pair = home() / "lpips" / backbone, home() / "lpips" / calibration
        if all(p.is_file() for p in pair):
            return pair
    return None


def identities_dir() -> Path:
    return home() / "identities"


def identity_dir(name: str, root: Path | None = None) -> Path:
    """Folder of identity ``name``: ``<root>/<name>/``, root defaulting to
    ``identities_dir()``. Raises ValueError for a name that is not a plain folder name."""
    return (root or identities_dir()) / check_name(name, "identity")


def identity_latent(name: str, root: Path | None = None) -> Path:
    """The identity's latent file: ``identities/<name>/latent.npz``."""
    return identity_dir(name, root) / "latent.npz"


def personal_generator(name: str, root: Path | None = None) -> Path:
    """Pivotal-tuning generator of personal model ``name``:
    ``personal/<name>/generator.safetensors``."""
    return (root or personal_dir()) / check_name(name, "personal model") / "generator.safetensors"


def check_name(name, what: str = "name") -> str:
    """``name`` when it is 1-64 letters, digits, '.', '_' or '-' (a folder name, never a
    path); else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                         "(a name, not a path)")
    return name


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
