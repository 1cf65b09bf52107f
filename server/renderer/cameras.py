"""Rig cameras as batched tensors, and projection from the model frame to the screen.

Conventions (shared by every renderer path):

* NDC: x right, y up, both in [-1, 1] across the frame's height; x is divided by the aspect
  ratio W / H so pixels stay square. The centre of column i, row r (rows top to bottom) is
  x = (i + 0.5) / W * 2 - 1, y = 1 - (r + 0.5) / H * 2.
* Pixel coordinates (what the visibility kernels take): px = (x + 1) / 2 * W, py = (1 - y) / 2 * H,
  so pixel (i, r) has its centre at (i + 0.5, r + 0.5).
* Perspective cameras follow Blender/OpenGL: the camera looks down its local -Z with +Y up;
  ``location`` and axis-angle ``rotation`` place it in the model frame; ``fov_y`` is the vertical
  field of view in degrees. View depth is the distance along the viewing axis.
* Orthographic cameras are DECA's: NDC = scale * (X + [tx, ty]) with +Y up, and depth = -Z
  (the camera sits on +Z looking down -Z at the face); near/far do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from portrait_rig.params import Camera
from portrait_rig.rotations import axis_angle_to_matrix


@dataclass
class CameraBatch:
    """B cameras as tensors on one device (build once per batch with ``from_params``).

    rotation     [B, 3, 3]  camera-to-model rotation (columns: the camera's X, Y, Z axes in the
                            model frame)
    location     [B, 3]     perspective camera position in the model frame (metres)
    focal        [B]        1 / tan(fov_y / 2): NDC y per unit of (camera y / view depth)
    near, far    [B]        perspective clipping depths (metres)
    scale        [B]        orthographic scale
    offset       [B, 2]     orthographic (tx, ty)
    perspective  [B] bool   True for perspective cameras, False for orthographic ones
    """
    rotation: torch.Tensor
    location: torch.Tensor
    focal: torch.Tensor
    near: torch.Tensor
    far: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    perspective: torch.Tensor

    @classmethod
    def from_params(cls, cameras: list[Camera], device="cpu",
                    dtype: torch.dtype = torch.float32) -> "CameraBatch":
        if not cameras:
            raise ValueError("cameras: expected at least one camera")
        for i, cam in enumerate(cameras):
            if cam.type not in Camera.TYPES:
                raise ValueError(f"cameras[{i}].type: must be one of {Camera.TYPES}, "
                                 f"got {cam.type!r}")
        table = np.array([[cam.fov_y, cam.near, cam.far, cam.scale, cam.tx, cam.ty,
                           *cam.location] for cam in cameras], dtype=np.float64)
        rotation = np.stack([axis_angle_to_matrix(cam.rotation) for cam in cameras])

        def t(array):
            return torch.as_tensor(array, dtype=dtype).to(device)

        return cls(rotation=t(rotation), location=t(table[:, 6:9]),
                   focal=t(1.0 / np.tan(np.radians(table[:, 0]) / 2)),
                   near=t(table[:, 1]), far=t(table[:, 2]), scale=t(table[:, 3]),
                   offset=t(table[:, 4:6]),
                   perspective=torch.tensor([cam.type == "perspective" for cam in cameras],
                                            device=device))

    def __len__(self) -> int:
        return self.rotation.shape[0]


def project(vertices: torch.Tensor, cameras: CameraBatch, width: int,
            height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-frame vertices [B, V, 3] -> (NDC xy [B, V, 2], view depth [B, V]).

    Differentiable. Perspective vertices behind the camera get a negative depth and meaningless
    NDC; ``screen_space`` marks them (and anything outside near/far) as not drawable.
    """
    _check_batch(vertices, cameras)
    inv_aspect = height / width
    ndc = depth = None
    if bool(cameras.perspective.any()):
        cam = (vertices - cameras.location[:, None, :]) @ cameras.rotation   # R^T (X - loc)
        p_depth = -cam[..., 2]
        safe = torch.where(p_depth.abs() > 1e-12, p_depth, torch.full_like(p_depth, 1e-12))
        scale = cameras.focal[:, None] / safe
        ndc = torch.stack([cam[..., 0] * scale * inv_aspect, cam[..., 1] * scale], dim=-1)
        depth = p_depth
    if not bool(cameras.perspective.all()):
        o_ndc = cameras.scale[:, None, None] * (vertices[..., :2] + cameras.offset[:, None, :])
        o_ndc = o_ndc * o_ndc.new_tensor([inv_aspect, 1.0])
        o_depth = -vertices[..., 2]
        if ndc is None:
            ndc, depth = o_ndc, o_depth
        else:
            persp = cameras.perspective[:, None]
            ndc = torch.where(persp[..., None], ndc, o_ndc)
            depth = torch.where(persp, depth, o_depth)
    return ndc, depth


def screen_space(ndc: torch.Tensor, depth: torch.Tensor, cameras: CameraBatch, width: int,
                 height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What visibility and interpolation need, from ``project``'s output.

    Returns
      pixel_xy [B, V, 2]  pixel coordinates (x right, y down; pixel centres at +0.5)
      z_key    [B, V]     screen-linear depth key, smaller is nearer: -1 / depth (perspective),
                          depth (orthographic); +inf for perspective vertices outside
                          [near, far], so triangles touching them are not drawn
      w        [B, V]     perspective divisor for perspective-correct interpolation: view depth
                          (perspective) or 1 (orthographic)
    """
    scale = ndc.new_tensor([width * 0.5, -height * 0.5])
    pixel_xy = (ndc * scale) + ndc.new_tensor([width * 0.5, height * 0.5])
    persp = cameras.perspective[:, None]
    in_range = (depth >= cameras.near[:, None]) & (depth <= cameras.far[:, None])
    inv = -1.0 / torch.where(in_range, depth, torch.ones_like(depth))
    z_key = torch.where(persp, torch.where(in_range, inv, torch.full_like(depth, math.inf)),
                        depth)
    w = torch.where(persp, depth, torch.ones_like(depth))
    return pixel_xy, z_key, w


def _check_batch(vertices: torch.Tensor, cameras: CameraBatch) -> None:
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices: expected [B, V, 3], got {list(vertices.shape)}")
    if vertices.shape[0] != len(cameras):
        raise ValueError(f"vertices has batch {vertices.shape[0]} but there are "
                         f"{len(cameras)} cameras")
