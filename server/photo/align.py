"""FFHQ-style face alignment: the crop DiffusionRig (and StyleGAN's FFHQ) was trained on.

The recipe is NVlabs/ffhq-dataset's ``recreate_aligned_images``, which DiffusionRig's
``scripts/align.py`` reuses for personal albums. From the 68 landmarks:

    e_l, e_r = mean of each eye's six points      m_l, m_r = outer mouth corners (48, 54)
    e = (e_l + e_r) / 2,  d_ee = e_r - e_l,  d_em = (m_l + m_r) / 2 - e
    x = d_ee - perp(d_em), rescaled to length max(2 |d_ee|, 1.8 |d_em|),  y = perp(x)
    c = e + 0.1 d_em;   the crop is the square c +- x +- y, of side 2 |x|

where perp(v) = (-v_y, v_x) turns a vector by +90 degrees in image coordinates (y down). The
square is then resampled to ``size`` pixels. As in the recipe: very large photos are first
shrunk by an integer factor; where the square leaves the photo, the photo is mirror-padded
and the padding is blurred and faded to the median colour; resampling is bilinear at
``transform_size`` followed by a Lanczos downscale (the recipe uses 4096 for every output
size; 4x the output is used here by default, which changes no pixel by more than
a few code values).

Pixel coordinates: x right, y down, pixel (i, j) centred on (i, j) (dlib's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from server.photo.landmarks import EYE_LEFT, EYE_RIGHT, N_LANDMARKS, FaceDetector, to_rgb


def _perp(v: np.ndarray) -> np.ndarray:
    return np.array([-v[1], v[0]])


def ffhq_square(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c, x, y): centre and half-axes [2] (pixels) of the FFHQ crop square, see the module
    notes. The square's corners are c - x - y (top left), c - x + y, c + x + y, c + x - y."""
    lm = _check_landmarks(landmarks)
    eye_l, eye_r = lm[EYE_LEFT].mean(0), lm[EYE_RIGHT].mean(0)
    eyes = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = (lm[48] + lm[54]) / 2 - eyes
    x = eye_to_eye - _perp(eye_to_mouth)
    norm = np.hypot(*x)
    if norm < 1e-6:
        raise ValueError("landmarks: degenerate eyes and mouth (all at one point)")
    x = x / norm * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    return eyes + 0.1 * eye_to_mouth, x, _perp(x)


