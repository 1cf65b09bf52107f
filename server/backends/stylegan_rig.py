"""The rig-driven StyleGAN path shared by the backends built on an FFHQ StyleGAN's W+ space
(``stylerig``, ``dualstylegan``).

* ``RigLatents``: rig parameters -> W+ latents [num_ws, w_dim]. Identity from
  ``appearance.identity`` (inverted from a photo), ``latent_file``, a personal model's pivot
  or ``seed`` (``server.backends.latents``), mapped and
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

import sys
from pathlib import Path

import numpy as np
import torch

from portrait_rig.params import Appearance, RigParams
from server import paths
from server.backends.base import LRU, cover_frame, file_stamp, opaque_rgba
from server.backends.latents import load_latent_file, seed_z
from server.checkpoints.stylegan import generator_fingerprint
from server.checkpoints.stylerig import load_rignet, read_rignet_metadata
from server.models.rignet import ControlLayout, control_vector


class RigLatents:
    """W+ latents of rig parameters for generator ``G`` (``z_dim``, ``w_dim``, ``num_ws`` and
    ``mapping(z [B, z_dim], truncation_psi=) -> [B, num_ws, w_dim]``) on ``device``.

    ``rignet``: "auto" (``paths.stylerig_rignet()`` when it exists), "none" / None, or a
    ``save_rignet`` file made for this generator and ``face_data`` (checked against what the
    file records: a RigNet for another generator or face model is refused, naming both).
    ``max_identities``: identity latents kept. ``backend`` names the owner in messages,
    ``generator_name`` the generator's file. ``same_generator=False`` skips the fingerprint
    check, for generators that embed a copy of the one RigNet was trained for (DualStyleGAN's
    intrinsic FFHQ StyleGAN2, converted to another file layout).
    """

    def __init__(self, G, device: torch.device, face_data, rignet="auto",
                 max_identities: int = 64, backend: str = "stylerig",
                 generator_name: str = "the generator", same_generator: bool = True):
        self.G, self.device, self.backend = G, device, backend
        self.face_data, self.generator_name = face_data, generator_name
        self.same_generator = same_generator
        self.rignet, self.rignet_path = self._load_rignet(rignet)
        self.layout = (None if self.rignet is None else
                       self.rignet.layout or ControlLayout.for_dim(self.rignet.control_dim))
        self._cache = LRU(max_identities)
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
        without = ("train a RigNet for it (docs/stylerig_training.md) or run without one: "
                   f"--option {self.backend}.rignet=none")
        if (net.num_ws, net.w_dim) != (G.num_ws, G.w_dim):
            raise ValueError(f"rignet: {path} edits latents [{net.num_ws}, {net.w_dim}], the "
                             f"generator {self.generator_name} has [{G.num_ws}, {G.w_dim}]; "
                             f"{without}")
        meta = read_rignet_metadata(path)
        trained_for = meta.get("generator_fingerprint")
        if self.same_generator and trained_for and trained_for != generator_fingerprint(G):
            raise ValueError(f"rignet: {path} was trained for the generator "
                             f"{meta.get('generator')!r} (fingerprint {trained_for}), not "
                             f"{self.generator_name} (fingerprint {generator_fingerprint(G)}); "
                             f"{without}")
        vertices, data = meta.get("face_vertices"), self.face_data
        if vertices and int(vertices) != data.n_vertices:
            raise ValueError(f"rignet: {path} was trained with the face model "
                             f"{meta.get('face_model')!r} ({vertices} vertices), the server "
                             f"runs {data.name!r} ({data.n_vertices} vertices); {without}")
        return net, path

    def _hint(self, option) -> str:
        if option in (None, "none"):
            return "rignet=none"
        return f"none at {paths.stylerig_rignet()}; pass --option {self.backend}.rignet=FILE"

    def put(self, key: tuple, w: torch.Tensor) -> torch.Tensor:
        """Keep ``w`` under ``key`` in the LRU cache (also used for identities the owner
        computes itself, e.g. from photos)."""
        return self._cache.put(key, w)

    def cached(self, key: tuple) -> torch.Tensor | None:
        return self._cache.get(key)

    def identity(self, appearance: Appearance) -> torch.Tensor:
        """W+ [num_ws, w_dim] float32 on the device for a request's identity: a named identity
        inverted from a photo, a latent file, a personal model's pivot, or a seed."""
        G, psi = self.G, float(appearance.truncation)
        path = None
        if appearance.identity:
            path = paths.identity_latent(appearance.identity)
            if not path.is_file():
                raise FileNotFoundError(f"appearance.identity: no identity named "
                                        f"{appearance.identity!r} on the server (make one "
                                        "from a photo with an 'invert' request)")
        elif appearance.latent_file:
            path = paths.client_file("appearance.latent_file", appearance.latent_file,
                                     paths.LATENTS)
        elif appearance.personal_model and appearance.seed is None:
            pivot = paths.personal_generator(appearance.personal_model).with_name("pivot.npz")
            path = pivot if pivot.is_file() else None
        key = (("file", file_stamp(path.resolve()), psi) if path is not None
               else ("seed", appearance.seed or 0, psi))
        w = self.cached(key)
        if w is None:
            if path is not None:
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
        return self.rignet(w, self.rignet.request_controls(controls))


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
        batch = cover_frame(batch, width, height)
        rgb = (batch * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        rgba = opaque_rgba(rgb)
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

    def complete(self, requests, results, lap) -> list:
        """``results`` with the passes their requests ask for (timed as "passes") and the
        batch's stage timings from ``lap``."""
        if any(r.passes for r in requests):
            self.add(requests, results)
            lap("passes")
        for result in results:
            result.timings = dict(lap.times)
        return results
