"""UV texturing next to the buffers: FLAME's texture space, sampled per pixel as DECA does.

``FLAME_texture.npz`` (flame.is.tue.mpg.de) holds, as TF_FLAME's ``sample_texture.py`` and
DECA's ``FLAMETex`` read it:

    mean     [H, W, 3]       mean texture, BGR code values in [0, 255] (written with OpenCV)
    tex_dir  [H, W, 3, K]    K = 200 principal directions in the same units
    vt       [T, 2]          texture coordinates (u right, v up: v = 1 is the image's top row)
    ft       [F, 3]          per-triangle indices into ``vt``, parallel to FLAME's triangles

DECA builds the albedo map of a texture code c (its ``tex``, 50 values) as
``(mean + tex_dir[..., :n] @ c) / 255``, resizes it to 256 x 256 with nearest-neighbour
sampling, swaps BGR to RGB, and textures a pixel by ``grid_sample`` (bilinear,
``align_corners=False``, zero padding) at the UV interpolated from the visible triangle's three
corners with the pixel's barycentrics. The values are the texture image's code values / 255
(display-referred, like the photos DECA was fitted to), not linear.

Nearest-neighbour resizing picks texels, so it commutes with the linear combination: the mean
and the directions are picked down to 256 x 256 once, when read, and every map is built at that
size. The directions are streamed from the file row by row, so the official file (a 512 x 512
x 3 x 200 array) never has to fit in memory whole.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TEXTURE_KEYS = ("mean", "tex_dir", "vt", "ft")
DECA_UV_SIZE = 256


class TextureError(ValueError):
    """A texture-space file that is missing, malformed or does not fit the face model."""


def nearest_indices(source: int, size: int) -> np.ndarray:
    """Source indices [size] that ``F.interpolate(mode="nearest")`` picks when resizing
    ``source`` texels to ``size`` (floor(i * source / size) in float32, as torch computes)."""
    scale = np.float32(source / size)
    return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64),
                      source - 1)


class FlameTexture:
    """FLAME's texture space on one device, at DECA's 256 x 256 UV resolution.

    ``face_uv`` [F, 3, 2] float32: each triangle corner's UV in ``grid_sample`` coordinates
    (x = 2u - 1 right, y = 1 - 2v down). ``mean`` [3, S, S] RGB in [0, 1] units;
    ``n_components``: the directions the file holds (K). Directions are read on first use
    (``directions(n)``), only as many as a texture code needs.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 size: int = DECA_UV_SIZE):
        self.path = Path(path)
        self.device = torch.device(device)
        self.size = size
        if not self.path.is_file():
            raise TextureError(f"FLAME texture space not found: {self.path}")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                missing = [k for k in TEXTURE_KEYS if k not in npz.files]
                if missing:
                    raise TextureError(f"{self.path} lacks {', '.join(missing)} (a "
                                       f"FLAME_texture.npz holds {', '.join(TEXTURE_KEYS)})")
                mean, vt, ft = npz["mean"], npz["vt"], npz["ft"]   # tex_dir: streamed on use
            dir_shape = _member_header(self.path, "tex_dir")[0]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            if isinstance(exc, TextureError):
                raise
            raise TextureError(f"cannot read {self.path} as an .npz file: {exc}") from None
        if mean.ndim != 3 or mean.shape[2] != 3:
            raise TextureError(f"{self.path}: mean has shape {mean.shape}, expected [H, W, 3]")
        if dir_shape[:3] != mean.shape or len(dir_shape) != 4:
            raise TextureError(f"{self.path}: tex_dir has shape {dir_shape}, expected "
                               f"[{mean.shape[0]}, {mean.shape[1]}, 3, K]")
        if vt.ndim != 2 or vt.shape[1] != 2:
            raise TextureError(f"{self.path}: vt has shape {vt.shape}, expected [T, 2]")
        if ft.ndim != 2 or ft.shape[1] != 3 or ft.min() < 0 or ft.max() >= len(vt):
            raise TextureError(f"{self.path}: ft must be [F, 3] indices into vt's {len(vt)} rows")
        self.n_triangles = ft.shape[0]
        self.n_components = int(dir_shape[3])
        self._rows = nearest_indices(mean.shape[0], size)
        self._cols = nearest_indices(mean.shape[1], size)
        picked = mean[self._rows][:, self._cols].astype(np.float32) / 255.0
        self.mean = _bgr_to_chw(torch.from_numpy(picked)).to(self.device)
        uv = torch.from_numpy(vt.astype(np.float32))[torch.from_numpy(ft.astype(np.int64))]
        self.texel_uv = uv                                   # [F, 3, 2] (u, v), v up
        self.face_uv = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1).to(self.device)
        self._directions: torch.Tensor | None = None

    def check_triangles(self, n_triangles: int) -> None:
        """Raise TextureError unless the texture's triangles are the face model's."""
        if n_triangles != self.n_triangles:
            raise TextureError(f"{self.path.name} maps {self.n_triangles} triangles (FLAME's "
                               f"topology), the face model has {n_triangles}")

    def check_code(self, n: int, field: str = "appearance.texture") -> None:
        """Raise ValueError when a texture code of ``n`` values has more than the space."""
        if n > self.n_components:
            raise ValueError(f"{field}: {n} values, the texture space {self.path.name} has "
                             f"{self.n_components} components")

    def directions(self, n: int) -> torch.Tensor:
        """The first ``n`` directions [3, S, S, n] RGB in [0, 1] units, on the device."""
        self.check_code(n)
        if self._directions is None or self._directions.shape[-1] < n:
            picked = _stream_rows(self.path, "tex_dir", self._rows, self._cols, n)
            self._directions = _bgr_to_chw(torch.from_numpy(picked / np.float32(255.0))).to(
                self.device)
        return self._directions[..., :n]

    def albedo_map(self, code: torch.Tensor | None = None) -> torch.Tensor:
        """Albedo maps [B, 3, S, S] RGB (code values / 255) for texture codes [B, n]
        (None or n = 0: the mean, B = 1 for None)."""
        if code is None:
            return self.mean[None]
        code = torch.as_tensor(code, dtype=torch.float32, device=self.device)
        if code.ndim != 2:
            raise ValueError(f"texture code: expected [B, n], got {list(code.shape)}")
        maps = self.mean[None].expand(code.shape[0], -1, -1, -1)
        if code.shape[1] == 0 or not bool(code.any()):
            return maps.contiguous()
        return maps + torch.einsum("chwk,bk->bchw", self.directions(code.shape[1]), code)


    def client_space(self, n: int):
        """The space as clients show it (``portrait_rig.texture_space.TextureSpace``): the
        mean and the first ``n`` directions (at most the file's) as maps, and the UVs."""
        from portrait_rig.texture_space import TextureSpace

        n = min(n, self.n_components)
        directions = self.directions(n).permute(1, 2, 0, 3) if n else torch.zeros(
            self.size, self.size, 3, 0)
        return TextureSpace(mean=self.mean.permute(1, 2, 0).cpu().numpy(),
                            directions=directions.cpu().numpy(),
                            face_uv=self.texel_uv.numpy(), source=self.path.name)


