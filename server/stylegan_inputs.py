"""What a StyleGAN generator takes from a rig: an identity latent and the head's view.

Identity (``appearance``):

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

View: StyleGAN generators draw aligned portraits - the face upright, centred, seen from the
front - and RigNet (Tewari et al. 2020) models the head's rotation within that framing.
``rig_view`` expresses the rig's head (``pose.global``) relative to the camera and splits it
into the part an aligned portrait can show (the *swing*: yaw and pitch, for RigNet) and the
*roll* about the camera's viewing axis plus the head's position in the frame, which only an
image-plane transform can show (StyleGAN3's input transform). Neck rotation, the camera's
distance and focal length (image scale) are not represented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from portrait_rig.params import Camera, RigParams
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from server.renderer.cameras import CameraBatch, project


# ------------------------------------------------------------------------------ identity

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
        data = torch.load(path, map_location="cpu", weights_only=True)
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


# ------------------------------------------------------------------------------ view

@dataclass(frozen=True)
class RigView:
    """The head as an aligned portrait generator sees it.

    ``pose``  [3] axis-angle (radians) of the head's rotation relative to the camera, its roll
              removed, in the camera frame (x right, y up, z towards the viewer): for the
              default camera (at +Z looking down -Z) the model frame, so an unrolled
              ``pose.global`` comes back unchanged.
    ``roll``  radians of head rotation about the viewing axis, counter-clockwise as displayed.
    ``shift`` (tx, ty): where the head's origin lands, relative to the frame's centre, in
              units of the side of the square the frame is cropped from (max(width,
              height)), x right, y down: StyleGAN3's translation units.
    """
    pose: np.ndarray
    roll: float
    shift: tuple[float, float]


def rig_views(params: list[RigParams], width: int, height: int) -> list[RigView]:
    """``RigView`` of each parameter set for a ``width`` x ``height`` frame (see the module
    notes). The head's origin is the model-frame point ``translation``, which the default
    cameras put at the centre of the frame."""
    cameras = CameraBatch.from_params([p.camera for p in params], dtype=torch.float64)
    origins = torch.tensor([p.translation for p in params], dtype=torch.float64)[:, None]
    ndc, depth = project(origins, cameras, width, height)
    side = max(width, height)
    views = []
    for p, (x, y), z in zip(params, ndc[:, 0].tolist(), depth[:, 0].tolist()):
        relative = _camera_rotation(p.camera).T @ axis_angle_to_matrix(p.pose.global_)
        # Swing-twist split about the viewing axis z: the twist angle is 2 atan2(q_z, q_w) of
        # the rotation's quaternion, which is this atan2 of matrix entries.
        roll = math.atan2(relative[1, 0] - relative[0, 1], relative[0, 0] + relative[1, 1])
        swing = _rotation_z(-roll) @ relative
        visible = z > 0 or p.camera.type == "orthographic"
        shift = (x * width / 2 / side, -y * height / 2 / side) if visible else (0.0, 0.0)
        views.append(RigView(matrix_to_axis_angle(swing), roll, shift))
    return views


def _camera_rotation(camera: Camera) -> np.ndarray:
    """Camera-to-model rotation; DECA's orthographic camera looks down -Z unrotated."""
    if camera.type == "orthographic":
        return np.eye(3)
    return axis_angle_to_matrix(camera.rotation)


def _rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
