"""DiffusionRig's conditioning buffers, rendered in DECA's conventions from rig parameters.

DiffusionRig (adobe-research/diffusion-rig, ``scripts/create_data.py``) was trained on buffers
that DECA (``decalib/deca.py``, ``decalib/utils/renderer.py``) rendered from its per-photo codes
into the 256 x 256 FFHQ-aligned photo. This module reproduces them from a ``RigParams``:

* Codes (``DecaCodes``): FLAME with DECA's slicing - the first 100 identity and 50 expression
  components, pose = global (3) + jaw (3) axis-angle with neck and eyes at zero, an
  orthographic camera (s, tx, ty), 9 x 3 SH light and the texture code (``appearance.texture``,
  DECA's ``tex``). ``deca_codes`` maps the rig's richer parameters onto them (its docstring
  lists the approximations).
* Projection: NDC = s * (X + [tx, ty]) on the posed mesh, +Y up; the frame's rows run top to
  bottom, so the forehead is at the top and the subject's left (+X) on the image's right.
  DECA projects into its 224 crop and maps the result into the aligned photo with the crop's
  similarity transform; both are scale + offset, so one (s, tx, ty) in the output frame is the
  same projection. Visibility is the nearest surface (largest Z).
* Buffers, channels last [B, S, S, C], rows top to bottom, zero outside the face mask:
  ``normal``: unit vertex normals of the posed mesh (area-weighted triangle normals, normalised)
  in DECA's world frame (= the camera frame: +Z towards the viewer), interpolated with screen
  barycentrics (exact for an orthographic camera) and not renormalised, in [-1, 1];
  ``albedo``: display-referred code values / 255 in [0, 1], from FLAME's texture space at each
  request's texture code, sampled per pixel (``renderer.texture``), or, for a face model
  without a texture space (the demo head; texture codes are then ignored), from its per-vertex
  albedo, which is linear and so sRGB-encoded per vertex first; ``shading``: DECA's SH irradiance of the interpolated
  normal; ``rendered`` = albedo * shading, unclamped.
* ``conditioning`` stacks them as the UNet takes them: [B, 9, S, S] = (rendered, normal,
  albedo), NCHW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from portrait_rig.face_data import FaceData
from portrait_rig.params import RigParams
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from server.models.deca_encoder import N_EXPRESSION, N_SHAPE
from server.renderer.face_model import FaceModel
from server.renderer.head_view import camera_light, camera_rotation, head_rotation
from server.renderer import BufferRenderer, Buffers, CameraBatch
from portrait_rig.colour import linear_to_srgb
from server.renderer.texture import FlameTexture, textured

CODE_FIELDS = ("shape", "exp", "pose", "cam", "light", "tex")


@dataclass
class DecaCodes:
    """DECA's codes for a batch, float32 CPU tensors.

    shape [B, 100], exp [B, 50], pose [B, 6] (global then jaw axis-angle), cam [B, 3]
    (s, tx, ty) for a square frame, light [B, 9, 3], tex [B, n] (texture codes zero-padded to
    the longest of the batch; n = 0 when every request uses the mean texture). Components the
    face model lacks (the demo head has fewer than 100 identity components) stay zero and are
    unused.
    """
    shape: torch.Tensor
    exp: torch.Tensor
    pose: torch.Tensor
    cam: torch.Tensor
    light: torch.Tensor
    tex: torch.Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]

    def take(self, indices) -> "DecaCodes":
        """The codes of items ``indices`` (a list of ints or a slice)."""
        return DecaCodes(*(getattr(self, f)[indices] for f in CODE_FIELDS))

    @staticmethod
    def cat(parts: list["DecaCodes"]) -> "DecaCodes":
        """One batch of several (texture codes zero-padded to the longest)."""
        n = max(p.tex.shape[1] for p in parts)
        tex = torch.cat([F.pad(p.tex, (0, n - p.tex.shape[1])) for p in parts])
        return DecaCodes(*(torch.cat([getattr(p, f) for p in parts]) for f in CODE_FIELDS[:-1]),
                         tex)


class RigGeometry:
    """The linear quantities ``deca_codes`` needs from a face model: joints and the centroid of
    the shaped (unposed) mesh as functions of the coefficients, precomputed so that a batch
    costs a few small products instead of a pass over every vertex."""

    def __init__(self, data: FaceData):
        dirs = np.concatenate([data.shapedirs, data.exprdirs], axis=2).astype(np.float64)
        regressor = data.J_regressor.astype(np.float64)
        self.n_shape, self.n_expression = data.n_shape, data.n_expression
        self.joints_template = regressor @ data.v_template.astype(np.float64)      # [J, 3]
        self.joints_dirs = np.einsum("jv,vck->jck", regressor, dirs)              # [J, 3, K]
        self.centroid_template = data.v_template.astype(np.float64).mean(axis=0)  # [3]
        self.centroid_dirs = dirs.mean(axis=0)                                     # [3, K]

    def coefficients(self, shape, expression) -> np.ndarray:
        """[S + E] float64: ``shape`` and ``expression`` cut or zero-padded to the model's
        counts."""
        shape = np.asarray(shape, dtype=np.float64)[: self.n_shape]
        expression = np.asarray(expression, dtype=np.float64)[: self.n_expression]
        out = np.zeros(self.n_shape + self.n_expression)
        out[: len(shape)] = shape
        out[self.n_shape: self.n_shape + len(expression)] = expression
        return out

    def joints(self, coefficients: np.ndarray) -> np.ndarray:
        """Rest joints [J, 3] of the shaped mesh (FLAME regresses them after blend shapes)."""
        return self.joints_template + self.joints_dirs @ coefficients

    def centroid(self, coefficients: np.ndarray) -> np.ndarray:
        """Mean vertex [3] of the shaped mesh."""
        return self.centroid_template + self.centroid_dirs @ coefficients


def deca_codes(params: list[RigParams], geometry: RigGeometry, width: int,
               height: int) -> DecaCodes:
    """DECA's codes for rendering each ``params`` into the square that covers a width x height
    frame (side max(width, height), centred, so the frame is its centre crop).

    The rig has more degrees of freedom than DECA; they are mapped as follows (R(a) is the
    rotation of axis-angle a, J_k the rest joints of the rig's shaped mesh, J'_k those of the
    DECA mesh, built from the first 100 / 50 coefficients):

    * Identity / expression: the first 100 / 50 coefficients; the rest are dropped.
    * Neck: folded into the global rotation, R_d = R_c^T R(global) R(neck), R_c the camera's
      rotation (identity for the orthographic camera). DECA rotates about the root, the rig's
      neck about J_1; the difference is a constant offset c (below) that moves into the camera.
      What remains is FLAME's neck skinning blend and pose correctives, which DECA never had.
    * Eyes: dropped (DECA's eye pose is always zero). Jaw: passed through.
    * Placement: the rig puts a DECA-posed vertex X_d at X_d + c in the camera frame, with
      c = R_c^T (R(global) ((I - R(neck)) J_1 - J_0) + J_0 + translation - location)
          + R_d J'_0 - J'_0
      (location = 0 for the orthographic camera), so the projection is exact up to the neck
      blend for the orthographic camera: (s, tx, ty) = (scale * H / S, tx + c_x, ty + c_y).
    * Perspective camera: weak perspective about the head's centroid p (the DECA mesh's mean
      vertex in the camera frame): s = cot(fov_y / 2) * (H / S) / depth(p), (tx, ty) = c_xy.
      Points at depth depth(p) + dz are off by a factor dz / depth(p) (+-8 % at the nose and
      ears for a head 1.2 m away); long lenses make it negligible.
    * Light: DECA shades camera-frame normals, the rig's SH is given in the model frame, so it
      is rotated into the camera frame (``head_view.camera_light``).
    * Texture: ``appearance.texture`` as it is (DECA's ``tex``), zero-padded to the batch's
      longest.
    """
    side = max(width, height)
    batch = len(params)
    shape = np.zeros((batch, N_SHAPE))
    exp = np.zeros((batch, N_EXPRESSION))
    pose = np.zeros((batch, 6))
    cam = np.zeros((batch, 3))
    light = np.zeros((batch, 9, 3))
    tex = np.zeros((batch, max(len(p.appearance.texture) for p in params)))
    for b, p in enumerate(params):
        p.validate_for_model(geometry.n_shape, geometry.n_expression)
        n_s, n_e = min(len(p.shape), N_SHAPE), min(len(p.expression), N_EXPRESSION)
        shape[b, :n_s], exp[b, :n_e] = p.shape[:n_s], p.expression[:n_e]
        rig_joints = geometry.joints(geometry.coefficients(p.shape, p.expression))
        deca_coeffs = geometry.coefficients(shape[b], exp[b])
        deca_joints = geometry.joints(deca_coeffs)

        perspective = p.camera.type == "perspective"
        r_cam = camera_rotation(p.camera)
        location = np.asarray(p.camera.location) if perspective else np.zeros(3)
        r_global, r_neck = axis_angle_to_matrix(p.pose.global_), axis_angle_to_matrix(p.pose.neck)
        r_deca = head_rotation(p)
        j0, j1 = rig_joints[0], rig_joints[1]
        offset = (r_cam.T @ (r_global @ (j1 - r_neck @ j1 - j0) + j0
                             + np.asarray(p.translation) - location)
                  + r_deca @ deca_joints[0] - deca_joints[0])
        pose[b, :3], pose[b, 3:] = matrix_to_axis_angle(r_deca), p.pose.jaw
        if perspective:
            centre = (r_deca @ (geometry.centroid(deca_coeffs) - deca_joints[0])
                      + deca_joints[0] + offset)
            depth = -centre[2]
            if depth <= p.camera.near:
                raise ValueError(f"camera: the head's centre is {depth:.3g} m in front of the "
                                 "camera, not beyond its near plane")
            scale = (1.0 / math.tan(math.radians(p.camera.fov_y) / 2)) / depth
            cam[b] = (scale * height / side, offset[0], offset[1])
        else:
            cam[b] = (p.camera.scale * height / side, p.camera.tx + offset[0],
                      p.camera.ty + offset[1])
        light[b] = camera_light(p)
        tex[b, :len(p.appearance.texture)] = p.appearance.texture

    def t(array):
        return torch.from_numpy(array).float()

    return DecaCodes(t(shape), t(exp), t(pose), t(cam), t(light), t(tex))


def pose_inputs(codes: DecaCodes, model: FaceModel):
    """``FaceModel.pose``'s shape [B, S], expression [B, E] and pose [B, J, 3] for DECA codes
    (global and jaw rotations from the codes, the other joints at rest), on the model's
    device."""
    batch = len(codes)
    shape = torch.zeros(batch, model.n_shape)
    expression = torch.zeros(batch, model.n_expression)
    n_s, n_e = min(model.n_shape, N_SHAPE), min(model.n_expression, N_EXPRESSION)
    shape[:, :n_s], expression[:, :n_e] = codes.shape[:, :n_s], codes.exp[:, :n_e]
    pose = torch.zeros(batch, model.parents.shape[0], 3)
    pose[:, 0], pose[:, 2] = codes.pose[:, :3], codes.pose[:, 3:]
    device = model.device
    return shape.to(device), expression.to(device), pose.to(device)


class DecaBufferRenderer:
    """Poses the face model with DECA codes and renders DiffusionRig's buffers.

    ``texture`` (a ``FlameTexture`` on the model's device, for a face model with FLAME's
    topology) gives the albedo at each item's texture code; without it the face model's
    per-vertex albedo is used. ``rasterizer`` as ``BufferRenderer`` ("auto": numba on the
    CPU, torch elsewhere).
    """

    def __init__(self, face_model: FaceModel, texture: FlameTexture | None = None,
                 rasterizer: str = "auto"):
        self.model = face_model
        self.device = face_model.device
        self.geometry = RigGeometry(face_model.data)
        self.renderer = BufferRenderer(face_model.triangles, self.device, rasterizer)
        # DECA's albedo is display-referred (texture code values), the face model's linear.
        encoded = linear_to_srgb(face_model.data.vertex_albedo)
        self.vertex_albedo = torch.as_tensor(encoded, dtype=torch.float32, device=self.device)
        if texture is not None:
            texture.check_triangles(face_model.triangles.shape[0])
        self.texture = texture

    def codes(self, params: list[RigParams], width: int, height: int) -> DecaCodes:
        return deca_codes(params, self.geometry, width, height)

    def vertices(self, codes: DecaCodes) -> torch.Tensor:
        """DECA-posed vertices [B, V, 3] in DECA's world frame (no translation)."""
        return self.model.pose(*pose_inputs(codes, self.model))[0]

    def cameras(self, codes: DecaCodes) -> CameraBatch:
        """DECA's orthographic cameras as the renderer's ``CameraBatch``."""
        return orthographic_cameras(codes.cam.to(self.device))

    def render(self, codes: DecaCodes, size: int) -> Buffers:
        """Buffers [B, size, size, C] (see the module notes)."""
        vertices = self.vertices(codes)
        cameras = self.cameras(codes)
        light = codes.light.to(self.device)
        buffers = self.renderer.render(vertices, self.vertex_albedo, light, cameras, size, size)
        if self.texture is None:
            return buffers
        maps = self.texture.albedo_map(codes.tex.to(self.device))
        return textured(buffers, maps, self.texture.face_uv, vertices, cameras,
                        self.renderer.triangles)

    @staticmethod
    def conditioning(buffers: Buffers) -> torch.Tensor:
        """The UNet's physical condition [B, 9, S, S]: rendered, normal, albedo (NCHW)."""
        return torch.cat([buffers.rendered, buffers.normal, buffers.albedo],
                         dim=-1).permute(0, 3, 1, 2).contiguous()


def orthographic_cameras(cam: torch.Tensor) -> CameraBatch:
    """DECA's cameras (s, tx, ty) [B, 3] as the renderer's ``CameraBatch`` on cam's device."""
    batch, device = cam.shape[0], cam.device
    return CameraBatch(rotation=torch.eye(3, device=device).expand(batch, 3, 3),
                       location=torch.zeros(batch, 3, device=device),
                       focal=torch.ones(batch, device=device),
                       near=torch.zeros(batch, device=device),
                       far=torch.full((batch,), math.inf, device=device),
                       scale=cam[:, 0].contiguous(), offset=cam[:, 1:].contiguous(),
                       perspective=torch.zeros(batch, dtype=torch.bool, device=device))
