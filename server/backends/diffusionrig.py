"""The DiffusionRig backend: photoreal portraits of the rig through DiffusionRig's UNet.

Per batch of requests: map each request's rig parameters to DECA's codes and render the
physical buffers in DECA's conventions (``server.renderer.deca``), look up each request's global
latent z, draw its fixed initial noise, and run one sampler over the whole batch with the
UNet conditioned on both. The model generates a square of ``resolution`` pixels covering the
requested frame (side max(width, height)); it is resized to that side and centre-cropped.

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

Timings (milliseconds, for the whole batch): ``buffers`` (DECA codes, posing, buffers),
``latent`` (latent files and photo encodings not yet cached), ``sample`` (all UNet steps
and previews), ``image`` (x0 to 8-bit frames), ``passes``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from portrait_rig.params import Appearance, RigParams
from server import paths
from server.renderer.deca import DecaBufferRenderer, DecaCodes
from server.diffusion import NoiseSchedule, ddim_sample, dpm_solver_pp_sample, initial_noise
from server.renderer.face_model import FaceModel
from server.models.diffusionrig import DiffusionRig
from server.checkpoints.diffusionrig import load_diffusionrig
from server.renderer.buffers import CHANNELS
from server.renderer.texture import choose_texture

from server.backends.base import Backend, RenderCancelled, RenderRequest, RenderResult, StageTimer, check_request

SAMPLERS = {"ddim": 20, "dpm++": 10}              # name -> default number of steps
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_DIM = 64
_CACHE_ENTRIES = 64                               # latents and noise tensors kept


def _int_option(name: str, value, low: int, high: int) -> int:
    """An integer option (CLI options arrive as strings) in [low, high]."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name}: must lie in {low}..{high}, got {number}")
    return number


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(options)}, got {value!r}")
    return value


