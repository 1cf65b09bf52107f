"""The identity latent a StyleGAN generator takes from ``appearance``.

* ``seed``: z = ``np.random.RandomState(seed).randn(z_dim)``, exactly as NVIDIA's
  ``gen_images.py`` / ``generate.py`` draw it, so seed N gives the face those scripts show
  for N (device-independent: drawn on the CPU in float64). No seed means seed 0.
* ``latent_file``: a saved latent, read by ``load_latent_file``:

  ===================================  ===============================  =====================
  file content (leading 1-dims ignored)  shape                          taken as
  ===================================  ===============================  =====================
  plain array (.npy, .pt tensor)       [z_dim]                          z (mapped, truncated)
  plain array                          [w_dim], when w_dim != z_dim     w (every layer)
  plain array                          [num_ws, w_dim]                  W+
  array named ``z`` (.npz, .pt dict)   [z_dim]                          z
  array named ``w`` (.npz, .pt dict)   [w_dim] or [num_ws, w_dim]       w / W+
  ===================================  ===============================  =====================

  z and w have the same size in every published generator (512), so a lone w vector must be
  named ``w``; NVIDIA's ``projector.py`` output (``projected_w.npz``, 'w' [1, num_ws, w_dim])
  loads as it is. Truncation (``appearance.truncation``, psi, towards ``w_avg`` on every
  layer) applies to z only: a w or W+ from a file is used exactly (inverted latents would
  otherwise drift from the photo they reconstruct).

"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.checkpoints.torch_file import read_torch_file


def seed_z(seed: int | None, z_dim: int) -> torch.Tensor:
    """z [z_dim] float32 for ``appearance.seed`` (None -> 0), as NVIDIA's scripts draw it."""
    z = np.random.RandomState(0 if seed is None else seed).randn(z_dim)
    return torch.from_numpy(z).float()


@dataclass(frozen=True)
class Latent:
    """A loaded identity latent: ``kind`` 'z' (value [z_dim]) or 'w' (value [num_ws, w_dim],
    a single w already repeated over the layers)."""
    kind: str
    value: torch.Tensor


def load_latent_file(path: str | Path, z_dim: int, w_dim: int, num_ws: int) -> Latent:
    """Read a latent file (see the module notes for formats and shapes). Raises ValueError
    naming the file and what it holds when it is not a latent of this generator."""
    path = Path(path)
    where = f"appearance.latent_file: {path}"
    try:
        array, name = _read(path)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"{where}: cannot read: {exc}") from None
    latent = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if not latent.is_floating_point():
        raise ValueError(f"{where}: holds {latent.dtype} values, expected floating point")
    latent = latent.detach().to(torch.float32)
    while latent.ndim > 1 and latent.shape[0] == 1:
        latent = latent[0]
    shape = tuple(latent.shape)
    if not torch.isfinite(latent).all():
        raise ValueError(f"{where}: holds NaN or inf")
    if name in (None, "z") and shape == (z_dim,):
        return Latent("z", latent)
    if shape == (w_dim,) and (name == "w" or (name is None and w_dim != z_dim)):
        return Latent("w", latent.expand(num_ws, w_dim).clone())
    if name in (None, "w") and shape == (num_ws, w_dim):
        return Latent("w", latent.clone())
    what = f"an array named {name!r}" if name else "an array"
    raise ValueError(f"{where}: holds {what} of shape {list(shape)}; this generator takes z "
                     f"[{z_dim}], W+ [{num_ws}, {w_dim}], or w [{w_dim}] named 'w' "
                     "(.npz or a .pt dict)")


def _read(path: Path):
    """(array or tensor, its name or None) from a .npy, .npz or .pt file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return _named(dict(archive.items()), "arrays")
    if suffix == ".pt":
        data = read_torch_file(path, "a latent", "latent")
        if isinstance(data, torch.Tensor):
            return data, None
        if isinstance(data, dict):
            return _named(data, "keys")
        raise ValueError(f"expected a tensor or a dict with 'z' or 'w', got {type(data).__name__}")
    raise ValueError("expected a .npy, .npz or .pt file")


def _named(items: dict, what: str):
    found = [name for name in ("z", "w") if name in items]
    if len(found) != 1:
        raise ValueError(f"expected exactly one of 'z' and 'w', found {what} "
                         f"{sorted(map(str, items))}")
    return items[found[0]], found[0]
