"""Named identities in the server's data folder: a photo's W+ latent and how it was made.

``identities/<name>/`` (``server.paths.identity_dir``) holds

* ``latent.npz``: ``w`` float32 [num_ws, w_dim], what ``appearance.identity = <name>`` (and
  ``server.backends.latents.load_latent_file``) reads;
* ``identity.json``: ``name``, ``method``, ``steps``, ``generator`` (file name), ``num_ws``,
  ``w_dim``, ``roll`` / ``shift`` (the photo's framing, ``server.inversion.frame``),
  ``metrics`` (PSNR, identity distance, landmark error of the reconstruction) and ``created``;
* ``preview.png``: the aligned photo beside its reconstruction.

Every file is written to a temporary name and renamed, the latent last but one and the
record last, so a reader never sees half an identity.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np

from portrait_rig.files import write_atomic
from server import paths

LATENT, RECORD, PREVIEW = "latent.npz", "identity.json", "preview.png"


def save_identity(name: str, ws: np.ndarray, record: dict, preview: np.ndarray | None = None,
                  root: Path | None = None) -> Path:
    """Store identity ``name`` (replacing one of that name); returns its folder."""
    folder = paths.identity_dir(name, root)
    ws = np.asarray(ws, dtype=np.float32)
    if ws.ndim != 2 or not np.isfinite(ws).all():
        raise ValueError(f"identity {name!r}: expected a finite W+ [num_ws, w_dim], "
                         f"got shape {ws.shape}")
    if preview is not None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(preview).save(buffer, "PNG")
        write_atomic(folder / PREVIEW, buffer.getvalue())
    buffer = io.BytesIO()
    np.savez(buffer, w=ws)
    write_atomic(folder / LATENT, buffer.getvalue())
    record = dict(record, name=name, num_ws=int(ws.shape[0]), w_dim=int(ws.shape[1]),
                  created=record.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_atomic(folder / RECORD, json.dumps(record, indent=1).encode())
    return folder


def read_record(name: str, root: Path | None = None) -> dict:
    """identity.json of ``name``; FileNotFoundError when there is no such identity."""
    path = paths.identity_dir(name, root) / RECORD
    if not path.is_file() or not (path.parent / LATENT).is_file():
        raise FileNotFoundError(f"no identity named {name!r} on the server")
    return json.loads(path.read_text())


def list_identities(root: Path | None = None) -> list[dict]:
    """Every complete identity's record, sorted by name (unreadable records are skipped)."""
    folder = root or paths.identities_dir()
    found = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            found.append(read_record(entry.name, folder))
        except (ValueError, OSError):
            continue
    return found