class DiffusionRigBackend(Backend):
    """DiffusionRig on "cpu" or "cuda" (CPU only makes sense for tests).

    Options (CLI strings accepted): ``checkpoint`` stage-1 file (default
    ``server.paths.diffusionrig_checkpoint()``); ``sampler`` "ddim" (the official deterministic
    DDIM on the respaced grid) or "dpm++" (DPM-Solver++(2M)); ``steps`` (default 20 for DDIM,
    10 for DPM-Solver++); ``precision`` "auto" (fp16 autocast on CUDA, fp32 elsewhere),
    "fp32", "fp16" or "bf16"; ``texture`` "auto" (``server.paths.flame_texture()`` when it
    exists and fits the face model), "none" (the face model's vertex albedo) or a
    FLAME_texture.npz path; ``resolution`` the size the model samples at (256 for the
    official model; the architecture itself is read from the checkpoint); ``personal_dir``
    folder of personal models; ``max_models`` checkpoints kept loaded, the stage-1 model
    included (it is never evicted, and the personal model in use always stays).
    """

    name = "diffusionrig"
    description = ("DiffusionRig: photoreal portraits conditioned on the rig's DECA buffers and "
                   "a reference photo's appearance (needs its checkpoint; CUDA)")

    def __init__(self, face_model: FaceModel, device: str = "cpu", checkpoint=None,
                 sampler: str = "ddim", steps=None, precision: str = "auto",
                 texture: str = "auto", resolution=256, personal_dir=None, max_models=2,
                 **options):
        if options:
            raise ValueError(f"unknown diffusionrig option(s): {', '.join(sorted(options))} "
                             "(known: checkpoint, sampler, steps, precision, texture, "
                             "resolution, personal_dir, max_models)")
        super().__init__(face_model, device)
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: CUDA was requested but torch sees no CUDA device")
        self.sampler = _choice("sampler", sampler, tuple(SAMPLERS))
        self.steps = _int_option("steps", SAMPLERS[sampler] if steps is None else steps, 2, 1000)
        self.schedule = NoiseSchedule.linear()
        self.timesteps = (self.schedule.respaced(self.steps) if self.sampler == "ddim"
                          else self.schedule.time_uniform(self.steps))
        precision = _choice("precision", precision, ("auto", *PRECISIONS))
        if precision == "auto":
            precision = "fp16" if self.torch_device.type == "cuda" else "fp32"
        if precision == "fp16" and self.torch_device.type != "cuda":
            raise ValueError("precision: fp16 autocast needs a CUDA device (use fp32 or bf16)")
        self.precision = precision
        self.resolution = _int_option("resolution", resolution, 8, 1024)
        self.max_models = _int_option("max_models", max_models, 1, 64)
        self.personal_dir = Path(personal_dir).expanduser() if personal_dir else None

        problem = paths.diffusionrig_problem(checkpoint=checkpoint)
        if problem:
            raise FileNotFoundError(problem)
        self.checkpoint = (Path(checkpoint).expanduser() if checkpoint
                           else paths.diffusionrig_checkpoint())
        base = load_diffusionrig(self.checkpoint, None, self.torch_device, self.resolution)
        if base.config.latent_dim != LATENT_DIM:
            raise ValueError(f"{self.checkpoint}: latent size {base.config.latent_dim}, "
                             f"DiffusionRig's is {LATENT_DIM}")
        self._models: OrderedDict[str | None, DiffusionRig] = OrderedDict({None: base})

        if face_model.device != self.torch_device:
            face_model = FaceModel(face_model.data, self.torch_device)
        self.buffers = DecaBufferRenderer(
            face_model, choose_texture(texture, face_model.faces.shape[0], self.torch_device))
        self._latents: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._noise: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------------ setup
    def _model(self, name: str | None) -> DiffusionRig:
        """The stage-1 model (None) or personal model ``name``, loaded on first use and kept
        in a small LRU (the stage-1 model is never evicted)."""
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        path = paths.personal_checkpoint(name, self.personal_dir)
        if not path.is_file():
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
        _stop_if_cancelled(requests)
        return results

    @torch.inference_mode()
    def _render_group(self, model: DiffusionRig, model_key, requests: list[RenderRequest]):
        lap = StageTimer(self.torch_device)
        size, device = self.resolution, self.torch_device
        _stop_if_cancelled(requests)
        codes = _cat_codes([self.buffers.codes([r.params], r.width, r.height)
                            for r in requests])
        buffers = self.buffers.render(codes, size)
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
            _stop_if_cancelled(requests)
            if step + 1 == steps or not previews:
                return
            images = self._images(x0[previews], [requests[i] for i in previews])
            for i, image in zip(previews, images):
                requests[i].on_preview(step + 1, steps,
                                       RenderResult(image, timings={"elapsed": lap.elapsed()}))

        if self.sampler == "ddim":
            x0 = ddim_sample(denoise, noise, self.schedule, self.timesteps, callback=callback)
        else:
            x0 = dpm_solver_pp_sample(denoise, noise, self.schedule, timesteps=self.timesteps,
                                      callback=callback)
        lap("sample")
        images = self._images(x0, requests)
        lap("image")
        results = [RenderResult(image) for image in images]
        if any(r.passes for r in requests):
            for j, (request, result) in enumerate(zip(requests, results)):
                result.passes = self._passes(request, codes, j, buffers)
            lap("passes")
        for result in results:
            result.timings = dict(lap.times)
        return results

    def _images(self, x0: torch.Tensor, requests: list[RenderRequest]) -> list[np.ndarray]:
        """x0 [B, 3, S, S] in [-1, 1] -> uint8 RGBA frames [H, W, 4] (alpha 255): resized to
        the square covering each frame, centre-cropped."""
        pixels = ((x0.float() + 1) * 0.5).clamp(0, 1)
        out = []
        for j, request in enumerate(requests):
            side = max(request.width, request.height)
            image = pixels[j: j + 1]
            if side != image.shape[-1]:
                image = F.interpolate(image, size=(side, side), mode="bicubic",
                                      align_corners=False, antialias=side < image.shape[-1])
            top, left = (side - request.height) // 2, (side - request.width) // 2
            image = image[0, :, top: top + request.height, left: left + request.width]
            rgb = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
            rgba = torch.cat([rgb, torch.full_like(rgb[..., :1], 255)], dim=-1)
            out.append(np.ascontiguousarray(rgba.cpu().numpy()))
        return out

    def _passes(self, request: RenderRequest, codes: DecaCodes, j: int,
                buffers) -> dict[str, np.ndarray]:
        """The requested buffers in the frame: DECA's buffers at the covering square's size,
        centre-cropped (albedo and rendered as the model sees them, display-referred)."""
        if not request.passes:
            return {}
        side = max(request.width, request.height)
        if side == self.resolution:
            packed = buffers.packed[j]
        else:
            one = DecaCodes(*(getattr(codes, f)[j: j + 1] for f in
                              ("shape", "exp", "pose", "cam", "light")))
            packed = self.buffers.render(one, side).packed[0]
        top, left = (side - request.height) // 2, (side - request.width) // 2
        packed = packed[top: top + request.height, left: left + request.width].cpu().numpy()
        return {name: np.ascontiguousarray(packed[..., slice(*CHANNELS[name])])
                for name in request.passes}

    # ------------------------------------------------------------------------ inputs
    def _initial_noise(self, seed: int) -> torch.Tensor:
        key = (seed, self.resolution)
        noise = self._noise.get(key)
        if noise is None:
            noise = initial_noise(seed, (1, 3, self.resolution, self.resolution))
            _remember(self._noise, key, noise)
        return noise

    def _latent(self, model_key, model: DiffusionRig, appearance: Appearance) -> torch.Tensor:
        """z [64] on the device for a request's appearance (see the module notes)."""
        if appearance.latent_file:
            path = paths.client_file("appearance.latent_file", appearance.latent_file,
                                     paths.LATENTS)
            key = ("file", str(path), _stamp(path))
            if key not in self._latents:
                _remember(self._latents, key, load_latent(path).to(self.torch_device))
            return self._latents[key]
        if appearance.reference_photo:
            path = paths.client_file("appearance.reference_photo",
                                     appearance.reference_photo, paths.PHOTOS)
            key = ("photo", model_key, str(path), _stamp(path))
            if key not in self._latents:
                photo = load_aligned_photo(path, self.resolution).to(self.torch_device)
                with self._autocast():
                    z = model.encode(photo)[0].float()
                _remember(self._latents, key, z)
            return self._latents[key]
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
            latent = torch.load(path, map_location="cpu", weights_only=True)
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


