"""The DiffusionRig backend: photoreal portraits of the rig through DiffusionRig's UNet.

Per batch of requests: map each request's rig parameters to DECA's codes, find the head's
FFHQ-aligned framing from the posed mesh's landmarks (``server.backends.framing``), render the
physical buffers in that framing in DECA's conventions (``server.renderer.deca``; the texture
at ``appearance.texture``), look up each request's global latent z, draw its fixed initial
noise, and run one sampler over the whole batch with the UNet conditioned on both. The model
generates the aligned square at ``resolution`` pixels, the framing places it back into the
requested frame (alpha: the generated square's coverage). With ``framing`` "rig" the square
covering the frame (side max(width, height)) is generated instead, resized and centre-cropped.
Frames of a shot with ``smooth`` and neighbours get their framing smoothed over them.

Appearance (``params.appearance``):

* ``latent_file``: a saved latent, ``.npy`` or ``.pt`` holding a tensor of shape [64]
  ([1, 64] accepted); takes precedence over the photo. A name in the data folder's
  ``latents/`` (``server.paths.client_file``).
* ``reference_photo``: a photo (a name in ``photos/``) whose appearance the portrait takes,
  encoded once per photo
  file (cached by path, size and modification time). A ``resolution``-sized square image
  is taken as already FFHQ-aligned (the form DiffusionRig's data tools write); any other is
  aligned with ``server.photo.align.align_face`` (dlib's 68 landmarks, FFHQ's recipe).
* ``personal_model``: the name of a personalised checkpoint, ``<personal_dir>/<name>/model.pt``
  (``server.paths``); without it the stage-1 checkpoint renders.

Noise: the initial noise of a frame is drawn from ``shot.seed`` for frames of a shot, else
``appearance.seed``, else 0 (``diffusion.initial_noise``: on the CPU, then moved), so the same
parameters and seed give the same frame and an edit changes only what it edits.

Live previews: a request with ``on_preview`` receives the sampler's x0 prediction after each
step but the last; a batch whose requests are all ``cancelled`` stops between steps.

Timings (milliseconds, for the whole batch): ``buffers`` (DECA codes, framing, buffers),
``latent`` (latent files and photo encodings not yet cached), ``sample`` (all UNet steps
and previews), ``image`` (x0 to 8-bit frames), ``passes``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from portrait_rig.params import Appearance, RigParams
from server import paths
from server.backends.framing import HeadFramer, check_framing, identity_framings, place
from server.renderer.deca import DecaBufferRenderer, DecaCodes
from server.diffusion import (NoiseSchedule, ddim_sample, distilled_sample, dpm_solver_pp_sample,
                              initial_noise, read_distilled_timesteps)
from server.renderer.face_model import FaceModel
from server.models.diffusionrig import DiffusionRig
from server.checkpoints.diffusionrig import load_diffusionrig
from server.checkpoints.torch_file import read_torch_file
from server.photo.align import encoder_input
from server.renderer.buffers import CHANNELS
from server.renderer.texture import choose_texture

from server.backends.base import (LRU, Backend, RenderCancelled, RenderRequest, RenderResult,
                                  StageTimer, check_request, file_stamp, resolve_precision,
                                  stop_if_cancelled, torch_device)

SAMPLERS = {"ddim": 20, "dpm++": 10, "distilled": 2}  # name -> default number of steps
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_DIM = 64
_CACHE_ENTRIES = 64                               # latents and noise tensors kept


class DiffusionRigBackend(Backend):
    """DiffusionRig on "cpu" or "cuda" (CPU only makes sense for tests). Options (typed,
    documented and validated in the registry, ``server.backends.SPECS``): ``checkpoint``,
    ``sampler`` ("ddim": the official deterministic DDIM on the respaced grid; "dpm++":
    DPM-Solver++(2M); "distilled": a few-step student written by
    ``server.training.diffusionrig.distill`` and given as ``checkpoint``, sampled on the grid
    its file carries, ``steps`` ignored), ``steps``, ``precision``, ``texture`` ("auto" uses
    the FLAME texture space when it fits the face model), ``resolution`` (the architecture
    itself is read from the checkpoint), ``framing`` ("ffhq": the network sees the head
    FFHQ-aligned, as it was trained; "centre": only the FFHQ centre placed, as the official
    inference script does; "rig": the rig's own framing; ``server.backends.framing``),
    ``personal_dir`` and ``max_models`` (the stage-1 model is never evicted, and the personal
    model in use always stays)."""

    name = "diffusionrig"

    def __init__(self, face_model: FaceModel, device: str = "cpu", checkpoint=None,
                 sampler: str = "ddim", steps=None, precision: str = "auto",
                 texture: str = "auto", resolution=256, framing: str = "ffhq",
                 personal_dir=None, max_models=2):
        super().__init__(face_model, device)
        self.torch_device = torch_device(device)
        self.sampler = sampler
        self.steps = SAMPLERS[sampler] if steps is None else steps
        self.schedule = NoiseSchedule.linear()
        self.timesteps = (self.schedule.respaced(self.steps) if self.sampler == "ddim"
                          else self.schedule.time_uniform(self.steps))
        self.precision = resolve_precision(precision, self.torch_device)
        self.resolution = resolution
        self.max_models = max_models
        self.framing = check_framing(framing)
        self.personal_dir = Path(personal_dir).expanduser() if personal_dir else None
        self.checkpoint = (Path(checkpoint).expanduser() if checkpoint
                           else paths.diffusionrig_checkpoint())
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"DiffusionRig checkpoint not found: {self.checkpoint}")
        if self.sampler == "distilled":   # the student's own grid, from its file
            grid = read_distilled_timesteps(self.checkpoint)
            if grid is None:
                raise ValueError(f"sampler distilled: {self.checkpoint} is not a distilled "
                                 "student (write one with python -m "
                                 "server.training.diffusionrig.distill)")
            self.timesteps, self.steps = grid, len(grid)
        base = load_diffusionrig(self.checkpoint, None, self.torch_device, self.resolution)
        if base.config.latent_dim != LATENT_DIM:
            raise ValueError(f"{self.checkpoint}: latent size {base.config.latent_dim}, "
                             f"DiffusionRig's is {LATENT_DIM}")
        self._models: OrderedDict[str | None, DiffusionRig] = OrderedDict({None: base})

        if face_model.device != self.torch_device:
            face_model = FaceModel(face_model.data, self.torch_device)
        self.buffers = DecaBufferRenderer(
            face_model, choose_texture(texture, face_model.triangles.shape[0], self.torch_device))
        self.framer = HeadFramer(face_model) if self.framing != "rig" else None
        self._latents = LRU(_CACHE_ENTRIES)
        self._noise = LRU(_CACHE_ENTRIES)

    def summary(self) -> str:
        cfg = self._models[None].config
        texture = "FLAME texture space" if self.buffers.texture is not None else "vertex albedo"
        return (f"{self.checkpoint} (DiffusionRig {self.resolution} px, {cfg.model_channels} "
                f"channels), {self.sampler} {self.steps} steps, {texture}, framing "
                f"{self.framing}, on "
                f"{self.torch_device}, {self.precision}")

    # ------------------------------------------------------------------------ setup
    def _model(self, name: str | None) -> DiffusionRig:
        """The stage-1 model (None) or personal model ``name``, loaded on first use and kept
        in a small LRU (the stage-1 model is never evicted)."""
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        if self.sampler == "distilled":
            raise ValueError("appearance.personal_model: the distilled sampler runs its "
                             "student checkpoint only; distil the personal model and give it "
                             "as diffusionrig.checkpoint")
        path = paths.personal_checkpoint(name, self.personal_dir)
        if not path.is_file():
            if (path.parent / "state.pt").is_file():
                raise FileNotFoundError(
                    f"appearance.personal_model: {name!r} is not finished (its training is "
                    "running or was stopped); resume it with python -m "
                    f"server.training.diffusionrig.personalise --name {name} --photos DIR")
            raise FileNotFoundError(f"appearance.personal_model: no personal model {name!r} "
                                    f"(expected {path})")
        model = load_diffusionrig(path, None, self.torch_device, self.resolution)
        base = self._models[None].config
        if model.config != base:
            raise ValueError(f"appearance.personal_model: {path} is a {model.config} model, "
                             f"the stage-1 model is {base}")
        while len(self._models) >= max(self.max_models, 2):     # keep stage-1 + this one
            del self._models[next(k for k in self._models if k is not None)]
        self._models[name] = model
        return model

    def warmup(self) -> None:
        """Render small buffers once (compiles the CPU rasteriser) and, on CUDA, run one UNet
        step so the first request does not pay for kernel selection."""
        codes = self.buffers.codes([RigParams()], 32, 32)
        self.buffers.render(codes, 32)
        if self.torch_device.type == "cuda":
            model, size = self._models[None], self.resolution
            with torch.inference_mode(), self._autocast():
                model(torch.zeros(1, 3, size, size, device=self.torch_device),
                      torch.tensor([999], device=self.torch_device),
                      torch.zeros(1, 9, size, size, device=self.torch_device),
                      torch.zeros(1, LATENT_DIM, device=self.torch_device))
            torch.cuda.synchronize()

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=dtype)

    # ------------------------------------------------------------------------ rendering
    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        groups: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            check_request(i, request)
            groups.setdefault(request.params.appearance.personal_model, []).append(i)
        results: list[RenderResult | None] = [None] * len(requests)
        for name, indices in groups.items():
            batch = [requests[i] for i in indices]
            try:
                rendered = self._render_group(self._model(name), name, batch)
            except RenderCancelled:                 # nobody wants these; others may remain
                rendered = [RenderResult(np.zeros((r.height, r.width, 4), np.uint8))
                            for r in batch]
            for i, result in zip(indices, rendered):
                results[i] = result
        stop_if_cancelled(requests)
        return results

    @torch.inference_mode()
    def _render_group(self, model: DiffusionRig, model_key, requests: list[RenderRequest]):
        lap = StageTimer(self.torch_device)
        size, device = self.resolution, self.torch_device
        stop_if_cancelled(requests)
        codes = DecaCodes.cat([self.buffers.codes([r.params], r.width, r.height)
                               for r in requests])
        framings = self._framings(requests, codes)
        aligned = self.framer.reframe(codes, framings) if self.framer else codes
        buffers = self.buffers.render(aligned, size)
        condition = self.buffers.conditioning(buffers)
        lap("buffers")
        z = torch.stack([self._latent(model_key, model, r.params.appearance) for r in requests])
        noise = torch.cat([self._initial_noise(_seed(r)) for r in requests]).to(device)
        lap("latent")

        def denoise(x, t):
            with self._autocast():
                return model(x, t, condition, z).float()

        previews = [i for i, r in enumerate(requests) if r.on_preview is not None]
        steps = len(self.timesteps)

        def callback(step: int, x0: torch.Tensor) -> None:
            stop_if_cancelled(requests)
            if step + 1 == steps or not previews:
                return
            images = self._images(x0[previews], [requests[i] for i in previews],
                                  framings[previews])
            for i, image in zip(previews, images):
                requests[i].on_preview(step + 1, steps,
                                       RenderResult(image, timings={"elapsed": lap.elapsed()}))

        if self.sampler == "ddim":
            x0 = ddim_sample(denoise, noise, self.schedule, self.timesteps, callback=callback)
        elif self.sampler == "distilled":
            x0 = distilled_sample(denoise, noise, self.schedule, self.timesteps,
                                  callback=callback)
        else:
            x0 = dpm_solver_pp_sample(denoise, noise, self.schedule, timesteps=self.timesteps,
                                      callback=callback)
        lap("sample")
        images = self._images(x0, requests, framings)
        lap("image")
        results = [RenderResult(image) for image in images]
        if any(r.passes for r in requests):
            for j, (request, result) in enumerate(zip(requests, results)):
                result.passes = self._passes(request, codes, j,
                                             buffers if aligned is codes else None)
            lap("passes")
        for result in results:
            result.timings = dict(lap.times)
        return results

    def _framings(self, requests: list[RenderRequest], codes: DecaCodes) -> np.ndarray:
        """[B, 4] framing of each request (``server.backends.framing``), smoothed over the
        shot's neighbours for frames that carry them."""
        if self.framer is None:
            return identity_framings(len(requests))
        framings = self.framer.framings(codes, self.framing)
        for j, request in enumerate(requests):
            shot = request.shot
            if shot is not None and shot.smooth and shot.neighbors:
                _, window, centre = shot.window(request.params)
                framings[j] = self.framer.shot_framing(window, centre, request.width,
                                                       request.height, self.framing)
        return framings

    def _images(self, x0: torch.Tensor, requests: list[RenderRequest],
                framings: np.ndarray) -> list[np.ndarray]:
        """x0 [B, 3, S, S] in [-1, 1] -> uint8 RGBA frames [H, W, 4]: each portrait placed
        into its frame through its framing, alpha its coverage."""
        pixels = (x0.float() + 1) * 0.5
        placed = place(pixels, framings, [(r.width, r.height) for r in requests])
        out = []
        for rgb, alpha in placed:
            rgba = torch.cat([rgb.clamp(0, 1), alpha]).permute(1, 2, 0)
            out.append(np.ascontiguousarray((rgba * 255).round().to(torch.uint8).cpu().numpy()))
        return out

    def _passes(self, request: RenderRequest, codes: DecaCodes, j: int,
                buffers) -> dict[str, np.ndarray]:
        """The requested buffers in the frame: DECA's buffers of the rig's framing at the
        covering square's size, centre-cropped (albedo and rendered as the model sees them,
        display-referred). ``buffers``: the batch's, when they were rendered in that framing."""
        if not request.passes:
            return {}
        side = max(request.width, request.height)
        if side == self.resolution and buffers is not None:
            packed = buffers.packed[j]
        else:
            packed = self.buffers.render(codes.take([j]), side).packed[0]
        top, left = (side - request.height) // 2, (side - request.width) // 2
        packed = packed[top: top + request.height, left: left + request.width].cpu().numpy()
        return {name: np.ascontiguousarray(packed[..., slice(*CHANNELS[name])])
                for name in request.passes}

    # ------------------------------------------------------------------------ inputs
    def _initial_noise(self, seed: int) -> torch.Tensor:
        key = (seed, self.resolution)
        noise = self._noise.get(key)
        if noise is None:
            noise = self._noise.put(key, initial_noise(seed, (1, 3, self.resolution,
                                                              self.resolution)))
        return noise

    def _latent(self, model_key, model: DiffusionRig, appearance: Appearance) -> torch.Tensor:
        """z [64] on the device for a request's appearance (see the module notes)."""
        if appearance.latent_file:
            path = paths.client_file("appearance.latent_file", appearance.latent_file,
                                     paths.LATENTS)
            key = ("file", file_stamp(path))
            z = self._latents.get(key)
            if z is None:
                z = self._latents.put(key, load_latent(path).to(self.torch_device))
            return z
        if appearance.reference_photo:
            path = paths.client_file("appearance.reference_photo",
                                     appearance.reference_photo, paths.PHOTOS)
            key = ("photo", model_key, file_stamp(path))
            z = self._latents.get(key)
            if z is None:
                photo = encoder_input(path, self.resolution).to(self.torch_device)
                with self._autocast():
                    z = self._latents.put(key, model.encode(photo)[0].float())
            return z
        raise ValueError("appearance: the diffusionrig backend needs a reference_photo (whose "
                         "appearance the portrait takes) or a latent_file")


# ---------------------------------------------------------------------------- helpers

def load_latent(path: str | Path) -> torch.Tensor:
    """A saved global latent: ``.npy`` or ``.pt`` (a plain tensor, read with
    ``weights_only``) of shape [64] or [1, 64] -> float32 [64]."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            latent = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".pt":
            latent = read_torch_file(path, "a latent", "latent")
        else:
            raise ValueError("expected a .npy or .pt file")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"appearance.latent_file: cannot read {path}: {exc}") from None
    if not isinstance(latent, torch.Tensor) or latent.reshape(-1).shape != (LATENT_DIM,) \
            or latent.ndim > 2:
        got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"appearance.latent_file: {path} holds {got}, expected a tensor of "
                         f"shape [{LATENT_DIM}]")
    latent = latent.reshape(LATENT_DIM).float()
    if not torch.isfinite(latent).all():
        raise ValueError(f"appearance.latent_file: {path} holds NaN or inf")
    return latent




def _seed(request: RenderRequest) -> int:
    if request.shot is not None:
        return request.shot.seed
    seed = request.params.appearance.seed
    return 0 if seed is None else seed


