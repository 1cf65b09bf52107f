"""The StyleRig backend: portraits of the rig from a StyleGAN2/3 generator edited by RigNet.

Per batch of requests:

1. Identity: every request's W+ latent [num_ws, w_dim] from ``appearance.identity`` (a photo
   inverted on the server, ``server.inversion``), ``appearance.latent_file`` (a name in the data folder's ``latents/``), the pivot of
   ``appearance.personal_model`` or ``appearance.seed`` (``server.backends.latents``), mapped
   with the generator's mapping network and truncation ``appearance.truncation`` when it is
   a z; kept in an LRU cache. ``appearance.edits`` then adds its W / W+ edit directions
   (``server.backends.directions``).
2. Rig: RigNet (``server.models.rignet``) moves the latent to the rig's controls, w_hat =
   RigNet(w, p), with p = ``control_vector(params)`` whose global pose and light are the
   camera-relative head's (``server.renderer.head_view``: neck folded in, roll removed - RigNet
   models no roll - and the SH light in the camera frame, where DFR estimated it during
   training). One RigNet call covers the batch and the frames smoothing needs.
3. StyleGAN3 only: the head's roll about the viewing axis and its position in the frame
   become the generator's input transform (``make_transform(roll, tx, ty)``). The transform is
   a single buffer of the input layer, so frames with different transforms compute their
   Fourier-feature input one transform at a time (cheap: one small layer) and then run every
   synthesis layer as one batch. StyleGAN2 has no such transform: it draws the FFHQ-aligned
   portrait it was trained on, which is placed into the frame through the head's FFHQ
   framing (``server.backends.framing``, from the 68 landmarks of the rig's posed mesh), so
   roll, position and size follow the rig; alpha is the generated square's coverage.
4. One synthesis call per generator (the base one, or a request's pivotal-tuning personal
   model, ``appearance.personal_model``; StyleSpace edits added to its style vectors) at the
   generator's resolution S, noise mode 'const' (a
   fixed noise image, so equal latents give equal frames); the [-1, 1] output becomes sRGB
   uint8 as NVIDIA's scripts write it (x * 127.5 + 128, clamped, truncated), resized (torch
   bicubic, antialiased when shrinking) to the square max(width, height) covering the frame
   and centre-cropped (StyleGAN3, or ``framing`` "rig"; alpha 255), or placed through the
   FFHQ framing (StyleGAN2).

Without RigNet weights the backend draws plain StyleGAN portraits: identity (and, with
StyleGAN3, roll and position) follow the rig, pose, expression and light do not. It says so
on the server log when it starts and in ``description``; such frames have no ``rignet`` timing.

Temporal smoothing (batch requests of a shot with ``smooth``, docs/protocol.md "Shots"): the
request carries its neighbours' parameters (up to two frames either side, ``Shot.window``);
their latents go through steps 1-3 with the frame's own, ``server.backends.shots.smooth_latents``
(fine layers averaged, then the 5-tap kernel renormalised over the frames present) and
``smooth_transforms`` are applied over that window, and the frame keeps its own row. So the
smoothing window is exactly what the request carries; a frame without neighbours (a lone
frame, a render started from Blender's UI) is rendered unsmoothed. StyleGAN2's framings are
smoothed over the same window.

Extra passes (normal, albedo, ...) come from the preview backend's buffer renderer, of the
face model in the rig's pose and camera. The generator's portrait is not fitted to that
geometry, so they describe the rig, not the pixels of the portrait.

Timings (milliseconds, for the whole batch): ``identity`` (the head's view, latent files and
mapping of identities not cached yet), ``rignet``, ``synthesis``, ``image`` (resize, 8-bit
conversion, copy to the host), ``passes``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from portrait_rig.params import RigParams
from server import paths
from server.checkpoints.stylegan import load_generator
from server.renderer.face_model import FaceModel
from server.models.stylegan3 import StyleGAN3Generator, make_transform
from server.renderer.head_view import head_views
from server.backends.directions import Directions, styles_offset
from server.backends.shots import smooth_latents, smooth_transforms
from server.backends.framing import HeadFramer, check_framing, place
from server.backends.stylegan_rig import RigLatents, RigPasses, frame_images, request_windows

from server.backends.base import (LRU, Backend, RenderRequest, RenderResult, StageTimer,
                                  check_request, file_stamp, resolve_precision, torch_device)

FP16_CONV_CLAMP = 256.0           # what NVIDIA's code clamps float16 layers to


class StyleRigBackend(Backend):
    """StyleGAN2/3 + RigNet on "cpu" or "cuda". Options (typed, documented and validated in
    the registry, ``server.backends.SPECS``): ``generator`` (any format ``load_generator``
    reads), ``rignet`` ("auto": the model folder's RigNet when it exists), ``precision``
    ("fp16": every synthesis layer but StyleGAN2's 4x4 block in float16, activations clamped
    to +-256 as NVIDIA's mixed precision does; "native": the checkpoint's own mixed precision,
    float16 in its ``num_fp16_res`` highest resolutions), ``max_identities``,
    ``directions`` (the folder of edit directions), ``max_personal`` (personal generators
    kept loaded) and ``framing`` ("ffhq": StyleGAN2's FFHQ-aligned portrait placed where the
    rig's head is, at its size and roll; "centre": only moved to the head's FFHQ centre;
    "rig": the portrait fills the frame; StyleGAN3 places the head with its input transform
    either way)."""

    name = "stylerig"

    def __init__(self, face_model: FaceModel, device: str = "cpu", generator=None,
                 rignet="auto", precision: str = "auto", max_identities=64, directions=None,
                 max_personal=2, framing: str = "ffhq"):
        super().__init__(face_model, device)
        self.torch_device = torch_device(device)
        cuda = self.torch_device.type == "cuda"
        self.precision = precision = resolve_precision(precision, self.torch_device)
        self.max_identities = max_identities
        self.generator_path = (Path(generator).expanduser() if generator
                               else paths.stylegan_generator())
        if not self.generator_path.is_file():
            raise FileNotFoundError(f"StyleGAN generator not found: {self.generator_path}")
        self.G = load_generator(self.generator_path, self.torch_device)
        if self.G.c_dim:
            raise ValueError(f"{self.generator_path}: a conditional generator (c_dim "
                             f"{self.G.c_dim}); stylerig needs an unconditional one")
        self.is_stylegan3 = isinstance(self.G, StyleGAN3Generator)
        if precision == "fp16":
            _float16_everywhere(self.G)
        self.rig = RigLatents(self.G, self.torch_device, face_model.data, rignet,
                              max_identities, generator_name=self.generator_path.name)
        self.rignet, self.rignet_path = self.rig.rignet, self.rig.rignet_path
        self.directions = Directions(Path(directions).expanduser() if directions
                                     else paths.directions_dir(), self.G)
        if self.directions.kinds:
            print(f"stylerig: edit directions {', '.join(sorted(self.directions.kinds))}",
                  file=sys.stderr, flush=True)
        self._personal = LRU(max_personal)
        if cuda:
            torch.backends.cudnn.benchmark = True      # fixed shapes: pick the fastest kernels
        self._passes = RigPasses(face_model, device)
        self.framing = check_framing(framing)
        self.framer = (HeadFramer(face_model) if self.framing != "rig" and not self.is_stylegan3
                       else None)

    def summary(self) -> str:
        G = self.G
        kind = "StyleGAN3" if self.is_stylegan3 else "StyleGAN2"
        rignet = (f"RigNet {self.rignet_path}" if self.rignet is not None else
                  "no RigNet: identity only, the rig's pose, expression and light do not "
                  "change the portrait")
        return (f"{self.generator_path} ({kind} {G.img_resolution} px, {G.num_ws} x "
                f"{G.w_dim} W+), {rignet}, on {self.torch_device}, {self.precision}")

    # ------------------------------------------------------------------------ setup
    def warmup(self) -> None:
        """On CUDA, synthesise one frame so the first request does not pay for kernel
        selection (on the CPU there is nothing to prepare)."""
        if self.torch_device.type == "cuda":
            self.render([RenderRequest(RigParams(), self.G.img_resolution,
                                       self.G.img_resolution)])

    # ------------------------------------------------------------------------ rendering
    @torch.inference_mode()
    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        for i, request in enumerate(requests):
            check_request(i, request)
        lap = StageTimer(self.torch_device)
        # The frames to compute: each request's window (itself, and the neighbours it is
        # smoothed over), one after the other; ``windows`` holds (first row, length, centre).
        params, windows = request_windows(requests)
        views, framings = [], []
        for request, (start, length, centre) in zip(requests, windows):
            window = params[start: start + length]
            if self.rignet is not None or self.is_stylegan3:
                views += head_views(window, request.width, request.height)
            if self.framer is not None:         # StyleGAN2: smoothed like the latents
                framings.append(self.framer.shot_framing(window, centre, request.width,
                                                         request.height, self.framing))

        for p in params:
            self.directions.check(p.appearance.edits)
        w = torch.stack([self.rig.identity(p.appearance) for p in params])
        w = self.directions.apply_latent(w, [p.appearance.edits for p in params])
        lap("identity")
        if self.rignet is not None:
            w = self.rig.edit(w, params, views)
            lap("rignet")
        transforms = None
        if self.is_stylegan3:                                   # float64 [N, 3, 3]
            transforms = torch.tensor(np.stack([make_transform(v.roll, *v.shift)
                                                for v in views]))
        ws, frame_transforms = [], []
        for start, length, centre in windows:
            rows = slice(start, start + length)
            ws.append(smooth_latents(w[rows])[centre] if length > 1 else w[start])
            if transforms is not None:
                frame_transforms.append(smooth_transforms(transforms[rows])[centre]
                                        if length > 1 else transforms[start])
        ws = torch.stack(ws)
        transforms = torch.stack(frame_transforms) if transforms is not None else None
        images = self._synthesize(requests, ws, transforms)
        lap("synthesis")
        if framings:
            placed = place(images, np.stack(framings), [(r.width, r.height) for r in requests])
            frames = [np.ascontiguousarray(torch.cat(
                [(rgb * 127.5 + 128).clamp(0, 255), (alpha * 255).round()]).to(torch.uint8)
                .permute(1, 2, 0).cpu().numpy()) for rgb, alpha in placed]
        else:
            frames = frame_images(images, requests)
        results = [RenderResult(image) for image in frames]
        lap("image")
        return self._passes.complete(requests, results, lap)

    def _synthesize(self, requests: list[RenderRequest], ws: torch.Tensor,
                    transforms: torch.Tensor | None) -> torch.Tensor:
        """Images [B, C, S, S] of the requests' ws, each with its generator (the base one or
        its personal model) and its StyleSpace edits."""
        groups: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.params.appearance.personal_model, []).append(i)
        images = None
        for name, rows in groups.items():
            G = self._personal_generator(name) if name else self.G
            edits = [requests[i].params.appearance.edits for i in rows]
            index = torch.tensor(rows, device=ws.device)
            with styles_offset(G, self.directions.style_offsets(edits)):
                out = synthesize(G, ws[index], None if transforms is None else transforms[rows],
                                 force_fp32=self.precision == "fp32")
            if len(groups) == 1:
                return out
            if images is None:
                images = out.new_empty((len(requests), *out.shape[1:]))
            images[index] = out
        return images

    def _personal_generator(self, name: str):
        """The pivotal-tuning generator of personal model ``name`` (cached; checked to share
        the base generator's latent space shape)."""
        path = paths.personal_generator(name)
        if not path.is_file():
            raise FileNotFoundError(f"appearance.personal_model: no StyleGAN personal model "
                                    f"named {name!r} on the server (make one with python -m "
                                    "server.training.pti)")
        key = file_stamp(path)
        G = self._personal.get(key)
        if G is None:
            G = load_generator(path, self.torch_device)
            if (G.num_ws, G.w_dim, type(G)) != (self.G.num_ws, self.G.w_dim, type(self.G)):
                raise ValueError(f"appearance.personal_model {name!r}: its generator "
                                 f"[{G.num_ws}, {G.w_dim}] is not a tuned copy of the "
                                 f"server's [{self.G.num_ws}, {self.G.w_dim}]")
            if self.precision == "fp16":
                _float16_everywhere(G)
            self._personal.put(key, G)
        return G


# ---------------------------------------------------------------------------- synthesis

def synthesize(G, ws: torch.Tensor, transforms: torch.Tensor | None = None,
               force_fp32: bool = False) -> torch.Tensor:
    """ws [B, num_ws, w_dim] -> images [B, C, S, S] float32 in about [-1, 1], noise 'const'.

    ``transforms`` (StyleGAN3 only) [B, 3, 3]: each frame's forward image transform
    (``make_transform``: content rotated, then shifted); the input layer's ``transform``
    buffer gets its inverse and is left at the last one used. Frames sharing a transform
    share an input-layer call; the synthesis layers always run on the whole batch."""
    net = G.synthesis
    if transforms is None:
        # StyleGAN2 batches on the CPU: one shared convolution with the activations scaled
        # (NVIDIA's non-fused path) runs about twice as fast as per-sample grouped kernels.
        # Elsewhere NVIDIA's choice (fused in float32, scaled in float16).
        fused = False if ws.device.type == "cpu" and ws.shape[0] > 1 else None
        return net(ws, noise_mode="const", force_fp32=force_fp32, fused_modconv=fused)
    if transforms.shape != (ws.shape[0], 3, 3):
        raise ValueError(f"transforms: expected [{ws.shape[0]}, 3, 3], "
                         f"got {list(transforms.shape)}")
    inverse = torch.linalg.inv(transforms.double()).to(net.input.transform)
    distinct, group_of = torch.unique(inverse, dim=0, return_inverse=True)
    if len(distinct) == 1:
        net.input.transform.copy_(distinct[0])
        return net(ws, noise_mode="const", force_fp32=force_fp32)
    layer_ws = ws.to(torch.float32).unbind(dim=1)
    x = None
    for g, matrix in enumerate(distinct):
        rows = (group_of == g).nonzero()[:, 0]
        net.input.transform.copy_(matrix)
        features = net.input(layer_ws[0][rows])
        if x is None:
            x = features.new_empty((ws.shape[0], *features.shape[1:]))
        x[rows] = features
    # The rest of SynthesisNetwork.forward, on the whole batch.
    for name, w in zip(net.layer_names, layer_ws[1:]):
        x = getattr(net, name)(x, w, force_fp32=force_fp32)
    if net.output_scale != 1:
        x = x * net.output_scale
    return x.to(torch.float32)


def _float16_everywhere(G) -> None:
    """Run every synthesis layer in float16 on CUDA (StyleGAN2: every block above 4x4, as
    NVIDIA's code never runs b4 in float16), clamping activations where the checkpoint did
    not (converted TF generators have no clamp)."""
    net = G.synthesis
    if isinstance(G, StyleGAN3Generator):
        layers = [getattr(net, name) for name in net.layer_names]
        for layer in layers:
            layer.use_fp16 = True
    else:
        blocks = [getattr(net, f"b{res}") for res in net.block_resolutions]
        layers = []
        for block in blocks:
            block.use_fp16 = block.resolution > 4
            layers += [getattr(block, n) for n in ("conv0", "conv1", "torgb") if hasattr(block, n)]
    for layer in layers:
        if layer.conv_clamp is None:
            layer.conv_clamp = FP16_CONV_CLAMP
