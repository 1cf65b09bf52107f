"""Latent edit directions: the named sliders of ``appearance.edits`` (age, smile, ...).

Each ``.npy`` file in the directions folder (``server.paths.directions_dir()``) is one
direction d, named after the file: its stem without InterFaceGAN's ``boundary_`` prefix or
stylegan3-editing's ``_boundary`` suffix (``Smiling_boundary.npy`` -> ``Smiling``). By shape:

=====================================  =======  ============================================
array (float)                          space    an edit of strength f
=====================================  =======  ============================================
[w_dim] or [1, w_dim]                  W        w + f d on every layer (InterFaceGAN's unit
                                                normals of W boundaries; stylegan3-editing's)
[num_ws, w_dim]                        W+       w_l + f d_l on layer l
[S] or [1, S], S = style channels      S        s + f d on the style vectors (StyleSpace)
=====================================  =======  ============================================

W and W+ edits are applied to the identity latent before RigNet, so pose, expression and
light stay the rig's. The style vectors s are the outputs of every synthesis layer's affine
map A(w) (before ToRGB's weight gain), concatenated in the generator's layer order
(StyleGAN2: per resolution conv0, conv1, torgb; StyleGAN3: L0 .. L{n}); S edits are added
there while the frame is synthesised. A W boundary trained in Z (InterFaceGAN's ``_z``
files) has the same shape as a W one and cannot be told apart: use W boundaries.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def direction_name(path: Path) -> str:
    stem = path.stem
    stem = stem[len("boundary_"):] if stem.startswith("boundary_") else stem
    return stem[: -len("_boundary")] if stem.endswith("_boundary") else stem


def style_layers(G) -> list[tuple[str, torch.nn.Module]]:
    """(name, affine module) of every style vector, in layer order."""
    net, layers = G.synthesis, []
    if hasattr(net, "block_resolutions"):                            # StyleGAN2
        for res in net.block_resolutions:
            block = getattr(net, f"b{res}")
            for part in ("conv0", "conv1", "torgb"):
                if hasattr(block, part):
                    layers.append((f"b{res}.{part}", getattr(block, part).affine))
    else:                                                            # StyleGAN3
        layers = [(name, getattr(net, name).affine) for name in net.layer_names]
    return layers


class Directions:
    """The directions of ``folder`` for generator ``G`` (files of other shapes are reported
    on stderr and skipped). ``kinds``: name -> 'w', 'w+' or 's'."""

    def __init__(self, folder: Path | None, G):
        self.num_ws, self.w_dim = G.num_ws, G.w_dim
        self.widths = [module.weight.shape[0] for _, module in style_layers(G)]
        self.latent: dict[str, torch.Tensor] = {}      # [num_ws, w_dim] (W broadcast)
        self.style: dict[str, torch.Tensor] = {}       # [S]
        self.kinds: dict[str, str] = {}
        for path in sorted(Path(folder).glob("*.npy")) if folder and Path(folder).is_dir() else []:
            try:
                self._add(path)
            except ValueError as exc:
                print(f"stylerig: edit direction skipped: {exc}", file=sys.stderr, flush=True)

    def _add(self, path: Path) -> None:
        name = direction_name(path)
        if not _NAME.fullmatch(name) or ".." in name:
            raise ValueError(f"{path}: {name!r} is not a usable name")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable ({exc})") from None
        if array.dtype.kind != "f" or not np.isfinite(array).all():
            raise ValueError(f"{path}: expected finite floats, got {array.dtype}")
        d = torch.from_numpy(np.asarray(array, dtype=np.float32))
        while d.ndim > 1 and d.shape[0] == 1:
            d = d[0]
        total = sum(self.widths)
        if tuple(d.shape) == (self.w_dim,):
            self.latent[name], self.kinds[name] = d.expand(self.num_ws, -1).clone(), "w"
        elif tuple(d.shape) == (self.num_ws, self.w_dim):
            self.latent[name], self.kinds[name] = d.clone(), "w+"
        elif tuple(d.shape) == (total,):
            self.style[name], self.kinds[name] = d.clone(), "s"
        else:
            raise ValueError(f"{path}: shape {list(array.shape)} is none of W [{self.w_dim}], "
                             f"W+ [{self.num_ws}, {self.w_dim}] or S [{total}] for this "
                             "generator")

    def check(self, edits: dict[str, float]) -> None:
        unknown = sorted(set(edits) - set(self.kinds))
        if unknown:
            known = ", ".join(sorted(self.kinds)) or "none"
            raise ValueError(f"appearance.edits: no edit direction named {unknown[0]!r} on the "
                             f"server (available: {known})")

    def apply_latent(self, ws: torch.Tensor, edits: list[dict[str, float]]) -> torch.Tensor:
        """ws [N, num_ws, w_dim] with each row's W / W+ edits added."""
        rows = [sum((f * self.latent[k].to(ws) for k, f in e.items() if k in self.latent and f),
                    torch.zeros_like(ws[0])) for e in edits]
        return ws + torch.stack(rows) if any(e for e in edits) else ws

    def style_offsets(self, edits: list[dict[str, float]]) -> list[torch.Tensor] | None:
        """Per style layer, offsets [N, C] of the rows' S edits; None when there are none."""
        if not any(f for e in edits for k, f in e.items() if k in self.style):
            return None
        flat = torch.stack([sum((f * self.style[k] for k, f in e.items() if k in self.style),
                                torch.zeros(sum(self.widths))) for e in edits])
        return list(flat.split(self.widths, dim=1))


@contextmanager
def styles_offset(G, offsets: list[torch.Tensor] | None):
    """While active, every style layer's affine output gets ``offsets[i]`` [N, C] added (the
    batch rows of the synthesis call)."""
    if offsets is None:
        yield
        return
    handles = [module.register_forward_hook(lambda m, args, out, d=d: out + d.to(out))
               for (_, module), d in zip(style_layers(G), offsets)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
