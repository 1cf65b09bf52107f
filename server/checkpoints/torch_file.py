"""Reading ``torch.save`` files safely, with errors that name the file and what it is, and
writing them whole.

Every ``.pt``/``.tar`` a user brings is read with ``torch.load(weights_only=True)``: tensors
and plain containers only, nothing executed. torch's own refusal message advises re-running
with ``weights_only=False`` - exactly what a server must never do - so ``read_torch_file``
replaces it with what the file is (``identify``) and what was refused.
"""

from __future__ import annotations

import pickle
import zipfile
from os import PathLike
from pathlib import Path

import torch

from portrait_rig.files import atomic_path
from server.checkpoints.identify import describe, identify


class CheckpointError(ValueError):
    """A model file that cannot be used: the message names the file and says why."""


def what_it_is(path: Path, expected: str) -> str:
    """", which is <kind>" when ``path`` is identifiably something other than ``expected``
    (an ``identify`` kind), else ""."""
    try:
        kind = identify(path)
    except OSError:
        return ""
    return "" if kind in ("unknown", expected) else f"; it is {describe(kind)}"


def write_torch_file(obj, path: str | PathLike) -> None:
    """``torch.save(obj)`` to ``path``, replaced whole (``portrait_rig.files.atomic_path``).
    Saved through an open file: torch names the archive inside after a path it is given, and
    the temporary path is random, so only a file object keeps the bytes reproducible."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def read_torch_file(path: str | PathLike, what: str, expected: str = "unknown",
                    allowed: tuple = ()):
    """The object ``torch.save`` wrote to ``path`` (CPU tensors), ``allowed`` extra plain
    classes permitted. Raises FileNotFoundError, or ``CheckpointError`` for a file that is
    damaged, truncated or holds anything but tensors and containers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: not a plain tensor file, so it is not loaded as "
                              f"{what} ({_refusal(exc)}){what_it_is(path, expected)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read {what}: the file is damaged, truncated or "
                              f"not a torch file ({first}){what_it_is(path, expected)}") \
            from None


def _refusal(exc: Exception) -> str:
    """What torch's unpickler refused, without its advice to load the file unsafely."""
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and "weights_only" not in line.lower() and "weights only" not in line.lower() \
                and not line.startswith("Check the documentation"):
            return line
    return "it refers to code, not only to tensors and plain containers"

