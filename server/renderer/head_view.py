"""The head as the camera sees it: one definition for every backend.

The rig places the head in the model frame (``pose.global`` about the root, ``pose.neck``
about the neck joint, ``translation``) and views it through ``params.camera``, which may be
rotated and moved (other clients than the add-on do that; the add-on sends the camera at the
origin). Networks that draw portraits - StyleGAN + RigNet, DiffusionRig - only ever saw
camera-relative quantities: a face photo shows how the head is turned *relative to the
camera* and the light *in the camera's frame*. ``head_views`` computes them once:

``rotation``  [3, 3] R_c^T R(global) R(neck): the rotation of everything above the neck
              relative to the camera (R_c the camera-to-model rotation, identity for DECA's
              orthographic camera). Neck and global rotation are one rigid turn of the head
              for a portrait network; FLAME's neck skinning blend is the only difference.
``swing``     [3] axis-angle of ``rotation`` with its roll removed: the part an aligned
              (upright, centred) portrait can show, yaw and pitch. RigNet's and DFR's
              ``global_pose`` control.
``roll``      radians of ``rotation`` about the viewing axis, counter-clockwise as displayed:
              only an image-plane transform shows it (StyleGAN3's input transform).
``shift``     (tx, ty): where the head's origin (``translation``) lands relative to the
              frame's centre, in units of the side of the square the frame is cropped from
              (max(width, height)), x right, y down: StyleGAN3's translation units.
``light``     [9, 3] the rig's SH light (given in the model frame) rotated into the camera
              frame, DECA's convention: the lighting every network is conditioned on, and the
              frame DFR estimates it in during StyleRig training.

So an orbit of the camera about a fixed head, or a neck turn in place of a global one, gives
the same view; a light that rotates with the camera leaves ``light`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from portrait_rig import sh
from portrait_rig.params import Camera, RigParams
from portrait_rig.rotations import axis_angle_to_matrix, split_roll
from server.renderer.cameras import CameraBatch, project


@dataclass(frozen=True)
class HeadView:
    """One parameter set's head relative to its camera (see the module notes)."""
    rotation: np.ndarray
    swing: np.ndarray
    roll: float
    shift: tuple[float, float]
    light: np.ndarray


def camera_rotation(camera: Camera) -> np.ndarray:
    """Camera-to-model rotation [3, 3]; DECA's orthographic camera looks down -Z unrotated."""
    if camera.type == "orthographic":
        return np.eye(3)
    return axis_angle_to_matrix(camera.rotation)


def head_rotation(params: RigParams) -> np.ndarray:
    """R_c^T R(global) R(neck) [3, 3] (float64)."""
    return (camera_rotation(params.camera).T @ axis_angle_to_matrix(params.pose.global_)
            @ axis_angle_to_matrix(params.pose.neck))


def camera_light(params: RigParams) -> np.ndarray:
    """The rig's SH light [9, 3] in the camera frame."""
    return sh.rotate(params.lighting.sh, camera_rotation(params.camera).T)


def head_views(params: list[RigParams], width: int, height: int) -> list[HeadView]:
    """``HeadView`` of each parameter set for a ``width`` x ``height`` frame."""
    cameras = CameraBatch.from_params([p.camera for p in params], dtype=torch.float64)
    origins = torch.tensor([p.translation for p in params], dtype=torch.float64)[:, None]
    ndc, depth = project(origins, cameras, width, height)
    side = max(width, height)
    views = []
    for p, (x, y), z in zip(params, ndc[:, 0].tolist(), depth[:, 0].tolist()):
        rotation = head_rotation(p)
        swing, roll = split_roll(rotation)
        visible = z > 0 or p.camera.type == "orthographic"
        shift = (x * width / 2 / side, -y * height / 2 / side) if visible else (0.0, 0.0)
        views.append(HeadView(rotation, swing, roll, shift, camera_light(p)))
    return views
