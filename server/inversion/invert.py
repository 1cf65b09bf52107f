"""Photo -> identity: the W+ latent of a StyleGAN generator that reconstructs a face photo.

``PhotoInverter.invert(photo)``:

1. dlib finds the most certain face and its 68 landmarks; the FFHQ-aligned 256 crop is cut
   (``server.photo.align``): what encoders were trained on and what the losses compare.
2. ``method`` 'encoder' (or 'auto' with an encoder): e4e in one pass, ReStyle in its passes
   (``server.models.encoders``). 'optimisation' (or 'auto' with ``steps`` > 0): the code is
   optimised against the photo (``server.inversion.optimise``, losses of
   ``server.inversion.losses``), from the encoder's code when there is one, else from
   ``w_avg``. Without an encoder and with 0 steps there is nothing to do: an error.
3. The photo's framing (``server.inversion.frame``): roll and shift of the face relative to
   the aligned crop, which the rig carries as its roll and position (StyleGAN3 renders them
   through its input transform).
4. Metrics of the reconstruction against the aligned photo: PSNR (dB, on [0, 1] pixels at 256),
   dlib identity distance and landmark error (crop pixels).

The generator is used with its input transform at identity (aligned) and its stored noise;
keep one inverter per generator copy (StyleGAN3's transform is a buffer it sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from server.inversion.frame import PhotoFrame, photo_frame
from server.inversion.losses import CROP, LossWeights, ReconstructionLosses
from server.inversion.optimise import OptimiseSettings, optimise_latent
from server.photo.align import FaceAlignment, align_face, crop
from server.photo.landmarks import FaceDetection, FaceDetector, decode_photo, to_rgb

METHODS = ("auto", "encoder", "optimisation")
MAX_STEPS = 5000
DEFAULT_STEPS = 300             # optimisation from w_avg (PTI projects with 450 at 1024)
DEFAULT_REFINE_STEPS = 0        # after an encoder: its code is used as it is unless asked


class InversionError(ValueError):
    """The inversion cannot run as asked (no encoder, bad settings); ``field`` names the
    offending setting, None when the server lacks something."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class Inversion:
    """An inverted photo. ``ws`` float32 [num_ws, w_dim]; ``aligned`` / ``reconstruction``
    RGB uint8 [256, 256, 3]; ``unaligned`` the photo's framing crop and ``framed`` the
    reconstruction rendered in it (StyleGAN3; None for StyleGAN2)."""
    ws: np.ndarray
    method: str
    steps: int
    losses: dict
    metrics: dict
    frame: PhotoFrame
    detection: FaceDetection
    alignment: FaceAlignment
    aligned: np.ndarray
    reconstruction: np.ndarray
    unaligned: np.ndarray | None = None
    framed: np.ndarray | None = None
    photo_size: tuple[int, int] = (0, 0)
    iterations: int = 0
    history: list = field(default_factory=list)

    def record(self, generator: str) -> dict:
        """The identity record (``server.inversion.identities``)."""
        return {"method": self.method, "steps": self.steps, "iterations": self.iterations,
                "generator": generator, "roll": self.frame.roll, "shift": list(self.frame.shift),
                "metrics": self.metrics, "losses": self.losses,
                "photo_size": list(self.photo_size)}

    def sheet(self) -> np.ndarray:
        """Preview sheet: aligned photo, reconstruction (and the photo's framing, rendered)."""
        tiles = [self.aligned, self.reconstruction]
        if self.unaligned is not None and self.framed is not None:
            tiles += [self.unaligned, self.framed]
        return np.concatenate(tiles, axis=1)


