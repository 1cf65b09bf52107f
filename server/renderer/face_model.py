"""The face model on a torch device: FLAME-layout skinning with smplx's ``lbs``.

Wraps a ``portrait_rig.face_data.FaceData`` (the same arrays the Blender rig is built from)
as tensors on one device and poses batches of rig parameters.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from smplx.lbs import lbs

from portrait_rig.face_data import FaceData
from portrait_rig.params import RigParams
from server.renderer.threads import torch_threads

SINGLE_THREAD_BATCH = 8  # CPU batches up to this size are skinned on one thread


class FaceModel:
    """Tensors of a ``FaceData`` on ``device``; ``pose`` maps coefficients to posed meshes."""

    def __init__(self, data: FaceData, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.data = data
        self.device = torch.device(device)
        self.dtype = dtype

        def t(array, dt=dtype):
            return torch.as_tensor(array, dtype=dt, device=self.device)

        self.v_template = t(data.v_template)                                   # [V, 3]
        # smplx blends identity and expression with one basis: betas = [shape, expression].
        self.blend_dirs = t(np.concatenate([data.shapedirs, data.exprdirs], axis=2))  # [V,3,S+E]
        self.posedirs = t(data.posedirs.reshape(-1, data.posedirs.shape[2]).T)  # [36, V*3]
        self.J_regressor = t(data.J_regressor)                                  # [J, V]
        self.weights = t(data.weights)                                          # [V, J]
        self.parents = t(data.parents, torch.long)                              # [J]
        self.triangles = t(data.triangles, torch.long)                                  # [F, 3]
        self.vertex_albedo = t(data.vertex_albedo)                              # [V, 3]

    @property
    def n_shape(self) -> int:
        return self.data.n_shape

    @property
    def n_expression(self) -> int:
        return self.data.n_expression

    def pose(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
             translation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed vertices [B, V, 3] and joints [B, J, 3] in the model frame.

        shape [B, S], expression [B, E] (the model's full counts), pose [B, J, 3] axis-angle
        (FLAME joint order), translation [B, 3] added after posing. Differentiable.
        """
        betas = torch.cat([shape, expression], dim=1)
        # A few posed heads are too little work to split: on the CPU one thread is as fast
        # when the machine is quiet and far faster when another process holds a core.
        small = self.device.type == "cpu" and shape.shape[0] <= SINGLE_THREAD_BATCH
        with torch_threads(1) if small else contextlib.nullcontext():
            verts, joints = lbs(betas, pose.reshape(pose.shape[0], -1), self.v_template,
                                self.blend_dirs, self.posedirs, self.J_regressor, self.parents,
                                self.weights)
        if translation is not None:
            verts = verts + translation[:, None, :]
            joints = joints + translation[:, None, :]
        return verts, joints

    def coefficients(self, params: list[RigParams]) -> dict[str, torch.Tensor]:
        """Batch tensors from rig parameters, zero-padding short coefficient lists."""
        batch = len(params)
        shape = torch.zeros(batch, self.n_shape, dtype=self.dtype)
        expression = torch.zeros(batch, self.n_expression, dtype=self.dtype)
        for i, p in enumerate(params):
            p.validate_for_model(self.n_shape, self.n_expression)
            shape[i, : len(p.shape)] = torch.tensor(p.shape, dtype=self.dtype)
            expression[i, : len(p.expression)] = torch.tensor(p.expression, dtype=self.dtype)
        pose = torch.tensor([p.pose.joints() for p in params], dtype=self.dtype)
        translation = torch.tensor([p.translation for p in params], dtype=self.dtype)
        dev = self.device
        return {"shape": shape.to(dev), "expression": expression.to(dev),
                "pose": pose.to(dev), "translation": translation.to(dev)}

    def pose_params(self, params: list[RigParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pose`` for a list of rig parameters."""
        return self.pose(**self.coefficients(params))
