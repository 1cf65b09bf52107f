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
        dualstylegan/encoder.pt          DualStyleGAN's Z+ pSp encoder (optional: photo
                                         identities and new exemplars)
        dualstylegan/<style>/            one folder per style family (cartoon, anime, ...), as
                                         the official checkpoint/ folder: generator.pt,
                                         exstyle_code.npy or refined_exstyle_code.npy (preferred),
                                         sampler.pt (optional: random styles)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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


FLAME_MODEL_NAMES = ("generic_model.pkl", "flame2023.pkl")


def flame_model() -> Path:
    """Default FLAME face model: ``flame/generic_model.pkl`` (FLAME 2020) or
    ``flame/flame2023.pkl``, whichever exists (the first when neither does)."""
    folder = home() / "flame"
    for name in FLAME_MODEL_NAMES:
        if (folder / name).is_file():
            return folder / name
    return folder / FLAME_MODEL_NAMES[0]


def face_model_source(source: str) -> str:
    """A face model setting as ``portrait_rig.face_source.load_face_data`` takes it: "flame"
    means the FLAME file at its default place (an error saying where to get it when absent);
    "demo" and paths pass through."""
    if source != "flame":
        return source
    path = flame_model()
    if not path.is_file():
        raise FileNotFoundError(f"FLAME face model not found at {path}: register at "
                                "flame.is.tue.mpg.de (FLAME licence), download FLAME 2020 or "
                                f"2023 and put generic_model.pkl or flame2023.pkl in "
                                f"{path.parent}, or pass the file's path")
    return str(path)


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


# ------------------------------------------------------------------------------ what each backend needs

# Where to get each file (the README's table, in one line each).
SOURCES = {
    "stylegan-generator": "NVIDIA's StyleGAN2-ADA / StyleGAN3 releases (e.g. ffhq.pkl; NVIDIA "
                          "Source Code License-NC) or a rosinality stylegan2-pytorch checkpoint",
    "rignet": "train one for your generator: python -m server.training.stylerig "
              "(docs/stylerig_training.md)",
    "diffusionrig": "DiffusionRig's stage-1 model (adobe-research/diffusion-rig releases, "
                    "research licence), renamed model.pt",
    "flame-texture": "FLAME_texture.npz from the FLAME website (flame.is.tue.mpg.de, "
                     "registration; FLAME licence)",
    "dualstylegan": "a style folder (e.g. cartoon: generator.pt, exstyle_code.npy, sampler.pt) "
                    "from github.com/williamyang1991/DualStyleGAN 'Pretrained Models' (S-Lab "
                    "licence), into dualstylegan/<style>/",
    "photo-encoder": "DualStyleGAN's encoder.pt from the same page",
}


@dataclass(frozen=True)
class FileNeed:
    """A file a backend reads: ``role`` in words, where it is looked for, whether the backend
    cannot run without it, the ``server.checkpoints.identify`` kind it must be, the option
    that moves it, and where to get it."""
    role: str
    path: Path
    required: bool
    kind: str
    option: str

    @property
    def source(self) -> str:
        return SOURCES.get(self.kind, "")


def _chosen(value, default: Path) -> Path:
    return Path(value).expanduser() if value not in (None, "auto") else default


def stylerig_files(options: Mapping[str, Any]) -> list[FileNeed]:
    """The stylerig backend's generator (required) and RigNet (optional unless named)."""
    needs = [FileNeed("StyleGAN generator", _chosen(options.get("generator"),
                                                    stylegan_generator()),
                      True, "stylegan-generator", "stylerig.generator")]
    rignet = options.get("rignet", "auto")
    if rignet != "none":
        needs.append(FileNeed("RigNet (pose, expression and light control)",
                              _chosen(rignet, stylerig_rignet()), rignet != "auto", "rignet",
                              "stylerig.rignet"))
    return needs


def diffusionrig_files(options: Mapping[str, Any]) -> list[FileNeed]:
    """The diffusionrig backend's stage-1 checkpoint (required) and FLAME texture space
    (optional unless named)."""
    needs = [FileNeed("DiffusionRig stage-1 checkpoint",
                      _chosen(options.get("checkpoint"), diffusionrig_checkpoint()), True,
                      "diffusionrig", "diffusionrig.checkpoint")]
    texture = options.get("texture", "auto")
    if texture != "none":
        needs.append(FileNeed("FLAME texture space (albedo)", _chosen(texture, flame_texture()),
                              texture != "auto", "flame-texture", "diffusionrig.texture"))
    return needs


def dualstylegan_files(options: Mapping[str, Any]) -> list[FileNeed]:
    """The dualstylegan backend's style generator (its default family's, required) and the
    Z+ encoder (optional unless named)."""
    root = _chosen(options.get("folder"), dualstylegan_dir())
    families = dualstylegan_families(root)
    family = options.get("family") or ("cartoon" if "cartoon" in families or not families
                                       else families[0])
    needs = [FileNeed(f"DualStyleGAN style generator ({family})",
                      root / family / "generator.pt", True, "dualstylegan",
                      "dualstylegan.folder")]
    encoder = options.get("encoder", "auto")
    if encoder != "none":
        needs.append(FileNeed("DualStyleGAN Z+ encoder", _chosen(encoder, root / "encoder.pt"),
                              encoder != "auto", "photo-encoder", "dualstylegan.encoder"))
    return needs
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
