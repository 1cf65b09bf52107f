"""Face parameters -> rendered face and projected landmarks, differentiably (torch).

The rendering layer R of StyleRig on our buffer renderer: FLAME-layout skinning
(``server.renderer.face_model``), DECA's orthographic camera, the model's vertex albedo tinted by the
albedo field of ``server.models.dfr``, DECA SH shading. Gradients reach every face parameter
(visibility itself is not differentiable, as in any rasteriser).
"""

from __future__ import annotations

import torch

from portrait_rig.face_data import FaceData
from server.renderer.face_model import FaceModel
from server.photo.embedding import LandmarkEmbedding
from server.models.dfr import FaceParamLayout, FaceParams, albedo_basis
from server.renderer import BufferRenderer, Buffers, CameraBatch, project, screen_space


class FaceRenderer:
    """Renders ``FaceParams`` of one face model on one device."""

    def __init__(self, data: FaceData, embedding: LandmarkEmbedding, layout: FaceParamLayout,
                 device="cpu", rasterizer: str = "auto"):
        self.data, self.layout = data, layout
        self.model = FaceModel(data, device)
        self.device = self.model.device
        self.renderer = BufferRenderer(data.triangles, device, rasterizer)
        self.embedding = embedding.check(data)
        self.basis = torch.as_tensor(albedo_basis(data, layout.albedo_terms), device=self.device)

    def vertices(self, p: FaceParams) -> torch.Tensor:
        """Posed vertices [B, V, 3]: the coefficients zero-padded to the model's counts, the
        global and jaw rotations set, neck and eyes at rest."""
        m, batch = self.model, len(p)
        shape = torch.cat([p.shape, p.shape.new_zeros(batch, m.n_shape - p.shape.shape[1])], 1)
        expression = torch.cat([p.expression, p.expression.new_zeros(
            batch, m.n_expression - p.expression.shape[1])], 1)
        rest = p.global_pose.new_zeros(batch, 3)
        joints = [p.global_pose, rest, p.jaw] + [rest] * (m.parents.shape[0] - 3)
        return m.pose(shape, expression, torch.stack(joints, dim=1))[0]

    def cameras(self, p: FaceParams) -> CameraBatch:
        """DECA orthographic cameras whose scale and offset carry gradients."""
        batch, dev = len(p), p.camera.device
        ones = torch.ones(batch, device=dev)
        return CameraBatch(rotation=torch.eye(3, device=dev).expand(batch, 3, 3),
                           location=torch.zeros(batch, 3, device=dev), focal=ones,
                           near=ones * 1e-3, far=ones * 1e3, scale=p.camera[:, 0],
                           offset=p.camera[:, 1:], perspective=torch.zeros(
                               batch, dtype=torch.bool, device=dev))

    def vertex_albedo(self, p: FaceParams) -> torch.Tensor:
        """[B, V, 3]: the model's albedo times exp(basis @ coefficients)."""
        coeffs = p.albedo.reshape(len(p), self.layout.albedo_terms, 3)
        return self.model.vertex_albedo * torch.exp(self.basis @ coeffs)

    def landmarks(self, vertices: torch.Tensor, cameras: CameraBatch, size: int) -> torch.Tensor:
        """Projected landmarks [B, 68, 2] in renderer pixels of a ``size`` frame (pixel centres
        at +0.5; subtract 0.5 for dlib's convention)."""
        points = self.embedding.points(vertices, self.model.triangles)
        ndc, depth = project(points, cameras, size, size)
        return screen_space(ndc, depth, cameras, size, size)[0]

    def render(self, p: FaceParams, size: int) -> tuple[Buffers, torch.Tensor]:
        """(buffers [B, size, size, C], landmarks [B, 68, 2] renderer pixels)."""
        vertices = self.vertices(p)
        cameras = self.cameras(p)
        buffers = self.renderer.render(vertices, self.vertex_albedo(p), p.sh, cameras, size, size)
        return buffers, self.landmarks(vertices, cameras, size)
