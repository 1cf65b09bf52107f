"""Device-agnostic visibility in torch: the nearest triangle per pixel.

Runs on CUDA (where it is the visibility pass) and on the CPU (where it is the reference the
numba kernel is tested against). Every triangle's bounding box of pixel centres is expanded into
fragments in chunks; each fragment is tested with edge functions, its depth key interpolated,
and the winner per pixel chosen with one ``scatter_reduce(amin)`` over int64 words that pack
(depth key, triangle id): the nearest triangle wins and exact depth ties go to the lowest id.

Both visibility kernels share this arithmetic bit for bit (float32, same operation order):

* Edge k of a triangle is the one opposite vertex k. Its edge function is evaluated from the
  endpoint with the lower vertex index, E = dx * (py - ay) - dy * (px - ax), and negated when
  the triangle runs the edge the other way; two triangles sharing an edge therefore see exactly
  opposite values, so no pixel centre falls through the crack between them.
* A pixel centre is inside when no edge value has the opposite sign of the doubled signed area
  ``(p1 - p0) x (p2 - p0)`` (edges are inclusive; both windings are drawn, no culling).
* The depth key is interpolated with screen-space barycentrics b_k = e_k / area:
  z = b0 * z0 + b1 * z1 + b2 * z2, and a pixel keeps the smallest.
"""

from __future__ import annotations

import bisect

import torch

INT64_MAX = torch.iinfo(torch.int64).max


def triangle_setup(pixel_xy: torch.Tensor, z_key: torch.Tensor, triangles: torch.Tensor,
                   width: int, height: int) -> dict[str, torch.Tensor]:
    """Per-triangle quantities [B, F, ...] for the edge tests (see the module notes)."""
    triangles = triangles.long()
    p = pixel_xy.detach()[:, triangles]                                  # [B, F, 3, 2]
    z = z_key.detach()[:, triangles]                                     # [B, F, 3]
    area = ((p[:, :, 1, 0] - p[:, :, 0, 0]) * (p[:, :, 2, 1] - p[:, :, 0, 1])
            - (p[:, :, 1, 1] - p[:, :, 0, 1]) * (p[:, :, 2, 0] - p[:, :, 0, 0]))
    # Edge k joins vertices (k+1, k+2); start from the lower vertex index.
    start_slot = torch.tensor([1, 2, 0], device=triangles.device)
    end_slot = torch.tensor([2, 0, 1], device=triangles.device)
    swap = triangles[:, start_slot] > triangles[:, end_slot]                 # [F, 3]
    a_slot = torch.where(swap, end_slot, start_slot)
    b_slot = torch.where(swap, start_slot, end_slot)
    batch = p.shape[0]
    a = torch.gather(p, 2, a_slot[None, :, :, None].expand(batch, -1, -1, 2))
    b = torch.gather(p, 2, b_slot[None, :, :, None].expand(batch, -1, -1, 2))
    sign = torch.where(swap, -1.0, 1.0).to(p.dtype)                   # [F, 3]

    finite = torch.isfinite(p).flatten(2).all(-1) & torch.isfinite(z).all(-1)
    valid = finite & (area != 0)
    lo = torch.where(valid[..., None], p.amin(2), torch.zeros_like(p[:, :, 0]))
    hi = torch.where(valid[..., None], p.amax(2), torch.zeros_like(p[:, :, 0]))
    # Pixel i is a candidate when its centre i + 0.5 lies inside [lo, hi].
    c0 = torch.ceil(lo[..., 0] - 0.5).clamp(0, width).long()
    c1 = torch.floor(hi[..., 0] - 0.5).clamp(-1, width - 1).long()
    r0 = torch.ceil(lo[..., 1] - 0.5).clamp(0, height).long()
    r1 = torch.floor(hi[..., 1] - 0.5).clamp(-1, height - 1).long()
    nx = (c1 - c0 + 1).clamp(min=0)
    ny = (r1 - r0 + 1).clamp(min=0)
    count = torch.where(valid, nx * ny, torch.zeros_like(nx))
    return {"a": a, "d": b - a, "sign": sign, "area": area, "z": z, "c0": c0, "r0": r0,
            "nx": nx, "count": count}