def load_aligned_photo(path: str | Path, size: int) -> torch.Tensor:
    """The encoder's input [1, 3, size, size] in [-1, 1] from a photo file: a size x size
    image is taken as an FFHQ-aligned crop; any other is aligned with
    ``server.photo.align.align_face`` (dlib's landmarks, FFHQ's recipe) at ``size``."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = np.asarray(opened.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"appearance.reference_photo: cannot read {path}: {exc}") from None
    if image.shape[:2] != (size, size):
        try:
            from server.photo.align import align_face
            image, _ = align_face(image, size)
        except (ImportError, ValueError, RuntimeError) as exc:   # no dlib, no face found
            raise ValueError(f"appearance.reference_photo: {path} is {image.shape[1]}x"
                             f"{image.shape[0]}, not a {size}x{size} aligned crop, and "
                             f"aligning it failed: {exc}") from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None].contiguous()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_ENTRIES:
        cache.popitem(last=False)


def _seed(request: RenderRequest) -> int:
    if request.shot is not None:
        return request.shot.seed
    seed = request.params.appearance.seed
    return 0 if seed is None else seed


def _stop_if_cancelled(requests: list[RenderRequest]) -> None:
    if all(r.cancelled() for r in requests):
        raise RenderCancelled(f"all {len(requests)} request(s) of the batch were cancelled")


def _cat_codes(parts: list[DecaCodes]) -> DecaCodes:
    names = ("shape", "exp", "pose", "cam", "light")
    return DecaCodes(*(torch.cat([getattr(p, n) for p in parts]) for n in names))

