"""The rig-driven StyleGAN path shared by the backends built on an FFHQ StyleGAN's W+ space
(``stylerig``, ``dualstylegan``).

* ``RigLatents``: rig parameters -> W+ latents [num_ws, w_dim]. Identity from
  ``appearance.seed`` or ``appearance.latent_file`` (``server.backends.latents``), mapped and
  truncated (psi = ``appearance.truncation``, towards w_avg) by the generator's mapping and
  kept in an LRU cache; then RigNet (``server.models.rignet``) moves it to the rig's controls,
  w_hat = RigNet(w, p), with the global pose and light of the camera-relative head
  (``server.renderer.head_view``: neck folded in, roll removed, SH light in the camera frame).
* ``request_windows``: the frames a batch of requests needs, each request's smoothing window
  (``server.backends.shots``) laid end to end.
* ``frame_images``: generator images [-1, 1] -> the requests' RGBA frames.
* ``RigPasses``: the requested extra passes, from the preview backend's buffer renderer.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from portrait_rig.params import Appearance, RigParams
from server import paths
from server.backends.latents import load_latent_file, seed_z
from server.checkpoints.stylerig import load_rignet
from server.models.rignet import ControlLayout, control_vector

CONTROLS_WITHOUT_EXPRESSION = 33  # RigNet control vector: pose 3 + jaw 3 + SH 27, then E


class RigLatents:
    """W+ latents of rig parameters for generator ``G`` (``z_dim``, ``w_dim``, ``num_ws`` and
    ``mapping(z [B, z_dim], truncation_psi=) -> [B, num_ws, w_dim]``) on ``device``.

    ``rignet``: "auto" (``paths.stylerig_rignet()`` when it exists), "none" / None, or a
    ``save_rignet`` file made for this generator's W+ shape. ``max_identities``: identity
    latents kept. ``backend`` names the owner in messages.
    """

    def __init__(self, G, device: torch.device, rignet="auto", max_identities: int = 64,
                 backend: str = "stylerig"):
        self.G, self.device, self.backend = G, device, backend
        self.max_identities = max_identities
        self.rignet, self.rignet_path = self._load_rignet(rignet)
        self.layout = None if self.rignet is None else _layout_of(self.rignet)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        if self.rignet is None:
            print(f"{backend}: no RigNet weights ({self._hint(rignet)}): rendering identity "
                  "only; the rig's pose, expression and light do not change the portrait",
                  file=sys.stderr, flush=True)

    def _load_rignet(self, option):
        if option in (None, "none"):
            return None, None
        path = paths.stylerig_rignet() if option == "auto" else Path(option).expanduser()
        if not path.is_file():
            if option == "auto":
                return None, None
            raise FileNotFoundError(f"rignet: file not found: {path}")
        net = load_rignet(path, self.device)
        G = self.G
        if (net.num_ws, net.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError(f"rignet: {path} edits latents [{net.num_ws}, {net.w_dim}], the "
                             f"generator has [{G.num_ws}, {G.w_dim}]")
        return net, path

    def _hint(self, option) -> str:
        if option in (None, "none"):
            return "rignet=none"
        return f"none at {paths.stylerig_rignet()}; pass --option {self.backend}.rignet=FILE"

    def put(self, key: tuple, w: torch.Tensor) -> torch.Tensor:
        """Keep ``w`` under ``key`` in the LRU cache (also used for identities the owner
        computes itself, e.g. from photos)."""
        self._cache[key] = w
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_identities:
            self._cache.popitem(last=False)
        return w

    def cached(self, key: tuple) -> torch.Tensor | None:
        w = self._cache.get(key)
        if w is not None:
            self._cache.move_to_end(key)
        return w

    def identity(self, appearance: Appearance) -> torch.Tensor:
        """W+ [num_ws, w_dim] float32 on the device for a request's seed or latent file."""
        G, psi = self.G, float(appearance.truncation)
        if appearance.latent_file:
            path = Path(os.path.expanduser(appearance.latent_file))
            if not path.is_file():
                raise FileNotFoundError(f"appearance.latent_file: file not found on the "
                                        f"server: {path}")
            path = path.resolve()
            stat = path.stat()
            key = ("file", str(path), stat.st_size, stat.st_mtime_ns, psi)
        else:
            key = ("seed", appearance.seed or 0, psi)
        w = self.cached(key)
        if w is None:
            if key[0] == "file":
                latent = load_latent_file(path, G.z_dim, G.w_dim, G.num_ws)
                kind, value = latent.kind, latent.value
            else:
                kind, value = "z", seed_z(appearance.seed, G.z_dim)
            value = value.to(self.device)
            w = self.put(key, G.mapping(value[None], truncation_psi=psi)[0] if kind == "z"
                         else value)
        return w

    def edit(self, w: torch.Tensor, params: list[RigParams], views) -> torch.Tensor:
        """RigNet's edit of identities w [N, num_ws, w_dim] to ``params`` seen as ``views``
        (``head_views``); w unchanged without RigNet."""
        if self.rignet is None:
            return w
        controls = control_vector(params, self.layout, device=self.device)
        pose = torch.tensor(np.stack([v.swing for v in views]), dtype=torch.float32)
        light = torch.tensor(np.stack([v.light for v in views]), dtype=torch.float32)
        controls[:, self.layout.slices["global_pose"]] = pose.to(self.device)
        controls[:, self.layout.slices["sh"]] = light.flatten(1).to(self.device)
        return self.rignet(w, controls)


