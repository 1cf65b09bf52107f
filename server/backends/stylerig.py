"""The StyleRig backend: portraits of the rig from a StyleGAN2/3 generator edited by RigNet.

Per batch of requests:

1. Identity: every request's W+ latent [num_ws, w_dim] from ``appearance.seed`` or
   ``appearance.latent_file`` (a name in the data folder's ``latents/``, read by
   ``server.backends.latents``), mapped with the generator's mapping
   network and truncation ``appearance.truncation`` when it is a z; kept in an LRU cache.
2. Rig: RigNet (``server.models.rignet``) moves the latent to the rig's controls, w_hat =
   RigNet(w, p), with p = ``control_vector(params)`` whose global pose and light are the
   camera-relative head's (``server.renderer.head_view``: neck folded in, roll removed - RigNet
   models no roll - and the SH light in the camera frame, where DFR estimated it during
   training). One RigNet call covers the batch and the frames smoothing needs.
3. StyleGAN3 only: the head's roll about the viewing axis and its position in the frame
   become the generator's input transform (``make_transform(roll, tx, ty)``). The transform is
   a single buffer of the input layer, so frames with different transforms compute their
   Fourier-feature input one transform at a time (cheap: one small layer) and then run every
   synthesis layer as one batch. StyleGAN2 has no such transform: roll and position are not
   rendered there.
4. One synthesis call for the batch at the generator's resolution S, noise mode 'const' (a
   fixed noise image, so equal latents give equal frames); the [-1, 1] output becomes sRGB
   uint8 as NVIDIA's scripts write it (x * 127.5 + 128, clamped, truncated), resized (torch
   bicubic, antialiased when shrinking) to the square max(width, height) covering the frame
   and centre-cropped. Alpha is 255.

Without RigNet weights the backend draws plain StyleGAN portraits: identity (and, with
StyleGAN3, roll and position) follow the rig, pose, expression and light do not. It says so
on the server log when it starts and in ``description``; such frames have no ``rignet`` timing.

Temporal smoothing (batch requests of a shot with ``smooth``, docs/protocol.md "Shots"): the
request carries its neighbours' parameters (up to two frames either side, ``Shot.window``);
their latents go through steps 1-3 with the frame's own, ``server.backends.shots.smooth_latents``
(fine layers averaged, then the 5-tap kernel renormalised over the frames present) and
``smooth_transforms`` are applied over that window, and the frame keeps its own row. So the
smoothing window is exactly what the request carries; a frame without neighbours (a lone
frame, a render started from Blender's UI) is rendered unsmoothed.

Extra passes (normal, albedo, ...) come from the preview backend's buffer renderer, of the
face model in the rig's pose and camera. The generator's portrait is not fitted to that
geometry, so they describe the rig, not the pixels of the portrait.

Timings (milliseconds, for the whole batch): ``identity`` (the head's view, latent files and
mapping of identities not cached yet), ``rignet``, ``synthesis``, ``image`` (resize, 8-bit
conversion, copy to the host), ``passes``.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from portrait_rig.params import Appearance, RigParams
from server import paths
from server.checkpoints.stylegan import load_generator
from server.renderer.face_model import FaceModel
from server.models.rignet import ControlLayout, control_vector
from server.checkpoints.stylerig import load_rignet
from server.models.stylegan3 import StyleGAN3Generator, make_transform
from server.renderer.head_view import head_views
from server.backends.latents import load_latent_file, seed_z
from server.backends.shots import smooth_latents, smooth_transforms

from server.backends.base import Backend, RenderRequest, RenderResult, StageTimer, check_request

PRECISIONS = ("auto", "fp32", "fp16", "native")
FP16_CONV_CLAMP = 256.0           # what NVIDIA's code clamps float16 layers to
CONTROLS_WITHOUT_EXPRESSION = 33  # RigNet control vector: pose 3 + jaw 3 + SH 27, then E



class StyleRigBackend(Backend):
    """StyleGAN2/3 + RigNet on "cpu" or "cuda".

    Options (CLI strings accepted): ``generator`` a StyleGAN2/3 generator file in any format
    ``load_generator`` reads (default ``server.paths.stylegan_generator()``); ``rignet``
    "auto" (``server.paths.stylerig_rignet()`` when it exists), "none", or a ``save_rignet``
    file; ``precision`` "auto" (fp16 on CUDA, fp32 elsewhere), "fp32", "fp16" (CUDA: every
    synthesis layer but StyleGAN2's 4x4 block in float16, activations clamped to +-256 as
    NVIDIA's mixed precision does) or "native" (the checkpoint's own mixed precision:
    float16 in its ``num_fp16_res`` highest resolutions on CUDA); ``max_identities`` identity
    latents kept (default 64).
    """

    name = "stylerig"
    description = ("StyleRig: StyleGAN2/3 portraits whose pose, expression and light follow "
                   "the rig through RigNet (needs a generator checkpoint)")

    def __init__(self, face_model: FaceModel, device: str = "cpu", generator=None,
                 rignet="auto", precision: str = "auto", max_identities=64, **options):
        if options:
            raise ValueError(f"unknown stylerig option(s): {', '.join(sorted(options))} "
                             "(known: generator, rignet, precision, max_identities)")
        super().__init__(face_model, device)
        self.torch_device = torch.device(device)
        cuda = self.torch_device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise ValueError("device: CUDA was requested but torch sees no CUDA device")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        if precision == "auto":
            precision = "fp16" if cuda else "fp32"
        if precision in ("fp16", "native") and not cuda:
            raise ValueError(f"precision {precision!r}: float16 layers need a CUDA device "
                             "(use fp32)")
        self.precision = precision
        try:
            self.max_identities = int(max_identities)
        except (TypeError, ValueError):
            raise ValueError(f"max_identities: expected an integer, got {max_identities!r}") \
                from None
        if not 1 <= self.max_identities <= 100_000:
            raise ValueError(f"max_identities: must lie in 1..100000, got {self.max_identities}")

        problem = paths.stylerig_problem(generator=generator)
        if problem:
            raise FileNotFoundError(problem)
        self.generator_path = (Path(generator).expanduser() if generator
                               else paths.stylegan_generator())
        self.G = load_generator(self.generator_path, self.torch_device)
        if self.G.c_dim:
            raise ValueError(f"{self.generator_path}: a conditional generator (c_dim "
                             f"{self.G.c_dim}); stylerig needs an unconditional one")
        self.is_stylegan3 = isinstance(self.G, StyleGAN3Generator)
        if precision == "fp16":
            _float16_everywhere(self.G)
        self.rignet, self.rignet_path = self._load_rignet(rignet)
        self.layout = None if self.rignet is None else _layout_of(self.rignet)
        if self.rignet is None:
            self.description = (f"{self.description}. Identity only: no RigNet weights, so "
                                "pose, expression and light do not change the portrait")
            print(f"stylerig: no RigNet weights ({self._rignet_hint(rignet)}): rendering "
                  "identity only; the rig's pose, expression and light do not change the "
                  "portrait", file=sys.stderr, flush=True)
        if cuda:
            torch.backends.cudnn.benchmark = True      # fixed shapes: pick the fastest kernels
        self._latents: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._buffers = None                           # preview backend, built for passes

    # ------------------------------------------------------------------------ setup
    def _load_rignet(self, option):
        if option in (None, "none"):
            return None, None
        path = paths.stylerig_rignet() if option == "auto" else Path(option).expanduser()
        if not path.is_file():
            if option == "auto":
                return None, None
            raise FileNotFoundError(f"rignet: file not found: {path}")
        net = load_rignet(path, self.torch_device)
        if (net.num_ws, net.w_dim) != (self.G.num_ws, self.G.w_dim):
            raise ValueError(f"rignet: {path} edits latents [{net.num_ws}, {net.w_dim}], the "
                             f"generator {self.generator_path} has [{self.G.num_ws}, "
                             f"{self.G.w_dim}]")
        return net, path

    @staticmethod
    def _rignet_hint(option) -> str:
        if option in (None, "none"):
            return "rignet=none"
        return f"none at {paths.stylerig_rignet()}; pass --option stylerig.rignet=FILE"

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
        windows, params, views = [], [], []
        for request in requests:
            if request.shot is not None and request.shot.smooth and request.shot.neighbors:
                _, window, centre = request.shot.window(request.params)
            else:
                window, centre = [request.params], 0
            windows.append((len(params), len(window), centre))
            params += window
            if self.rignet is not None or self.is_stylegan3:
                views += head_views(window, request.width, request.height)

        w = torch.stack([self._identity(p.appearance) for p in params])
        lap("identity")
        if self.rignet is not None:
            controls = control_vector(params, self.layout, device=self.torch_device)
            pose = torch.tensor(np.stack([v.swing for v in views]), dtype=torch.float32)
            light = torch.tensor(np.stack([v.light for v in views]), dtype=torch.float32)
            controls[:, self.layout.slices["global_pose"]] = pose.to(self.torch_device)
            controls[:, self.layout.slices["sh"]] = light.flatten(1).to(self.torch_device)
            w = self.rignet(w, controls)
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
        images = synthesize(self.G, ws, transforms, force_fp32=self.precision == "fp32")
        lap("synthesis")
        results = [RenderResult(image) for image in self._images(images, requests)]
        lap("image")
        if any(r.passes for r in requests):
            self._add_passes(requests, results)
            lap("passes")
        for result in results:
            result.timings = dict(lap.times)
        return results

    def _identity(self, appearance: Appearance) -> torch.Tensor:
        """W+ [num_ws, w_dim] float32 on the device for a request's identity (cached)."""
        G, psi = self.G, float(appearance.truncation)
        if appearance.latent_file:
            path = paths.client_file("appearance.latent_file", appearance.latent_file,
                                     paths.LATENTS)
            stat = path.stat()
            key = ("file", str(path), stat.st_size, stat.st_mtime_ns, psi)
        else:
            key = ("seed", appearance.seed or 0, psi)
        w = self._latents.get(key)
        if w is None:
            if key[0] == "file":
                latent = load_latent_file(path, G.z_dim, G.w_dim, G.num_ws)
                kind, value = latent.kind, latent.value
            else:
                kind, value = "z", seed_z(appearance.seed, G.z_dim)
            value = value.to(self.torch_device)
            w = G.mapping(value[None], truncation_psi=psi)[0] if kind == "z" else value
            self._latents[key] = w
            while len(self._latents) > self.max_identities:
                self._latents.popitem(last=False)
        self._latents.move_to_end(key)
        return w

    def _images(self, images: torch.Tensor, requests: list[RenderRequest]) -> list[np.ndarray]:
        """[B, 3, S, S] in [-1, 1] -> RGBA uint8 frames [H, W, 4], each resized to the square
        covering it and centre-cropped (frames of one size are converted together)."""
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

    def _add_passes(self, requests: list[RenderRequest], results: list[RenderResult]) -> None:
        """The requested buffers of the face model, from the preview backend's renderer."""
        from server.backends.preview import PreviewBackend

        if self._buffers is None:
            self._buffers = PreviewBackend(self.face_model, self.device)
        wanted = [i for i, r in enumerate(requests) if r.passes]
        buffers = self._buffers.render([requests[i] for i in wanted])
        for i, rendered in zip(wanted, buffers):
            results[i].passes = rendered.passes


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


def _layout_of(net):
    """The RigNet's control layout (derived from its control size when the file has none)."""
    if net.layout is not None:
        return net.layout
    n_expression = net.control_dim - CONTROLS_WITHOUT_EXPRESSION
    if n_expression < 0:
        raise ValueError(f"rignet: {net.control_dim} controls, fewer than the "
                         f"{CONTROLS_WITHOUT_EXPRESSION} of pose, jaw and light")
    return ControlLayout(n_expression)

