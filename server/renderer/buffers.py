"""Attribute buffers from visibility: the differentiable half of the renderer (torch).

Given the nearest triangle per pixel, barycentrics are recomputed in torch from the pixel centres
and the projected vertices (as nvdiffrast's ``interpolate`` does), so gradients reach the
vertices; interpolation and shading then run on the covered pixels only and are scattered into
full frames.

Buffer conventions (``Buffers``): channels-last float32 [B, H, W, C], rows top to bottom, zero
outside the mask.

* mask      [.., 1]  1 where a triangle covers the pixel centre (not differentiable)
* depth     [.., 1]  view depth, perspective-correct (metres along the viewing axis; -Z for
                     orthographic cameras)
* normal    [.., 3]  unit vertex normals of the posed mesh in the model frame (area-weighted
                     triangle normals summed per vertex, then normalised), interpolated and NOT
                     renormalised (DiffusionRig's convention), in [-1, 1]
* albedo    [.., 3]  interpolated per-vertex albedo (linear)
* shading   [.., 3]  DECA SH irradiance of the interpolated normal: sum_k L[k] C[k] B_k(n)
* rendered  [.., 3]  albedo * shading (linear, unclamped)

Interpolation is perspective-correct: with screen barycentrics b_k and per-vertex divisors w_k
(view depth, or 1 for orthographic cameras), weights are (b_k / w_k) / sum_j (b_j / w_j).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from portrait_rig.sh import SH_CONSTANTS

from server.renderer.cameras import CameraBatch, project, screen_space

# Channel layout of the packed frame every buffer is a view of.
CHANNELS = {"mask": (0, 1), "depth": (1, 2), "normal": (2, 5), "albedo": (5, 8),
            "shading": (8, 11), "rendered": (11, 14)}
N_CHANNELS = 14


@dataclass
class Buffers:
    """Per-pixel buffers of a batch (see the module notes). Every float buffer is a view of
    ``packed`` [B, H, W, 14]; ``triangle`` [B, H, W] int32 holds the visible triangle (-1 for
    background)."""
    triangle: torch.Tensor
    packed: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor
    albedo: torch.Tensor
    shading: torch.Tensor
    rendered: torch.Tensor

    @classmethod
    def from_packed(cls, triangle: torch.Tensor, packed: torch.Tensor) -> "Buffers":
        views = {name: packed[..., a:b] for name, (a, b) in CHANNELS.items()}
        return cls(triangle=triangle, packed=packed, **views)

    def passes(self) -> dict[str, torch.Tensor]:
        """Name -> buffer, for the names in ``portrait_rig.protocol.PASSES``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in CHANNELS}


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals [B, V, 3]: area-weighted triangle normals (CCW = outward) summed per
    vertex, then normalised. Differentiable."""
    batch, n_verts, _ = vertices.shape
    corners = vertices[:, triangles.reshape(-1)].view(batch, -1, 3, 3)          # [B, F, 3, 3]
    triangle_normal = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0],
                                         corners[:, :, 2] - corners[:, :, 0])  # |n| = 2 * area
    # One index_add over a flat [B*V, 3] table (much faster on the CPU than over dim 1).
    offsets = n_verts * torch.arange(batch, device=triangles.device)[:, None]
    target = triangles.reshape(1, -1) + offsets
    normals = vertices.new_zeros(batch * n_verts, 3).index_add(
        0, target.reshape(-1), triangle_normal.repeat_interleave(3, dim=1).reshape(-1, 3))
    normals = normals.view(batch, n_verts, 3)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """[..., 3] normals -> [..., 9] DECA basis times ``SH_CONSTANTS``."""
    x, y, z = normals.unbind(-1)
    basis = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                         3 * z * z - 1], dim=-1)
    return basis * basis.new_tensor(SH_CONSTANTS)


def barycentrics(pixel_xy: torch.Tensor, w: torch.Tensor, triangles: torch.Tensor,
                 triangle: torch.Tensor, width: int, height: int):
    """Perspective-correct barycentrics of the covered pixels.

    pixel_xy [B, V, 2], w [B, V] (``cameras.screen_space``), triangles [F, 3] long, triangle
    [B, H, W] int. Returns (pixel [N] flat index into B*H*W, batch [N], vertex [N, 3] flat index
    into B*V, weights [N, 3]); pixels come in increasing order, so grouped by image.
    """
    batch, n_verts = w.shape
    flat = triangle.reshape(-1)
    pixel = torch.nonzero(flat >= 0).squeeze(1)
    image = pixel // (height * width)
    rest = pixel - image * (height * width)
    row, col = rest // width, rest % width
    vertex = triangles[flat[pixel].long()] + (image * n_verts)[:, None]          # [N, 3]
    p = pixel_xy.reshape(-1, 2)[vertex]                                      # [N, 3, 2]
    px = col.to(p.dtype) + 0.5
    py = row.to(p.dtype) + 0.5

    def edge(a, b):  # doubled signed area of (p_a, p_b, pixel centre)
        return ((p[:, b, 0] - p[:, a, 0]) * (py - p[:, a, 1])
                - (p[:, b, 1] - p[:, a, 1]) * (px - p[:, a, 0]))

    # Screen barycentrics are edge / area; the area cancels in the perspective normalisation.
    screen = torch.stack([edge(1, 2), edge(2, 0), edge(0, 1)], dim=1)
    weights = screen / w.reshape(-1)[vertex]
    weights = weights / weights.sum(dim=1, keepdim=True)
    return pixel, image, vertex, weights


class BufferRenderer:
    """Renders ``Buffers`` for one mesh topology on one device.

    ``rasterizer``: "numba" (CPU only), "torch" (any device), or "auto" (numba on the CPU,
    torch elsewhere). Visibility is not differentiable; everything after it is, with respect to
    vertices, vertex albedo and SH light.
    """

    def __init__(self, triangles, device="cpu", rasterizer: str = "auto"):
        self.device = torch.device(device)
        self.triangles = torch.as_tensor(triangles).to(self.device, torch.long)
        if self.triangles.ndim != 2 or self.triangles.shape[1] != 3:
            raise ValueError(f"triangles: expected [F, 3], got {list(self.triangles.shape)}")
        if rasterizer == "auto":
            rasterizer = "numba" if self.device.type == "cpu" else "torch"
        if rasterizer not in ("numba", "torch"):
            raise ValueError(f"rasterizer: expected 'auto', 'numba' or 'torch', got {rasterizer!r}")
        if rasterizer == "numba" and self.device.type != "cpu":
            raise ValueError(f"rasterizer 'numba' runs on the CPU, not on {self.device}")
        self.rasterizer = rasterizer
        self._max_index = int(self.triangles.max()) if self.triangles.numel() else -1
        self._numba = None

    def visibility(self, pixel_xy: torch.Tensor, z_key: torch.Tensor, width: int,
                   height: int) -> torch.Tensor:
        """Triangle ids [B, H, W] int32 on the renderer's device (-1 background)."""
        if self.rasterizer == "torch":
            from server.renderer.raster_torch import rasterize_torch
            return rasterize_torch(pixel_xy, z_key, self.triangles, width, height)
        if self._numba is None:
            from server.renderer.raster_cpu import NumbaRasterizer
            self._numba = NumbaRasterizer(self.triangles)
        return torch.from_numpy(self._numba(pixel_xy, z_key, width, height))

    def render(self, vertices: torch.Tensor, vertex_albedo: torch.Tensor, sh: torch.Tensor,
               cameras, width: int, height: int, out: Buffers | None = None,
               lap=None) -> Buffers:
        """Buffers of a batch.

        vertices [B, V, 3] model frame; vertex_albedo [V, 3] or [B, V, 3] linear; sh [9, 3] or
        [B, 9, 3] DECA light codes; cameras a ``CameraBatch`` or a list of B
        ``portrait_rig.params.Camera``. ``out`` (inference only) is a previous result of the
        same size whose memory is reused and overwritten. ``lap(stage)``, if given, is called
        after the "geometry", "raster" and "shade" stages (for timings).
        """
        lap = lap or _no_lap
        vertices, vertex_albedo, sh = self._check(vertices, vertex_albedo, sh, width, height)
        batch = vertices.shape[0]
        if not isinstance(cameras, CameraBatch):
            cameras = CameraBatch.from_params(list(cameras), self.device, vertices.dtype)
        ndc, depth = project(vertices, cameras, width, height)
        pixel_xy, z_key, w = screen_space(ndc, depth, cameras, width, height)
        normals = vertex_normals(vertices, self.triangles)
        lap("geometry")
        with torch.no_grad():
            triangle = self.visibility(pixel_xy, z_key, width, height).to(self.device)
        lap("raster")

        pixel, image, vertex, weights = barycentrics(pixel_xy, w, self.triangles, triangle,
                                                     width, height)
        attributes = torch.cat([depth[..., None], normals, vertex_albedo], dim=-1)  # [B, V, 7]
        values = (weights[..., None] * attributes.reshape(-1, 7)[vertex]).sum(dim=1)
        pix_depth, pix_normal, pix_albedo = values.split([1, 3, 3], dim=1)
        shading = _shade_grouped(pix_normal, sh, image, batch)
        fragment = torch.cat([torch.ones_like(pix_depth), pix_depth, pix_normal, pix_albedo,
                              shading, pix_albedo * shading], dim=1)             # [N, 14]

        size = batch * height * width
        if out is not None:
            if torch.is_grad_enabled() and fragment.requires_grad:
                raise ValueError("out: buffers can only be reused under torch.no_grad()")
            if out.packed.shape != (batch, height, width, N_CHANNELS):
                raise ValueError(f"out: buffers of shape {list(out.packed.shape)} do not fit "
                                 f"a batch of {batch} at {width}x{height}")
            packed = out.packed.view(size, N_CHANNELS).zero_()
            packed.index_copy_(0, pixel, fragment)
        else:
            packed = fragment.new_zeros(size, N_CHANNELS).index_put((pixel,), fragment)
        lap("shade")
        return Buffers.from_packed(triangle, packed.view(batch, height, width, N_CHANNELS))

    def _check(self, vertices, vertex_albedo, sh, width, height):
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise ValueError(f"frame size must be positive integers, got {width}x{height}")
        if vertices.ndim != 3 or vertices.shape[-1] != 3:
            raise ValueError(f"vertices: expected [B, V, 3], got {list(vertices.shape)}")
        batch, n_verts = vertices.shape[:2]
        if self._max_index >= n_verts:
            raise ValueError(f"vertices: {n_verts} vertices, but triangles index up to "
                             f"{self._max_index}")
        if vertex_albedo.ndim == 2:
            vertex_albedo = vertex_albedo.expand(batch, -1, -1)
        if vertex_albedo.shape != (batch, n_verts, 3):
            raise ValueError(f"vertex_albedo: expected [V, 3] or [B, V, 3] with B={batch}, "
                             f"V={n_verts}, got {list(vertex_albedo.shape)}")
        if sh.ndim == 2:
            sh = sh.expand(batch, -1, -1)
        if sh.shape != (batch, 9, 3):
            raise ValueError(f"sh: expected [9, 3] or [B, 9, 3] with B={batch}, "
                             f"got {list(sh.shape)}")
        return vertices, vertex_albedo.to(vertices.dtype), sh.to(vertices.dtype)


def _no_lap(stage: str) -> None:
    pass


def _shade_grouped(normal: torch.Tensor, sh: torch.Tensor, image: torch.Tensor,
                   batch: int) -> torch.Tensor:
    """SH shading of pixels [N, 3] grouped by image (sorted ``image`` ids) with sh [B, 9, 3]."""
    basis = sh_basis(normal)                                                  # [N, 9]
    if batch == 1:
        return basis @ sh[0]
    counts = torch.bincount(image, minlength=batch).tolist()
    parts = [part @ sh[b] for b, part in enumerate(basis.split(counts))]
    return torch.cat(parts, dim=0)