def _layout_of(net) -> ControlLayout:
    """The RigNet's control layout (derived from its control size when the file has none)."""
    if net.layout is not None:
        return net.layout
    n_expression = net.control_dim - CONTROLS_WITHOUT_EXPRESSION
    if n_expression < 0:
        raise ValueError(f"rignet: {net.control_dim} controls, fewer than the "
                         f"{CONTROLS_WITHOUT_EXPRESSION} of pose, jaw and light")
    return ControlLayout(n_expression)


def request_windows(requests) -> tuple[list[RigParams], list[tuple[int, int, int]]]:
    """(parameters of every frame to compute, (first row, length, centre) per request): each
    request's smoothing window (itself and the neighbours it is smoothed over, when its shot
    asks for smoothing), one after the other."""
    windows, params = [], []
    for request in requests:
        if request.shot is not None and request.shot.smooth and request.shot.neighbors:
            _, window, centre = request.shot.window(request.params)
        else:
            window, centre = [request.params], 0
        windows.append((len(params), len(window), centre))
        params += window
    return params, windows


def frame_images(images: torch.Tensor, requests) -> list[np.ndarray]:
    """[B, 3, S, S] in [-1, 1] -> RGBA uint8 frames [H, W, 4] as NVIDIA's scripts write them
    (x * 127.5 + 128, clamped, truncated; alpha 255), each resized (bicubic, antialiased when
    shrinking) to the square max(width, height) covering it and centre-cropped; frames of one
    size are converted together."""
    out: list[np.ndarray | None] = [None] * len(requests)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.width, request.height), []).append(i)
    for (width, height), indices in groups.items():
        batch = images[indices] if len(indices) < len(requests) else images
        side, native = max(width, height), images.shape[-1]
        if side != native:
            batch = F.interpolate(batch, size=(side, side), mode="bicubic",
                                  align_corners=False, antialias=side < native)
        top, left = (side - height) // 2, (side - width) // 2
        batch = batch[:, :, top: top + height, left: left + width]
        rgb = (batch * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        rgba = torch.cat([rgb, torch.full_like(rgb[..., :1], 255)], dim=-1).cpu().numpy()
        for j, i in enumerate(indices):
            out[i] = rgba[j]
    return out


class RigPasses:
    """The requested buffers (normal, albedo, ...) of the face model in the rig's pose, from
    the preview backend's renderer (built on first use). A generator's portrait is not fitted
    to that geometry: the passes describe the rig, not the portrait's pixels."""

    def __init__(self, face_model, device: str):
        self.face_model, self.device, self._renderer = face_model, device, None

    def add(self, requests, results) -> None:
        from server.backends.preview import PreviewBackend

        if self._renderer is None:
            self._renderer = PreviewBackend(self.face_model, self.device)
        wanted = [i for i, r in enumerate(requests) if r.passes]
        buffers = self._renderer.render([requests[i] for i in wanted])
        for i, rendered in zip(wanted, buffers):
            results[i].passes = rendered.passes
