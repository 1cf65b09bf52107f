"""The preview backend: the face model itself, shaded with the rig's SH light, in real time.

Per batch of requests of one frame size: pose the face model (``FaceModel.pose_params``),
project, find the visible triangle per pixel, shade albedo * DECA SH, composite over a neutral
background and encode sRGB RGBA uint8 (alpha = face mask). Two paths give the same frames:

* "fast" (CPU): numba visibility plus one fused numba pass for shading, compositing and
  encoding (``renderer.shade_cpu``); only the pixels the face covers are shaded.
* "torch" (any device; the default off the CPU): ``BufferRenderer`` and torch compositing.

Result timings are milliseconds for the whole batch the frame was rendered in: ``skin``
(blend shapes + skinning), ``geometry`` (projection, vertex normals), ``raster`` (visibility),
``shade`` (interpolation + shading; on the fast path also compositing and encoding),
``encode`` (torch path: compositing, sRGB, copy to host), ``passes`` (extra buffers out).
"""

from __future__ import annotations

import numpy as np
import torch

from portrait_rig.params import RigParams
from portrait_rig.protocol import PASSES
from server.renderer.face_model import FaceModel
from server.renderer import BufferRenderer, Buffers, CameraBatch, project, screen_space
from server.renderer.buffers import CHANNELS, N_CHANNELS
from server.renderer.srgb import encode_torch

from server.backends.base import (Backend, RenderRequest, RenderResult, StageTimer,
                                  check_request, colour, torch_device)



class PreviewBackend(Backend):
    """Shaded face-model preview on "cpu" or "cuda". Options (validated in the registry,
    ``server.backends.SPECS``): ``background`` sRGB colour behind the face; ``path`` "auto"
    (fast on the CPU, torch elsewhere), "fast" or "torch"."""

    name = "preview"

    def __init__(self, face_model: FaceModel, device: str = "cpu",
                 background=(0.5, 0.5, 0.5), path: str = "auto"):
        super().__init__(face_model, device)
        self.torch_device = torch_device(device)
        if face_model.device != self.torch_device:
            face_model = FaceModel(face_model.data, self.torch_device)
        self.model = face_model
        self.background = np.round(np.asarray(colour(background)) * 255).astype(np.uint8)
        if path == "auto":
            path = "fast" if self.torch_device.type == "cpu" else "torch"
        if path == "fast" and self.torch_device.type != "cpu":
            raise ValueError(f"path 'fast' runs on the CPU, not on {self.torch_device}")
        self.path = path
        if path == "fast":
            from server.renderer.raster_cpu import NumbaRasterizer
            self._triangles_np = face_model.triangles.cpu().numpy().astype(np.int32)
            self._albedo_np = face_model.vertex_albedo.cpu().numpy()
            self._rasterizer = NumbaRasterizer(self._triangles_np)
            self._scratch: dict[tuple, dict] = {}       # arrays per (B, H, W)
        else:
            self.renderer = BufferRenderer(face_model.triangles, self.torch_device, "torch")
            self._reuse: dict[tuple, Buffers] = {}      # buffers per (B, H, W)

    # ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Render a small frame once: loads (or compiles and caches) the numba kernels."""
        self.render([RenderRequest(RigParams(), 32, 32, tuple(PASSES))])

    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, request in enumerate(requests):
            check_request(i, request)
            groups.setdefault((request.width, request.height), []).append(i)
        results: list[RenderResult | None] = [None] * len(requests)
        for (width, height), indices in groups.items():
            batch = [requests[i] for i in indices]
            for i, result in zip(indices, self._render_group(batch, width, height)):
                results[i] = result
        return results

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _render_group(self, requests: list[RenderRequest], width: int,
                      height: int) -> list[RenderResult]:
        lap = StageTimer(self.torch_device)
        params = [r.params for r in requests]
        # Frame by frame: a batched skinning sums in another order, and a frame's pixels must
        # not depend on which frames the scheduler happened to batch it with.
        vertices = torch.cat([self.model.pose_params([p])[0] for p in params])
        lap("skin")
        cameras = CameraBatch.from_params([p.camera for p in params], self.torch_device)
        sh = torch.tensor([p.lighting.sh for p in params], dtype=torch.float32)
        want_packed = any(r.passes for r in requests)
        if self.path == "fast":
            images, packed = self._fast(vertices, cameras, sh.numpy(), width, height,
                                        want_packed, lap)
        else:
            images, packed = self._torch(vertices, cameras, sh.to(self.torch_device), width,
                                         height, want_packed, lap)
        results = []
        for i, request in enumerate(requests):
            passes = {name: np.ascontiguousarray(packed[i, :, :, slice(*CHANNELS[name])])
                      for name in request.passes}
            results.append(RenderResult(image=images[i], passes=passes))
        lap("passes")
        for result in results:
            result.timings = dict(lap.times)
        return results

    def _fast(self, vertices, cameras, sh, width, height, want_packed, lap):
        from server.renderer.shade_cpu import shade_frame, vertex_normals_numba

        ndc, depth = project(vertices, cameras, width, height)
        pixel_xy, z_key, w = screen_space(ndc, depth, cameras, width, height)
        pixel_xy, z_key, w = pixel_xy.numpy(), z_key.numpy(), w.numpy()
        normals = vertex_normals_numba(np.ascontiguousarray(vertices.numpy()), self._triangles_np)
        albedo = np.broadcast_to(self._albedo_np, normals.shape)
        attributes = np.concatenate([depth.numpy()[..., None], normals, albedo], axis=-1)
        lap("geometry")
        batch = vertices.shape[0]
        key = (batch, height, width)
        if key not in self._scratch:                 # reused per size; passes are copied out
            self._scratch = {key: {"triangle": np.empty(key, np.int32)}}
        scratch = self._scratch[key]
        triangle = self._rasterizer(pixel_xy, z_key, width, height, out=scratch["triangle"])
        lap("raster")
        images = np.empty((batch, height, width, 4), np.uint8)    # handed out: never reused
        packed = None
        if want_packed:
            if "packed" not in scratch:
                scratch["packed"] = np.empty((*key, N_CHANNELS), np.float32)
            packed = scratch["packed"]
        shade_frame(triangle, pixel_xy, w, self._triangles_np, attributes, sh, self.background,
                    images, packed)
        lap("shade")
        return images, packed

    def _torch(self, vertices, cameras, sh, width, height, want_packed, lap):
        key = (vertices.shape[0], height, width)
        if key not in self._reuse:
            self._reuse.clear()
        buffers = self.renderer.render(vertices, self.model.vertex_albedo, sh, cameras, width,
                                       height, out=self._reuse.get(key), lap=lap)
        self._reuse[key] = buffers
        covered = buffers.mask > 0
        background = torch.as_tensor(self.background, device=self.torch_device)
        rgb = torch.where(covered, encode_torch(buffers.rendered), background)
        alpha = covered.to(torch.uint8) * 255
        images = torch.cat([rgb, alpha], dim=-1).cpu().numpy()
        lap("encode")
        packed = buffers.packed.cpu().numpy() if want_packed else None
        return images, packed

