"""CPU inference fast path: vertex normals, and interpolation, SH shading, compositing and sRGB
encoding fused into one numba pass over the frame.

It evaluates the same formulas as ``buffers`` (perspective-correct barycentrics recomputed from
the pixel centres, interpolated unit vertex normals without renormalisation, DECA SH, albedo *
shading) in float32 and writes the display frame directly, plus the packed float buffers
(``buffers.CHANNELS`` layout) when passes are wanted. Not differentiable: training uses
``BufferRenderer``; tests hold the two to the same numbers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from portrait_rig.sh import SH_CONSTANTS

from server.renderer.buffers import N_CHANNELS
from server.renderer.srgb import LUT, THRESHOLDS
from server.renderer.threads import PREVIEW, StageThreads

_SH_CONSTANTS = SH_CONSTANTS.astype(np.float32)
_THRESHOLDS_PADDED = np.append(THRESHOLDS, np.float32(np.inf))


@njit(cache=True)
def _vertex_normals(vertices, triangles, out):
    batch, n_verts, _ = vertices.shape
    for b in range(batch):
        out[b] = 0
        for f in range(triangles.shape[0]):
            i0, i1, i2 = triangles[f, 0], triangles[f, 1], triangles[f, 2]
            ax = vertices[b, i1, 0] - vertices[b, i0, 0]
            ay = vertices[b, i1, 1] - vertices[b, i0, 1]
            az = vertices[b, i1, 2] - vertices[b, i0, 2]
            bx = vertices[b, i2, 0] - vertices[b, i0, 0]
            by = vertices[b, i2, 1] - vertices[b, i0, 1]
            bz = vertices[b, i2, 2] - vertices[b, i0, 2]
            nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
            for i in (i0, i1, i2):
                out[b, i, 0] += nx
                out[b, i, 1] += ny
                out[b, i, 2] += nz
        for i in range(n_verts):
            length = np.sqrt(out[b, i, 0] ** 2 + out[b, i, 1] ** 2 + out[b, i, 2] ** 2)
            length = max(length, np.float32(1e-20))
            for k in range(3):
                out[b, i, k] /= length


def vertex_normals_numba(vertices: np.ndarray, triangles: np.ndarray,
                         out: np.ndarray | None = None) -> np.ndarray:
    """``buffers.vertex_normals`` for float32 numpy arrays [B, V, 3] (triangles [F, 3] int32),
    written into ``out`` if given."""
    if out is None:
        out = np.empty_like(vertices)
    _vertex_normals(vertices, triangles, out)
    return out


@njit(cache=True, inline="always")
def _encode(x, lut, thresholds):
    """Linear float32 -> exact sRGB code value (see ``srgb``). One LUT cell spans less than
    one code value, so the cell's code plus one comparison is exact; ``thresholds`` ends with
    +inf so the comparison needs no bounds check."""
    if not x > 0:                                     # also NaN
        x = np.float32(0)
    elif x > 1:
        x = np.float32(1)
    v = lut[int(x * np.float32(lut.shape[0] - 1))]
    return v + np.uint8(thresholds[v] <= x)


@njit(cache=True, parallel=True)
def _shade(tri, pixel_xy, inv_w, triangles, attributes, light, background, lut, thresholds,
           want_packed, rgba, packed):
    batch, height, width = tri.shape
    half = np.float32(0.5)
    for job in prange(batch * height):
        b = job // height
        r = job % height
        py = np.float32(r) + half
        for c in range(width):
            f = tri[b, r, c]
            if f < 0:
                rgba[b, r, c, 0] = background[0]
                rgba[b, r, c, 1] = background[1]
                rgba[b, r, c, 2] = background[2]
                rgba[b, r, c, 3] = 0
                if want_packed:
                    for k in range(N_CHANNELS):
                        packed[b, r, c, k] = 0
                continue
            px = np.float32(c) + half
            i0, i1, i2 = triangles[f, 0], triangles[f, 1], triangles[f, 2]
            x0, y0 = pixel_xy[b, i0, 0], pixel_xy[b, i0, 1]
            x1, y1 = pixel_xy[b, i1, 0], pixel_xy[b, i1, 1]
            x2, y2 = pixel_xy[b, i2, 0], pixel_xy[b, i2, 1]
            e0 = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
            e1 = (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2)
            e2 = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
            # Perspective-correct weights (e_k / w_k) / sum: the doubled area cancels.
            q0, q1, q2 = e0 * inv_w[b, i0], e1 * inv_w[b, i1], e2 * inv_w[b, i2]
            scale = np.float32(1) / (q0 + q1 + q2)
            q0, q1, q2 = q0 * scale, q1 * scale, q2 * scale
            a0, a1, a2 = attributes[b, i0], attributes[b, i1], attributes[b, i2]
            depth = q0 * a0[0] + q1 * a1[0] + q2 * a2[0]
            nx = q0 * a0[1] + q1 * a1[1] + q2 * a2[1]
            ny = q0 * a0[2] + q1 * a1[2] + q2 * a2[2]
            nz = q0 * a0[3] + q1 * a1[3] + q2 * a2[3]
            basis = (np.float32(1), nx, ny, nz, nx * ny, nx * nz, ny * nz, nx * nx - ny * ny,
                     np.float32(3) * nz * nz - np.float32(1))
            for ch in range(3):
                albedo = q0 * a0[4 + ch] + q1 * a1[4 + ch] + q2 * a2[4 + ch]
                s = np.float32(0)
                for k in range(9):
                    s += basis[k] * light[b, k, ch]
                out = albedo * s
                rgba[b, r, c, ch] = _encode(out, lut, thresholds)
                if want_packed:
                    packed[b, r, c, 5 + ch] = albedo
                    packed[b, r, c, 8 + ch] = s
                    packed[b, r, c, 11 + ch] = out
            if want_packed:
                packed[b, r, c, 0] = 1
                packed[b, r, c, 1] = depth
                packed[b, r, c, 2] = nx
                packed[b, r, c, 3] = ny
                packed[b, r, c, 4] = nz
            rgba[b, r, c, 3] = 255


def shade_frame(triangle: np.ndarray, pixel_xy: np.ndarray, w: np.ndarray, triangles: np.ndarray,
                attributes: np.ndarray, sh: np.ndarray, background: np.ndarray,
                rgba: np.ndarray, packed: np.ndarray | None = None,
                threads: StageThreads = PREVIEW) -> None:
    """Fill ``rgba`` [B, H, W, 4] uint8 (sRGB of albedo * shading where covered, ``background``
    [3] uint8 elsewhere; alpha = mask * 255) and, if given, ``packed`` [B, H, W, 14] float32
    (``buffers.CHANNELS``).

    triangle [B, H, W] int32 from visibility; pixel_xy [B, V, 2] and w [B, V] from
    ``cameras.screen_space``; triangles [F, 3] int32; attributes [B, V, 7] = (view depth, unit
    vertex normal, linear albedo); sh [B, 9, 3] DECA light codes. All float arrays float32.
    ``threads`` picks numba's thread count for the pass by measurement.
    """
    batch, height, width = triangle.shape
    n_verts = pixel_xy.shape[1]
    expected = {"pixel_xy": (pixel_xy, (batch, n_verts, 2)), "w": (w, (batch, n_verts)),
                "attributes": (attributes, (batch, n_verts, 7)), "sh": (sh, (batch, 9, 3)),
                "rgba": (rgba, (batch, height, width, 4)), "background": (background, (3,))}
    if packed is not None:
        expected["packed"] = (packed, (batch, height, width, N_CHANNELS))
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(array.shape)}")
    if triangles.size and int(triangles.max()) >= n_verts:
        raise ValueError(f"triangles index up to {int(triangles.max())}, but there are {n_verts} "
                         "vertices")
    light = np.ascontiguousarray(sh * _SH_CONSTANTS[None, :, None], dtype=np.float32)
    want = packed is not None
    if packed is None:
        packed = np.empty((1, 1, 1, N_CHANNELS), np.float32)
    inv_w = np.float32(1) / w
    with threads.stage("shade", work=batch * height * width):
        _shade(triangle, pixel_xy, inv_w, triangles, attributes, light, background, LUT,
               _THRESHOLDS_PADDED, want, rgba, packed)

