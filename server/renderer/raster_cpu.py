"""CPU visibility: a numba bounding-box rasteriser with a z-buffer.

Same arithmetic as ``raster_torch`` (see its notes), so both give the same triangle ids up to
rare float ties. Triangles are binned into bands of rows; bands go to threads in an interleaved
order, so the busy middle of the frame (the face) is shared between them, and each band draws
only its own triangles, in id order. Kernels compile on first use and are cached on disk.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from server.renderer.threads import PREVIEW, StageThreads

_HALF = np.float32(0.5)


@njit(cache=True, parallel=True)
def _setup(pixel_xy, z_key, triangles, width, height, rows, cols, area):
    """Per (image, triangle): candidate pixel rows/cols ([B, F, 2] int32, empty when r0 > r1)
    and the doubled signed area [B, F] (``raster_torch.triangle_setup``'s formula)."""
    batch, n_triangles = area.shape
    for job in prange(batch * n_triangles):
        b = job // n_triangles
        f = job % n_triangles
        i0, i1, i2 = triangles[f, 0], triangles[f, 1], triangles[f, 2]
        x0, y0 = pixel_xy[b, i0, 0], pixel_xy[b, i0, 1]
        x1, y1 = pixel_xy[b, i1, 0], pixel_xy[b, i1, 1]
        x2, y2 = pixel_xy[b, i2, 0], pixel_xy[b, i2, 1]
        a = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        area[b, f] = a
        rows[b, f, 0], rows[b, f, 1] = 1, 0
        finite = (math.isfinite(x0) and math.isfinite(y0) and math.isfinite(x1)
                  and math.isfinite(y1) and math.isfinite(x2) and math.isfinite(y2)
                  and math.isfinite(z_key[b, i0]) and math.isfinite(z_key[b, i1])
                  and math.isfinite(z_key[b, i2]))
        if not finite or a == 0:
            continue
        # Clamp in float first: far off-screen vertices must not overflow the int conversion.
        c0 = int(math.ceil(max(min(x0, x1, x2), np.float32(-1)) - _HALF))
        c1 = int(math.floor(min(max(x0, x1, x2), np.float32(width + 1)) - _HALF))
        r0 = int(math.ceil(max(min(y0, y1, y2), np.float32(-1)) - _HALF))
        r1 = int(math.floor(min(max(y0, y1, y2), np.float32(height + 1)) - _HALF))
        c0, c1 = max(c0, 0), min(c1, width - 1)
        r0, r1 = max(r0, 0), min(r1, height - 1)
        if c0 > c1:
            continue
        rows[b, f, 0], rows[b, f, 1] = r0, r1
        cols[b, f, 0], cols[b, f, 1] = c0, c1


@njit(cache=True)
def _bin(rows, band_rows, bands):
    """Triangles per (image, band of rows), in increasing triangle order (so exact depth ties
    resolve to the lowest id, as in ``raster_torch``). Returns (offsets [B*bands+1], ids)."""
    batch, n_triangles = rows.shape[0], rows.shape[1]
    offsets = np.zeros(batch * bands + 1, np.int64)
    for b in range(batch):
        for f in range(n_triangles):
            if rows[b, f, 0] <= rows[b, f, 1]:
                for k in range(rows[b, f, 0] // band_rows, rows[b, f, 1] // band_rows + 1):
                    offsets[b * bands + k + 1] += 1
    for i in range(batch * bands):
        offsets[i + 1] += offsets[i]
    ids = np.empty(offsets[-1], np.int32)
    cursor = offsets[:-1].copy()
    for b in range(batch):
        for f in range(n_triangles):
            if rows[b, f, 0] <= rows[b, f, 1]:
                for k in range(rows[b, f, 0] // band_rows, rows[b, f, 1] // band_rows + 1):
                    ids[cursor[b * bands + k]] = f
                    cursor[b * bands + k] += 1
    return offsets, ids


@njit(cache=True, inline="always")
def _edge_setup(pixel_xy, b, ia, ib):
    """(ax, ay, dx, dy, sign) of edge (ia, ib), anchored at the lower vertex index."""
    if ia > ib:
        ia, ib = ib, ia
        sign = np.float32(-1)
    else:
        sign = np.float32(1)
    ax, ay = pixel_xy[b, ia, 0], pixel_xy[b, ia, 1]
    return ax, ay, pixel_xy[b, ib, 0] - ax, pixel_xy[b, ib, 1] - ay, sign


@njit(cache=True, parallel=True)
def _raster(pixel_xy, z_key, triangles, rows, cols, area, band_rows, offsets, ids, n_threads,
            tri_out, zbuf):
    batch, height, width = tri_out.shape
    bands = (height + band_rows - 1) // band_rows
    per_thread = (bands + n_threads - 1) // n_threads
    jobs = per_thread * n_threads
    for job in prange(batch * jobs):
        b = job // jobs
        k = job % jobs
        # A static schedule gives each thread a contiguous run of jobs; map it to every
        # n_threads-th band so each thread gets a share of the frame's middle.
        band = (k % per_thread) * n_threads + k // per_thread
        top = band * band_rows
        bottom = min(height, top + band_rows) - 1
        if top > bottom:
            continue
        for r in range(top, bottom + 1):
            for c in range(width):
                tri_out[b, r, c] = -1
                zbuf[b, r, c] = np.inf
        for item in range(offsets[b * bands + band], offsets[b * bands + band + 1]):
            f = ids[item]
            i0, i1, i2 = triangles[f, 0], triangles[f, 1], triangles[f, 2]
            a = area[b, f]
            z0, z1, z2 = z_key[b, i0], z_key[b, i1], z_key[b, i2]
            ax0, ay0, dx0, dy0, s0 = _edge_setup(pixel_xy, b, i1, i2)
            ax1, ay1, dx1, dy1, s1 = _edge_setup(pixel_xy, b, i2, i0)
            ax2, ay2, dx2, dy2, s2 = _edge_setup(pixel_xy, b, i0, i1)
            if a < 0:   # negating edges and area together is exact and keeps e / a
                s0, s1, s2, a = -s0, -s1, -s2, -a
            c_lo, c_hi = cols[b, f, 0], cols[b, f, 1]
            for r in range(max(rows[b, f, 0], top), min(rows[b, f, 1], bottom) + 1):
                py = np.float32(r) + _HALF
                t0, t1, t2 = dx0 * (py - ay0), dx1 * (py - ay1), dx2 * (py - ay2)
                for c in range(c_lo, c_hi + 1):
                    px = np.float32(c) + _HALF
                    e0 = (t0 - dy0 * (px - ax0)) * s0
                    e1 = (t1 - dy1 * (px - ax1)) * s1
                    e2 = (t2 - dy2 * (px - ax2)) * s2
                    if e0 >= 0 and e1 >= 0 and e2 >= 0:
                        z = (e0 / a) * z0 + (e1 / a) * z1 + (e2 / a) * z2
                        if z < zbuf[b, r, c]:
                            zbuf[b, r, c] = z
                            tri_out[b, r, c] = f


class NumbaRasterizer:
    """Visibility on the CPU. Keeps its scratch arrays between calls of the same size."""

    def __init__(self, triangles: np.ndarray | torch.Tensor, band_rows: int = 8,
                 threads: StageThreads = PREVIEW):
        if isinstance(triangles, torch.Tensor):
            triangles = triangles.cpu().numpy()
        triangles = np.asarray(triangles)
        if triangles.ndim != 2 or triangles.shape[1] != 3:
            raise ValueError(f"triangles: expected [F, 3], got {list(triangles.shape)}")
        self.triangles = np.ascontiguousarray(triangles, dtype=np.int32)
        self.max_index = int(self.triangles.max()) if self.triangles.size else -1
        if self.triangles.size and self.triangles.min() < 0:
            raise ValueError("triangles: negative vertex index")
        self.band_rows = band_rows
        self.threads = threads  # numba threads per call, chosen by measurement
        self._scratch: dict[tuple, tuple] = {}

    def __call__(self, pixel_xy: torch.Tensor | np.ndarray, z_key: torch.Tensor | np.ndarray,
                 width: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
        """pixel_xy [B, V, 2], z_key [B, V] (float32, ``cameras.screen_space``) -> triangle ids
        [B, H, W] int32 (-1 background), written into ``out`` if given, else a new array."""
        pixel_xy = _as_f32(pixel_xy)
        z_key = _as_f32(z_key)
        if pixel_xy.ndim != 3 or pixel_xy.shape[2] != 2:
            raise ValueError(f"pixel_xy: expected [B, V, 2], got {list(pixel_xy.shape)}")
        if z_key.shape != pixel_xy.shape[:2]:
            raise ValueError(f"z_key: expected {list(pixel_xy.shape[:2])}, got {list(z_key.shape)}")
        if self.max_index >= pixel_xy.shape[1]:
            raise ValueError(f"pixel_xy: {pixel_xy.shape[1]} vertices, but triangles index up to "
                             f"{self.max_index}")
        batch, n_triangles = pixel_xy.shape[0], self.triangles.shape[0]
        if out is None:
            out = np.empty((batch, height, width), np.int32)
        elif out.shape != (batch, height, width) or out.dtype != np.int32 \
                or not out.flags.c_contiguous:
            raise ValueError(f"out: expected a C-contiguous int32 array of shape "
                             f"{(batch, height, width)}")
        key = (batch, height, width)
        if key not in self._scratch:
            self._scratch.clear()
            self._scratch[key] = (np.empty((batch, n_triangles, 2), np.int32),
                                  np.empty((batch, n_triangles, 2), np.int32),
                                  np.empty((batch, n_triangles), np.float32),
                                  np.empty((batch, height, width), np.float32))
        rows, cols, area, zbuf = self._scratch[key]
        with self.threads.stage("raster", work=batch * height * width) as n_threads:
            _setup(pixel_xy, z_key, self.triangles, width, height, rows, cols, area)
            bands = -(-height // self.band_rows)
            offsets, ids = _bin(rows, self.band_rows, bands)
            _raster(pixel_xy, z_key, self.triangles, rows, cols, area, self.band_rows, offsets,
                    ids, n_threads, out, zbuf)
        return out


def _as_f32(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.ascontiguousarray(array, dtype=np.float32)