def rasterize_torch(pixel_xy: torch.Tensor, z_key: torch.Tensor, triangles: torch.Tensor,
                    width: int, height: int, max_fragments: int = 1 << 20) -> torch.Tensor:
    """Nearest triangle per pixel.

    pixel_xy [B, V, 2] float32 pixel coordinates (``cameras.screen_space``), z_key [B, V]
    float32 (smaller is nearer; non-finite keys drop their triangles), triangles [F, 3] integer.
    Returns triangle ids [B, H, W] int32, -1 for background, rows top to bottom.
    ``max_fragments`` bounds the temporary memory of one chunk (about 100 bytes a fragment).
    """
    batch, n_triangles = pixel_xy.shape[0], triangles.shape[0]
    device = pixel_xy.device
    s = triangle_setup(pixel_xy, z_key, triangles, width, height)
    best = torch.full((batch * height * width,), INT64_MAX, dtype=torch.int64, device=device)
    flat_count = s["count"].reshape(-1)
    tris = torch.nonzero(flat_count).squeeze(1)                      # flat (b, f) indices
    if tris.numel():
        ends = torch.cumsum(flat_count[tris], 0).tolist()
        start, total = 0, tris.numel()
        while start < total:
            # As many consecutive triangles as fit in max_fragments (at least one).
            done = ends[start - 1] if start else 0
            stop = bisect.bisect_right(ends, done + max_fragments)
            stop = max(stop, start + 1)
            _draw_chunk(s, tris[start:stop], n_triangles, width, height, best)
            start = stop
    tri = (best & 0xFFFFFFFF).to(torch.int32)
    tri = torch.where(best == INT64_MAX, torch.full_like(tri, -1), tri)
    return tri.view(batch, height, width)


def _draw_chunk(s: dict, tris: torch.Tensor, n_triangles: int, width: int, height: int,
                best: torch.Tensor) -> None:
    count = s["count"].reshape(-1)[tris]
    owner = torch.repeat_interleave(torch.arange(tris.numel(), device=tris.device), count)
    first = torch.cumsum(count, 0) - count
    offset = torch.arange(owner.numel(), device=tris.device) - first[owner]
    tri = tris[owner]                                                 # flat (b, f) per fragment
    nx = s["nx"].reshape(-1)[tri]
    col = s["c0"].reshape(-1)[tri] + offset % nx
    row = s["r0"].reshape(-1)[tri] + offset // nx
    dtype = s["area"].dtype
    px = col.to(dtype) + 0.5
    py = row.to(dtype) + 0.5

    triangle = tri % n_triangles
    a = s["a"].reshape(-1, 3, 2)[tri]                                 # [N, 3, 2]
    d = s["d"].reshape(-1, 3, 2)[tri]
    edge = (d[..., 0] * (py[:, None] - a[..., 1]) - d[..., 1] * (px[:, None] - a[..., 0]))
    edge = edge * s["sign"][triangle]
    area = s["area"].reshape(-1)[tri]
    positive = area > 0
    inside = torch.where(positive, (edge >= 0).all(1), (edge <= 0).all(1))
    bary = edge / area[:, None]
    z = s["z"].reshape(-1, 3)[tri]
    depth = bary[:, 0] * z[:, 0] + bary[:, 1] * z[:, 1] + bary[:, 2] * z[:, 2]

    keep = torch.nonzero(inside).squeeze(1)
    pixel = (tri[keep] // n_triangles) * (height * width) + row[keep] * width + col[keep]
    packed = (_sortable_int(depth[keep]).long() << 32) + triangle[keep]
    best.scatter_reduce_(0, pixel, packed, reduce="amin")


def _sortable_int(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (flip the magnitude bits of negative floats).
    -0.0 becomes +0.0 first: they compare equal, so the triangle id must break the tie."""
    bits = (values + 0.0).contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)
