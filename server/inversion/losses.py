"""Reconstruction losses of photo inversion and pivotal tuning, against one aligned photo.

All compare a generated image [B, 3, R, R] in [-1, 1] with the FFHQ-aligned photo at
S = min(R, 256) pixels (the generator's output average-pooled, the photo area-resized):

* ``pixel``: mean squared error.
* ``lpips``: LPIPS (``server.models.lpips``), when its weight files are present.
* ``identity``: distance between dlib face descriptors (``server.models.face_descriptor``)
  of the two faces, each cut out as dlib's 150-pixel face chip from the landmarks of the
  photo (the same chip geometry for both, so only the faces differ). Below 0.6 dlib calls
  them the same person.
* ``landmarks``: dlib's 68 landmarks are found on the generated face (the shape predictor
  inside the photo's face box) every ``landmark_every`` steps and compared with the photo's
  (``landmark_error``: mean distance in pixels of the 256 crop). The predictor is not
  differentiable, so the loss is the squared error between the image and a copy of it warped
  so that its landmarks move onto the photo's (a Gaussian radial-basis displacement field
  through the 68 point pairs, each displacement at most ``MAX_WARP`` of the crop): its
  gradient pulls the features towards the photo's landmark positions. The copy is held fixed
  between refreshes.

``weights`` scale each term in the total; a term with weight 0 is not computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from server.models.face_descriptor import CHIP_PADDING, CHIP_SIZE, chip_grid

CROP = 256
MAX_WARP = 0.08          # largest landmark displacement the warp applies, crop widths
WARP_SIGMA = 0.12        # radial-basis width, crop widths


@dataclass
class LossWeights:
    pixel: float = 1.0
    lpips: float = 1.0
    identity: float = 0.5
    landmarks: float = 0.5


class ReconstructionLosses:
    """Losses against ``photo`` (RGB uint8 [256, 256, 3], FFHQ-aligned) whose 68
    ``landmarks`` [68, 2] are in its pixels. ``lpips``: an LPIPS module or None;
    ``descriptor``: a ``FaceDescriptorNet`` or None (no identity term)."""

    def __init__(self, photo: np.ndarray, landmarks: np.ndarray, weights: LossWeights = LossWeights(),
                 lpips=None, descriptor=None, landmark_every: int = 10, device="cpu"):
        if photo.shape != (CROP, CROP, 3):
            raise ValueError(f"photo: expected the aligned {CROP}x{CROP} crop, got {photo.shape}")
        self.device = torch.device(device)
        self.weights, self.lpips, self.descriptor = weights, lpips, descriptor
        self.landmark_every = landmark_every
        self.photo = torch.from_numpy(np.array(photo)).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1
        self.landmarks = np.asarray(landmarks, dtype=np.float64)
        self.photo_rgb = np.ascontiguousarray(photo)
        self._targets: dict[int, torch.Tensor] = {}
        self._warped = None
        self.landmark_error = float("nan")
        self._predictor = self._box = None
        if descriptor is not None:
            self.chip = _chip_grid(self.landmarks).to(self.device)
            with torch.no_grad():
                self.photo_descriptor = self.describe(self.photo)

    # ------------------------------------------------------------------ pieces
    def target(self, size: int) -> torch.Tensor:
        if size not in self._targets:
            self._targets[size] = F.interpolate(self.photo, size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False) \
                if size != CROP else self.photo
        return self._targets[size]

    def describe(self, image: torch.Tensor) -> torch.Tensor:
        """dlib descriptors [B, 128] of images [B, 3, R, R] in [-1, 1] (chip of the photo)."""
        chips = F.grid_sample((image + 1) * 127.5, self.chip.expand(len(image), -1, -1, -1),
                              mode="bilinear", align_corners=False)
        return self.descriptor(chips)

    def identity_distance(self, image: torch.Tensor) -> torch.Tensor:
        return (self.describe(image) - self.photo_descriptor).norm(dim=1)

    def find_landmarks(self, image: torch.Tensor) -> np.ndarray:
        """dlib's 68 landmarks [68, 2] (crop pixels) of one generated image [1, 3, R, R]."""
        if self._predictor is None:
            self._predictor, self._box = _predictor_and_box(self.photo_rgb, self.landmarks)
        rgb = F.interpolate(image.detach().float(), size=(CROP, CROP), mode="bilinear",
                            align_corners=False, antialias=image.shape[-1] > CROP)
        rgb = ((rgb[0] + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()
        shape = self._predictor(np.ascontiguousarray(rgb), self._box)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    # ------------------------------------------------------------------ total
    def __call__(self, image: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, dict]:
        """(weighted total [], {term: float}) for images [B, 3, R, R] (terms averaged)."""
        size = min(image.shape[-1], CROP)
        small = F.adaptive_avg_pool2d(image, size) if image.shape[-1] != size else image
        target = self.target(size)
        w, terms = self.weights, {}
        total = image.new_zeros([])
        if w.pixel:
            terms["pixel"] = (small - target).square().mean()
            total = total + w.pixel * terms["pixel"]
        if w.lpips and self.lpips is not None:
            terms["lpips"] = self.lpips(small, target.expand_as(small)).mean()
            total = total + w.lpips * terms["lpips"]
        if w.identity and self.descriptor is not None:
            terms["identity"] = self.identity_distance(image).mean()
            total = total + w.identity * terms["identity"]
        if w.landmarks:
            if self._warped is None or self._warped.shape[-1] != size or \
                    step % self.landmark_every == 0:
                found = self.find_landmarks(image[:1])
                self.landmark_error = float(np.linalg.norm(found - self.landmarks, axis=1).mean())
                self._warped = warp_landmarks(small[:1].detach(), found * size / CROP,
                                              self.landmarks * size / CROP)
            terms["landmarks"] = (small - self._warped).square().mean()
            total = total + w.landmarks * terms["landmarks"]
        values = {k: v.item() for k, v in terms.items()}
        if w.landmarks:
            values["landmark_error"] = self.landmark_error
        values["total"] = total.item()
        return total, values


def warp_landmarks(image: torch.Tensor, source: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """``image`` [1, C, S, S] resampled so that what lies at ``source`` [K, 2] (pixels, x right,
    y down, pixel centres) moves to ``target`` [K, 2]: a Gaussian RBF displacement field u with
    u(target_k) = source_k - target_k (each clipped to MAX_WARP x S), sampled at x + u(x)."""
    size = image.shape[-1]
    source, target = (torch.as_tensor(a, dtype=torch.float64) for a in (source, target))
    shift = source - target
    limit = MAX_WARP * size
    shift = shift * (limit / shift.norm(dim=1, keepdim=True).clamp(min=limit))
    sigma = WARP_SIGMA * size

    def kernel(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * sigma ** 2))
    gram = kernel(target, target) + 1e-3 * torch.eye(len(target), dtype=torch.float64)
    coefficients = torch.linalg.solve(gram, shift)                         # [K, 2]
    axis = torch.arange(size, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    sample = grid + kernel(grid, target) @ coefficients                    # pixels
    sample = ((sample + 0.5) / size * 2 - 1).reshape(1, size, size, 2).to(image)
    return F.grid_sample(image, sample, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _chip_grid(landmarks: np.ndarray) -> torch.Tensor:
    import dlib

    points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in landmarks])
    box = dlib.rectangle(*(int(v) for v in _landmark_box(landmarks)))
    details = dlib.get_face_chip_details(dlib.full_object_detection(box, points), CHIP_SIZE,
                                         CHIP_PADDING)
    r = details.rect
    return chip_grid((r.left(), r.top(), r.right(), r.bottom()), details.angle, CROP)


def _landmark_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = landmarks.min(0), landmarks.max(0)
    return lo[0], lo[1], hi[0], hi[1]


def _predictor_and_box(photo: np.ndarray, landmarks: np.ndarray):
    """dlib's shape predictor and the face box to run it in: the HOG detector's box on the
    aligned photo (the kind of box the predictor was trained with), else the landmarks'."""
    import dlib

    from server.photo.landmarks import FaceDetector, _load_predictor

    detections = FaceDetector(upsample=0).detect(photo)
    box = detections[0].box if detections else _landmark_box(landmarks)
    return _load_predictor(), dlib.rectangle(*(int(round(v)) for v in box))