class PhotoInverter:
    """Inverts photos into ``G`` (a generator of ``server.checkpoints.stylegan``; this
    inverter owns it: its input transform is set here). ``encoder``: a ``PhotoEncoder`` for
    it or None; ``lpips``: an LPIPS module or None; ``descriptor``: a ``FaceDescriptorNet``,
    None for no identity loss, or 'auto' (dlib's, from face-recognition-models)."""

    def __init__(self, G, encoder=None, lpips=None, descriptor="auto",
                 weights: LossWeights = LossWeights(), detector: str = "hog"):
        from server.checkpoints.encoders import check_generator
        from server.models.stylegan3 import StyleGAN3Generator, set_transform

        self.G, self.encoder, self.lpips, self.weights = G, encoder, lpips, weights
        self.device = G.mapping.w_avg.device
        self.is_stylegan3 = isinstance(G, StyleGAN3Generator)
        if self.is_stylegan3:
            set_transform(G)
        if encoder is not None:
            check_generator(encoder, G)
        if descriptor == "auto":
            from server.models.face_descriptor import load_face_descriptor
            descriptor = load_face_descriptor(device=self.device)
        self.descriptor = descriptor
        self.detector = FaceDetector(detector)

    def render(self, ws: torch.Tensor, transform=None) -> torch.Tensor:
        """[B, 3, R, R] in about [-1, 1] of ws [B, num_ws, w_dim] (aligned unless a StyleGAN3
        ``transform`` [3, 3], content to image, is given)."""
        from server.models.stylegan3 import set_transform

        if transform is not None:
            set_transform(self.G, *transform)
        try:
            return self.G.synthesis(ws, noise_mode="const", force_fp32=True)
        finally:
            if transform is not None:
                set_transform(self.G)

    def invert(self, photo, method: str = "auto", steps: int | None = None,
               space: str = "auto", seed: int = 0, iterations: int | None = None,
               on_progress=None, should_stop=None) -> Inversion:
        """Invert ``photo`` (encoded bytes, PIL image or RGB array). ``on_progress(step,
        steps, values, image)`` reports every encoder pass and optimisation step (``image``
        the current reconstruction [1, 3, R, R]). Raises ``server.photo.NoFaceFound``,
        ``InversionError``, ``InversionCancelled``."""
        if method not in METHODS:
            raise InversionError(f"method: expected one of {', '.join(METHODS)}, got {method!r}",
                                 "method")
        use_encoder = method == "encoder" or (method == "auto" and self.encoder is not None)
        if use_encoder and self.encoder is None:
            raise InversionError("method 'encoder': the server has no photo encoder for its "
                                 "generator (place an e4e or ReStyle checkpoint at "
                                 "stylegan/encoder.pt in its data folder)")
        if steps is None:
            steps = 0 if method == "encoder" else (DEFAULT_REFINE_STEPS if use_encoder
                                                   else DEFAULT_STEPS)
        if not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
            raise InversionError(f"steps: expected an integer in 0..{MAX_STEPS}, got {steps!r}",
                                 "steps")
        if method == "optimisation" and steps == 0:
            raise InversionError("steps: optimisation needs at least one step", "steps")
        if not use_encoder and steps == 0:
            raise InversionError("steps: the server has no photo encoder, so at least one "
                                 "optimisation step is needed", "steps")

        rgb = decode_photo(photo) if isinstance(photo, (bytes, bytearray, memoryview)) \
            else to_rgb(photo)
        detection = self.detector(rgb)
        aligned, alignment = align_face(rgb, CROP, landmarks=detection.landmarks)
        frame = photo_frame(alignment, (rgb.shape[1], rgb.shape[0]))
        landmarks = alignment.aligned_landmarks
        losses = ReconstructionLosses(aligned, landmarks, self.weights, lpips=self.lpips,
                                      descriptor=self.descriptor, device=self.device)
        n_passes = (self.encoder.iterations if iterations is None else iterations) \
            if use_encoder and self.encoder.iterative else int(use_encoder)
        total_steps, history = n_passes + steps, []

        def report(step, values, image):
            history.append(values)
            if on_progress is not None:
                on_progress(step, total_steps, values, image)

        start = None
        if use_encoder:
            photo_tensor = losses.photo
            with torch.no_grad():
                start = self.encoder.encode(
                    photo_tensor, self.render, iterations=n_passes,
                    on_iteration=lambda i, ws, image: report(
                        i, {}, image if image is not None else self.render(ws)))[0]
        if steps:
            settings = OptimiseSettings(steps=steps, space=space, seed=seed)
            start = optimise_latent(self.G, losses, start, settings, self.render,
                                    lambda i, values, image: report(n_passes + i, values, image),
                                    should_stop)
        with torch.no_grad():
            image = self.render(start[None])
            _, final = losses(image, 0)
            metrics = {"psnr": psnr(image, losses.photo),
                       "identity_distance": final.get("identity"),
                       "landmark_error": final.get("landmark_error")}
            unaligned = framed = None
            if self.is_stylegan3:
                unaligned = crop(rgb, frame.unaligned)
                framed = to_uint8(self.render(start[None], (frame.roll, *frame.shift)))
        first = next((h for h in history if h), {})
        return Inversion(
            ws=start.cpu().numpy().astype(np.float32),
            method="+".join(m for m, used in (("encoder", use_encoder), ("optimisation", steps))
                            if used),
            steps=steps, iterations=n_passes,
            losses={"first": first, "last": final}, metrics=_rounded(metrics), frame=frame,
            detection=detection, alignment=alignment, aligned=aligned,
            reconstruction=to_uint8(image), unaligned=unaligned, framed=framed,
            photo_size=(rgb.shape[1], rgb.shape[0]),
            history=history)


def to_uint8(image: torch.Tensor, size: int = CROP) -> np.ndarray:
    """RGB uint8 [size, size, 3] of one image [1, 3, R, R] in [-1, 1] (NVIDIA's rounding)."""
    image = image.detach().float()
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=image.shape[-1] > size)
    return (image[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def psnr(image: torch.Tensor, photo: torch.Tensor) -> float:
    """PSNR in dB of [1, 3, R, R] against the photo [1, 3, 256, 256] (both in [-1, 1]), at 256
    on [0, 1] pixels."""
    image = F.interpolate(image.float(), size=photo.shape[-2:], mode="bilinear",
                          align_corners=False, antialias=image.shape[-1] > photo.shape[-1])
    mse = float(((image.clamp(-1, 1) - photo) / 2).square().mean())
    return 10 * math.log10(1 / max(mse, 1e-12))


def _rounded(values: dict) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else None)
            for k, v in values.items()}