def choose_texture(texture: str, n_triangles: int, device="cpu") -> "FlameTexture | None":
    """The albedo source named by a ``texture`` option, as the ``diffusionrig`` backend, its
    training and photo fitting all choose it (so they condition on the same albedo): "auto"
    (``server.paths.flame_texture()`` when it exists and fits a mesh of ``n_triangles``
    triangles, else None: the face model's vertex albedo), "none", or a FLAME_texture.npz
    path (its layout is checked against the mesh when it is used)."""
    from server import paths

    if texture == "none":
        return None
    if texture == "auto":
        path = paths.flame_texture()
        if not path.is_file():
            return None
        loaded = FlameTexture(path, device)
        return loaded if loaded.n_triangles == n_triangles else None
    return FlameTexture(Path(texture).expanduser(), device)


def _bgr_to_chw(array: torch.Tensor) -> torch.Tensor:
    """[H, W, 3, ...] BGR -> [3, H, W, ...] RGB."""
    return array.flip(2).movedim(2, 0).contiguous()


def _member_header(path: Path, key: str):
    """(shape, fortran_order, dtype) of array ``key`` of an .npz, read from its header."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        return read(stream)


def _stream_rows(path: Path, key: str, rows: np.ndarray, cols: np.ndarray,
                 n: int) -> np.ndarray:
    """``array[rows][:, cols][..., :n]`` of a C-ordered [H, W, 3, K] array in an .npz, as
    float32, reading one row at a time."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(stream)
        if fortran or dtype.hasobject:
            raise TextureError(f"{path}: {key} must be a plain C-ordered numeric array")
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        wanted, picked = set(rows.tolist()), {}
        for r in range(max(wanted) + 1):
            raw = stream.read(row_bytes)
            if len(raw) != row_bytes:
                raise TextureError(f"{path}: {key} ends before row {r}")
            if r in wanted:
                row = np.frombuffer(raw, dtype=dtype).reshape(row_shape)
                picked[r] = row[cols][..., :n].astype(np.float32)
    return np.stack([picked[r] for r in rows.tolist()])


