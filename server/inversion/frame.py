"""Unaligned photos with StyleGAN3: the photo's framing as an input transform (roll, shift).

Encoders and optimisation work on the FFHQ-aligned crop, where the eyes are level and the
face centred. The photo frames the face differently. Following stylegan3-editing
(Alaluf et al. 2022, sec. 4.1.1, ``utils/alignment_utils.get_stylegan_transform``), the
*unaligned* crop is the axis-aligned square of the same centre and size as the aligned one
(what their ``crop_face`` cuts), and the aligned reconstruction is carried onto it by a
rotation r and a translation t of the generator's input:

Their crop is centred on the face, so t only picks up detector noise; a photo's own framing
puts the face off centre, so here the unaligned square is centred on the photo instead, as
far as a shift of at most ``MAX_SHIFT`` crop widths allows (further off centre, StyleGAN3's
training distribution ends and the face would leave the frame):

* r: the angle from the aligned crop's eye line (means of landmarks 36-41 and 42-47) to the
  unaligned crop's, counter-clockwise as displayed;
* t: (left eye in the unaligned crop - left eye in the aligned crop rotated by r about its
  centre) / crop size: image widths, x right, y down.

The generator then renders make_transform(r, t) (content rotated by r, then shifted by t;
``server.models.stylegan3``), whose inverse goes into ``synthesis.input.transform`` - the same
convention as theirs. Their code finds the landmarks of the rotated crop by running the
detector again; the crops here are similarities of the photo, so every landmark is mapped
exactly instead (no second detection, no detector noise). In the rig these are the head's
roll about the viewing axis and its position in the frame (``server.renderer.head_view``),
so the stylerig backend renders the photo's framing from the rig's own controls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.photo.align import FaceAlignment
from server.photo.landmarks import EYE_LEFT, EYE_RIGHT

MAX_SHIFT = 0.3


@dataclass(frozen=True)
class PhotoFrame:
    """How the photo frames the face relative to the aligned crop: ``roll`` radians
    (counter-clockwise as displayed, in (-pi, pi]), ``shift`` (tx, ty) in crop widths, and the
    ``unaligned`` crop it refers to."""
    roll: float
    shift: tuple[float, float]
    unaligned: FaceAlignment

    @property
    def degrees(self) -> float:
        return math.degrees(self.roll)


def unaligned_crop(alignment: FaceAlignment, photo_size: tuple[int, int] | None = None
                   ) -> FaceAlignment:
    """The axis-aligned square of the aligned crop's size, centred on the face, or with
    ``photo_size`` (width, height) on the photo's centre, within ``MAX_SHIFT`` crop widths of
    the face."""
    centre = alignment.to_photo(np.full(2, (alignment.size - 1) / 2))
    side = alignment.scale * alignment.size
    if photo_size is not None:
        offset = (centre - (np.asarray(photo_size, dtype=np.float64) - 1) / 2) / side
        centre = centre - np.clip(offset, -MAX_SHIFT, MAX_SHIFT) * side
    A = np.eye(2) * alignment.scale
    b = centre - A @ np.full(2, (alignment.size - 1) / 2)
    return FaceAlignment(A=A, b=b, size=alignment.size, landmarks=alignment.landmarks)


def eyes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) eye centres [2] as seen in the image (iBUG 36-41 and 42-47)."""
    return landmarks[EYE_LEFT].mean(0), landmarks[EYE_RIGHT].mean(0)


def rotate_points(points: np.ndarray, degrees: float, size: int) -> np.ndarray:
    """Pixel positions after rotating a ``size`` image by ``degrees`` counter-clockwise (as
    displayed; y down) about its centre, as PIL's ``Image.rotate`` turns its content."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    centre = (size - 1) / 2
    p = np.asarray(points, dtype=np.float64) - centre
    return np.stack([c * p[..., 0] + s * p[..., 1], -s * p[..., 0] + c * p[..., 1]], -1) + centre


def photo_frame(alignment: FaceAlignment, photo_size: tuple[int, int] | None = None
                ) -> PhotoFrame:
    """(r, t) of the module notes for the face ``alignment`` was computed from; the unaligned
    square as ``unaligned_crop`` places it."""
    unaligned = unaligned_crop(alignment, photo_size)
    left_a, right_a = eyes(alignment.aligned_landmarks)
    left_u, right_u = eyes(unaligned.aligned_landmarks)

    def displayed_angle(v):                 # counter-clockwise as displayed (y points down)
        return math.atan2(-v[1], v[0])
    degrees = math.degrees(displayed_angle(right_u - left_u) - displayed_angle(right_a - left_a))
    degrees = (degrees + 180.0) % 360.0 - 180.0
    if degrees == -180.0:
        degrees = 180.0
    rotated_left = rotate_points(left_a, degrees, alignment.size)
    shift = (left_u - rotated_left) / alignment.size
    return PhotoFrame(math.radians(degrees), (float(shift[0]), float(shift[1])), unaligned)