@dataclass(frozen=True)
class FaceAlignment:
    """Where an aligned crop came from: the similarity between photo pixels q and crop pixels p
    (both pixel-centre coordinates), q = A p + b, with A [2, 2] and b [2] float64, for a crop
    of ``size`` pixels; ``landmarks`` [68, 2] are the photo landmarks it was computed from."""
    A: np.ndarray
    b: np.ndarray
    size: int
    landmarks: np.ndarray

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray, size: int) -> "FaceAlignment":
        c, x, y = ffhq_square(landmarks)
        # Crop pixel p spans [p, p + 1) of the crop's [0, size) edge coordinates, which map
        # linearly onto the square from corner c - x - y (photo edge coordinates = q + 0.5).
        A = np.stack([x, y], axis=1) * (2.0 / size)
        b = c - x - y + A @ np.array([0.5, 0.5])
        return cls(A=A, b=b, size=size, landmarks=np.array(landmarks, dtype=np.float64))

    @property
    def scale(self) -> float:
        """Photo pixels per crop pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.A))))

    @property
    def aligned_landmarks(self) -> np.ndarray:
        """The photo landmarks in crop pixels [68, 2]."""
        return self.to_aligned(self.landmarks)

    def to_aligned(self, points) -> np.ndarray:
        """Photo pixels [..., 2] -> crop pixels [..., 2]."""
        return (np.asarray(points, dtype=np.float64) - self.b) @ np.linalg.inv(self.A).T

    def to_photo(self, points) -> np.ndarray:
        """Crop pixels [..., 2] -> photo pixels [..., 2]."""
        return np.asarray(points, dtype=np.float64) @ self.A.T + self.b

    def corners(self) -> np.ndarray:
        """The crop's outer corners in photo edge coordinates [4, 2]: top left, bottom left,
        bottom right, top right (the order PIL's QUAD transform takes)."""
        s = float(self.size)
        edges = np.array([[0.0, 0.0], [0.0, s], [s, s], [s, 0.0]])
        return self.to_photo(edges - 0.5) + 0.5


def align_face(image, size: int = 256, landmarks: np.ndarray | None = None,
               detector: FaceDetector | None = None, transform_size: int | None = None,
               padding: bool = True) -> tuple[np.ndarray, FaceAlignment]:
    """The FFHQ-aligned crop of the most certain face in ``image``.

    ``image``: PIL image or array (``landmarks.to_rgb``). ``landmarks`` [68, 2] skips the
    detection (``detector``, HOG by default, raises ``NoFaceFound``). Returns the crop, RGB
    uint8 [size, size, 3], and its ``FaceAlignment``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise ValueError(f"size: expected an integer in 8..4096, got {size!r}")
    rgb = to_rgb(image)
    if landmarks is None:
        landmarks = (detector or FaceDetector())(rgb).landmarks
    alignment = FaceAlignment.from_landmarks(landmarks, size)
    transform_size = transform_size or 4 * size
    return _resample(rgb, alignment, transform_size, padding), alignment


def crop(image, alignment: FaceAlignment, transform_size: int | None = None,
         padding: bool = True) -> np.ndarray:
    """The crop ``alignment`` describes (any similarity, e.g. an axis-aligned square), resampled
    as ``align_face`` resamples: RGB uint8 [size, size, 3]."""
    return _resample(to_rgb(image), alignment, transform_size or 4 * alignment.size, padding)


def _resample(rgb: np.ndarray, alignment: FaceAlignment, transform_size: int,
              padding: bool) -> np.ndarray:
    size = alignment.size
    quad = alignment.corners()                       # photo edge coordinates
    qsize = alignment.scale * size                   # side of the square in photo pixels
    img = Image.fromarray(rgb)

    # Shrink large photos by an integer factor first (antialiased), so that the bilinear
    # resampling below never skips source pixels.
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        new = (int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink)))
        quad = quad * (np.array(new) / np.array(img.size))
        qsize = qsize * new[0] / img.width
        img = img.resize(new, Image.LANCZOS)

    # Crop to the square plus a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    crop = (max(lo[0] - border, 0), max(lo[1] - border, 0),
            min(hi[0] + border, img.width), min(hi[1] + border, img.height))
    if crop[2] - crop[0] < img.width or crop[3] - crop[1] < img.height:
        img = img.crop(crop)
        quad = quad - np.array(crop[:2])

    # Where the square leaves the photo: mirror-pad, blur and fade the padding.
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    pad = np.array([max(-lo[0] + border, 0), max(-lo[1] + border, 0),
                    max(hi[0] - img.width + border, 0), max(hi[1] - img.height + border, 0)])
    if padding and pad.max() > border - 4:
        pad = np.maximum(pad, max(int(np.rint(qsize * 0.3)), 1))
        img = Image.fromarray(_blurred_padding(np.asarray(img), pad, blur=qsize * 0.02))
        quad = quad + pad[:2]

    img = img.transform((transform_size, transform_size), Image.QUAD, tuple(quad.flatten()),
                        Image.BILINEAR)
    if transform_size != size:
        img = img.resize((size, size), Image.LANCZOS)
    return np.ascontiguousarray(np.asarray(img))


def _blurred_padding(rgb: np.ndarray, pad: np.ndarray, blur: float) -> np.ndarray:
    """Mirror-pad by ``pad`` (left, top, right, bottom); towards the outer edges blend in a
    Gaussian blur (sigma ``blur``) and then the median colour."""
    left, top, right, bottom = (int(p) for p in pad)
    img = np.pad(rgb.astype(np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")
    h, w, _ = img.shape
    yy, xx = np.ogrid[:h, :w]
    fx = np.minimum(np.float32(xx) / left, np.float32(w - 1 - xx) / right)
    fy = np.minimum(np.float32(yy) / top, np.float32(h - 1 - yy) / bottom)
    mask = np.maximum(1.0 - fx, 1.0 - fy)[..., None].astype(np.float32)
    img += (_gaussian_blur(img, blur) - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
    return np.uint8(np.clip(np.rint(img), 0, 255))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [H, W, C] float32 (kernel truncated at 4 sigma, edges
    mirrored with the edge pixel repeated, like scipy.ndimage's default)."""
    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return img.copy()
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[:, None]   # [C, 1, H, W]
    radius_h, radius_w = min(radius, x.shape[2]), min(radius, x.shape[3])
    x = _symmetric_pad(x, radius_w, dim=3)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1)[..., radius - radius_w: radius + radius_w + 1])
    x = _symmetric_pad(x, radius_h, dim=2)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1)[:, :, radius - radius_h: radius + radius_h + 1])
    return x[:, 0].numpy().transpose(1, 2, 0)


def _symmetric_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    head = x.narrow(dim, 0, n).flip(dim)
    tail = x.narrow(dim, x.shape[dim] - n, n).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def _check_landmarks(landmarks) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (N_LANDMARKS, 2):
        raise ValueError(f"landmarks: expected [{N_LANDMARKS}, 2] pixel coordinates, "
                         f"got shape {lm.shape}")
    if not np.isfinite(lm).all():
        raise ValueError("landmarks: hold NaN or inf")
    return lm


def encoder_input(path: str | Path, size: int) -> torch.Tensor:
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
            image, _ = align_face(image, size)
        except (ImportError, ValueError, RuntimeError) as exc:   # no dlib, no face found
            raise ValueError(f"appearance.reference_photo: {path} is {image.shape[1]}x"
                             f"{image.shape[0]}, not a {size}x{size} aligned crop, and "
                             f"aligning it failed: {exc}") from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1)[None].contiguous()