def uv_grid(face_uv: torch.Tensor, triangle: torch.Tensor, pixel: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel sampling grid [B, H, W, 2] for ``grid_sample``.

    face_uv [F, 3, 2] (``FlameTexture.face_uv``); triangle [B, H, W] visible triangle ids;
    pixel [N] flat indices of the covered pixels and weights [N, 3] their barycentrics over the
    triangle's corners (``renderer.buffers.barycentrics``). Uncovered pixels get (0, 0).
    Differentiable with respect to the weights.
    """
    corners = face_uv[triangle.reshape(-1)[pixel].long()]                  # [N, 3, 2]
    uv = (weights[..., None] * corners).sum(dim=1)
    grid = uv.new_zeros(triangle.numel(), 2).index_put((pixel,), uv)
    return grid.view(*triangle.shape, 2)


def sample_albedo(albedo_map: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Textured albedo [B, H, W, C] (channels last, like ``Buffers``) from maps [B or 1, C,
    h, w] at ``grid`` [B, H, W, 2]: bilinear, ``align_corners=False``, zeros outside."""
    if albedo_map.shape[0] != grid.shape[0]:
        albedo_map = albedo_map.expand(grid.shape[0], -1, -1, -1)
    sampled = F.grid_sample(albedo_map, grid.to(albedo_map.dtype), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return sampled.permute(0, 2, 3, 1)


def texel_grid(buffers, face_uv: torch.Tensor, vertices: torch.Tensor, cameras,
               triangles: torch.Tensor) -> torch.Tensor:
    """Where each pixel of ``buffers`` (a ``renderer.Buffers`` of ``vertices`` [B, V, 3] seen
    by ``cameras``, ``triangles`` [F, 3]) samples the texture: ``grid_sample``
    coordinates [B, H, W, 2] (``uv_grid``). Differentiable with respect to the vertices."""
    from server.renderer.buffers import barycentrics
    from server.renderer.cameras import project, screen_space

    height, width = buffers.mask.shape[1:3]
    ndc, depth = project(vertices, cameras, width, height)
    pixel_xy, _, w = screen_space(ndc, depth, cameras, width, height)
    pixel, _, _, weights = barycentrics(pixel_xy, w, triangles, buffers.triangle, width, height)
    return uv_grid(face_uv, buffers.triangle, pixel, weights)


def textured(buffers, maps: torch.Tensor, face_uv: torch.Tensor, vertices: torch.Tensor,
             cameras, triangles: torch.Tensor):
    """``buffers`` with albedo and rendered taken from albedo ``maps`` [B or 1, 3, h, w]
    sampled per pixel (``texel_grid``), as DECA textures its renders. Differentiable with
    respect to the maps and the vertices."""
    from server.renderer.buffers import Buffers

    grid = texel_grid(buffers, face_uv, vertices, cameras, triangles)
    albedo = sample_albedo(maps, grid) * buffers.mask
    packed = torch.cat([buffers.mask, buffers.depth, buffers.normal, albedo, buffers.shading,
                        albedo * buffers.shading], dim=-1)
    return Buffers.from_packed(buffers.triangle, packed)
