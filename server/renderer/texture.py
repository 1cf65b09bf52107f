"""UV texturing next to the buffers: FLAME's texture space, sampled per pixel as DECA does.

``FLAME_texture.npz`` (flame.is.tue.mpg.de) holds, as TF_FLAME's ``sample_texture.py`` and
DECA's ``FLAMETex`` read it:

    mean     [H, W, 3]       mean texture, BGR code values in [0, 255] (written with OpenCV)
    tex_dir  [H, W, 3, K]    K = 200 principal directions in the same units
    vt       [T, 2]          texture coordinates (u right, v up: v = 1 is the image's top row)
    ft       [F, 3]          per-triangle indices into ``vt``, parallel to FLAME's faces

DECA builds the albedo map as ``(mean + tex_dir[..., :n] @ code) / 255``, resizes it to
256 x 256 with nearest-neighbour sampling, swaps BGR to RGB, and textures a pixel by
``grid_sample`` (bilinear, ``align_corners=False``, zero padding) at the UV interpolated from
the visible triangle's three corners with the pixel's barycentrics. The values are the texture
image's code values / 255 (display-referred, like the photos DECA was fitted to), not linear.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TEXTURE_KEYS = ("mean", "tex_dir", "vt", "ft")
DECA_UV_SIZE = 256


class TextureError(ValueError):
    """A texture-space file that is missing, malformed or does not fit the face model."""


class FlameTexture:
    """FLAME's texture space on one device.

    ``face_uv`` [F, 3, 2] float32: each triangle corner's UV in ``grid_sample`` coordinates
    (x = 2u - 1 right, y = 1 - 2v down). ``mean`` [3, H, W] and, once loaded, ``directions``
    [3, H, W, n] are RGB in [0, 1] units at the file's resolution.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        if not self.path.is_file():
            raise TextureError(f"FLAME texture space not found: {self.path}")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                missing = [k for k in TEXTURE_KEYS if k not in npz.files]
                if missing:
                    raise TextureError(f"{self.path} lacks {', '.join(missing)} (a "
                                       f"FLAME_texture.npz holds {', '.join(TEXTURE_KEYS)})")
                mean, vt, ft = npz["mean"], npz["vt"], npz["ft"]   # tex_dir: read on use
        except (OSError, ValueError) as exc:
            if isinstance(exc, TextureError):
                raise
            raise TextureError(f"cannot read {self.path} as an .npz file: {exc}") from None
        if mean.ndim != 3 or mean.shape[2] != 3:
            raise TextureError(f"{self.path}: mean has shape {mean.shape}, expected [H, W, 3]")
        if vt.ndim != 2 or vt.shape[1] != 2:
            raise TextureError(f"{self.path}: vt has shape {vt.shape}, expected [T, 2]")
        if ft.ndim != 2 or ft.shape[1] != 3 or ft.min() < 0 or ft.max() >= len(vt):
            raise TextureError(f"{self.path}: ft must be [F, 3] indices into vt's {len(vt)} rows")
        self.n_faces = ft.shape[0]
        self.mean = _bgr_to_chw(torch.from_numpy(mean.astype(np.float32) / 255.0)).to(self.device)
        uv = torch.from_numpy(vt.astype(np.float32))[torch.from_numpy(ft.astype(np.int64))]
        self.face_uv = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1).to(self.device)
        self.directions: torch.Tensor | None = None

    def check_faces(self, n_faces: int) -> None:
        """Raise TextureError unless the texture's triangles are the face model's."""
        if n_faces != self.n_faces:
            raise TextureError(f"{self.path.name} maps {self.n_faces} triangles (FLAME's "
                               f"topology), the face model has {n_faces}")

    def albedo_map(self, code: torch.Tensor | None = None,
                   size: int = DECA_UV_SIZE) -> torch.Tensor:
        """Albedo maps [B, 3, size, size] RGB (code values / 255) for texture codes [B, n]
        (None: the mean, B = 1), resized with nearest-neighbour sampling as DECA does."""
        if code is None:
            texture = self.mean[None]
        else:
            code = torch.as_tensor(code, dtype=torch.float32, device=self.device)
            if code.ndim != 2:
                raise ValueError(f"texture code: expected [B, n], got {list(code.shape)}")
            texture = self.mean[None] + torch.einsum("chwk,bk->bchw",
                                                     self._load_directions(code.shape[1]), code)
        return F.interpolate(texture, size=(size, size), mode="nearest")

    def _load_directions(self, n: int) -> torch.Tensor:
        if self.directions is None or self.directions.shape[-1] < n:
            with np.load(self.path, allow_pickle=False) as npz:
                tex_dir = npz["tex_dir"]
            if tex_dir.ndim != 4 or tex_dir.shape[:3] != tuple(self.mean.shape[1:]) + (3,):
                raise TextureError(f"{self.path}: tex_dir has shape {tex_dir.shape}, expected "
                                   f"[{self.mean.shape[1]}, {self.mean.shape[2]}, 3, K]")
            if n > tex_dir.shape[3]:
                raise ValueError(f"texture code has {n} values, the space has "
                                 f"{tex_dir.shape[3]} components")
            directions = torch.from_numpy(tex_dir[..., :n].astype(np.float32) / 255.0)
            self.directions = _bgr_to_chw(directions).to(self.device)
        return self.directions[..., :n]


def choose_texture(texture: str, n_faces: int, device="cpu") -> "FlameTexture | None":
    """The albedo source named by a ``texture`` option, as the ``diffusionrig`` backend and
    its training both choose it (so training and inference render the same albedo): "auto"
    (``server.paths.flame_texture()`` when it exists and fits a mesh of ``n_faces``
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
        return loaded if loaded.n_faces == n_faces else None
    return FlameTexture(Path(texture).expanduser(), device)


def _bgr_to_chw(array: torch.Tensor) -> torch.Tensor:
    """[H, W, 3, ...] BGR -> [3, H, W, ...] RGB."""
    return array.flip(2).movedim(2, 0).contiguous()


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
    """Textured albedo [B, H, W, 3] (channels last, like ``Buffers``) from maps [B or 1, 3,
    h, w] at ``grid`` [B, H, W, 2]: bilinear, ``align_corners=False``, zeros outside."""
    if albedo_map.shape[0] != grid.shape[0]:
        albedo_map = albedo_map.expand(grid.shape[0], -1, -1, -1)
    sampled = F.grid_sample(albedo_map, grid.to(albedo_map.dtype), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
    return sampled.permute(0, 2, 3, 1)
