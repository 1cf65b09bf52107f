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
        latents/                         identity latents requests name in
                                         ``appearance.latent_file``
        photos/                          reference photos requests name in
                                         ``appearance.reference_photo``

Backend options (``portrait-rig-server --option diffusionrig.checkpoint=FILE``,
``--option stylerig.generator=FILE``) override the defaults. Personal model names are plain
folder names (letters, digits, ``.``, ``_``, ``-``), never paths, so a request cannot point
the server at an arbitrary file by name.

Files that requests name (``client_file``) are looked up in ``latents/`` or ``photos/`` and
in the folders the operator allows (``portrait-rig-server --allow-folder DIR``); whatever
the name, symlinks included, the file must lie inside one of them. Messages sent to clients
go through ``redact`` so they show paths relative to the data folder, or only file names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOME_ENV = "PORTRAIT_RIG_HOME"
LATENTS = "latents"                 # folders of the files requests name, by field
PHOTOS = "photos"
MAX_CLIENT_NAME = 1024
STAMP_FILES = 2000                  # files ``stamp`` looks at, at most
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


# ---------------------------------------------------------------------------- client files

_allowed: list[Path] = []


def allow_folders(folders) -> None:
    """Let requests also name files in ``folders`` (``--allow-folder``). Raises ValueError
    for one that is not a folder."""
    resolved = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"--allow-folder {folder}: not a folder")
        resolved.append(path.resolve())
    _allowed[:] = resolved


class ClientFileRefused(ValueError):
    """A file name a request gave that names no file the server may read. The message is
    the same whatever the reason (malformed, outside, missing, a symlink out), so it reveals
    nothing about the server's files. ``field`` names the request field."""

    def __init__(self, field: str, folder: str):
        super().__init__(f"{field}: the server has no file of that name. Name a file in the "
                         f"{folder}/ folder of its data folder, or in a folder it allows "
                         "(portrait-rig-server --allow-folder)")
        self.field = field


def client_file(field: str, name, folder: str) -> Path:
    """The file a request names in ``field``: ``name`` relative to ``home()/folder`` or to an
    allowed folder (tried in that order), or an absolute path inside one of them. The result
    is resolved (symlinks followed) and lies inside that folder. Raises ClientFileRefused."""
    refused = ClientFileRefused(field, folder)
    if not isinstance(name, str) or not 0 < len(name) <= MAX_CLIENT_NAME \
            or "\0" in name or "\\" in name:
        raise refused
    given = Path(name)
    for root in (home() / folder, *_allowed):
        relative = _relative_to(given, root)
        if relative is None:
            continue
        try:
            real_root = root.resolve(strict=True)
        except OSError:
            continue
        real = Path(os.path.realpath(real_root / relative))
        if real.is_relative_to(real_root) and real.is_file():
            return real
    raise refused


def _relative_to(given: Path, root: Path) -> Path | None:
    """``given`` as plain names below ``root`` (lexically: no ``..``, ``~``), or None."""
    if given.is_absolute():
        for base in (root, root.resolve()):
            if given.is_relative_to(base):
                given = given.relative_to(base)
                break
        else:
            return None
    parts = given.parts
    if not parts or any(part in (".", "..") or part.startswith("~") for part in parts):
        return None
    return given


# An absolute path: a "/" that does not continue a word, a URL or "~", then folders.
_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"():,]+/)+([^\s/'\"():,]*)")


def redact(text: str) -> str:
    """``text`` fit to send to a client: paths inside the data folder or an allowed folder
    relative to it, any other absolute path cut to its file name."""
    roots = {str(home()), str(home().resolve()), *map(str, _allowed)}
    for root in sorted(roots, key=len, reverse=True):
        text = text.replace(root.rstrip(os.sep) + os.sep, "")
    return _ABSOLUTE.sub(lambda match: match.group(1), text)


def stamp(extra=()) -> tuple:
    """(path, size, mtime) of the files under the data folder (the first ``STAMP_FILES``)
    and of the ``extra`` paths that are files: it changes when a user adds, replaces or
    removes a model file, so a backend that failed to start is retried only then."""
    entries = []
    for path in extra:
        try:
            info = os.stat(path)
        except (OSError, TypeError, ValueError):
            continue
        entries.append((str(path), info.st_size, info.st_mtime_ns))
    for folder, _, names in os.walk(home()):
        for name in names:
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            entries.append((os.path.join(folder, name), info.st_size, info.st_mtime_ns))
            if len(entries) >= STAMP_FILES:
                return tuple(entries)
    return tuple(entries)
