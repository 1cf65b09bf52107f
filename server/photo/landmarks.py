"""Faces in photos: detection and 68-point landmarks with dlib.

Landmarks follow the iBUG 300-W layout that dlib's ``shape_predictor_68_face_landmarks`` and
FFHQ's alignment use. Index groups (left/right as seen in the image, so "left eye" is the
subject's right eye):

    0-16 jaw line        17-21 left brow     22-26 right brow     27-30 nose bridge
    31-35 nostrils       36-41 left eye      42-47 right eye      48-59 outer lips
    60-67 inner lips

Coordinates are float64 pixels, x right and y down, with pixel (i, j) centred on (i, j) as dlib
reports them. Images are RGB uint8 [H, W, 3] (see ``to_rgb``).

The model files come from the ``face-recognition-models`` package (a registry package, so no
download at run time): the 68-point predictor is the one FFHQ was aligned with, and both it and
the HOG detector run in milliseconds on a CPU. The CNN (MMOD) detector is more robust to pose
and blur but takes seconds per megapixel on a CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_LANDMARKS = 68
JAW = slice(0, 17)
BROW_LEFT, BROW_RIGHT = slice(17, 22), slice(22, 27)
NOSE_BRIDGE, NOSTRILS = slice(27, 31), slice(31, 36)
EYE_LEFT, EYE_RIGHT = slice(36, 42), slice(42, 48)
LIPS_OUTER, LIPS_INNER = slice(48, 60), slice(60, 68)

DETECTORS = ("hog", "cnn")
PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"


class NoFaceFound(ValueError):
    """The detector found no face in the image."""


class FaceModelsMissing(RuntimeError):
    """dlib or the face-recognition-models package is not installed."""


def model_file(name: str) -> Path:
    """Path of a file shipped by ``face-recognition-models``.

    The package locates its files through ``pkg_resources``, which recent setuptools no longer
    provide, so the package directory is found without importing it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelsMissing("the face-recognition-models package is not installed "
                                "(pip install face-recognition-models); it ships dlib's "
                                "landmark and detector weights")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FaceModelsMissing(f"{path} is missing from the face-recognition-models package")
    return path


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise FaceModelsMissing("dlib is not installed (pip install dlib-bin)") from exc
    return dlib


def to_rgb(image) -> np.ndarray:
    """RGB uint8 [H, W, 3], C-contiguous, from a PIL image or an array.

    Arrays may be [H, W] (grey), [H, W, 3] or [H, W, 4] (alpha dropped), uint8 or float in
    [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "mode"):           # PIL.Image
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"image: expected [H, W], [H, W, 3] or [H, W, 4], "
                         f"got shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("image: holds NaN or inf")
        return np.ascontiguousarray(np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8))
    raise ValueError(f"image: expected uint8 or float values, got {array.dtype}")


def decode_photo(data: bytes) -> np.ndarray:
    """A PNG/JPEG (or any format Pillow reads) -> RGB uint8 [H, W, 3], turned upright by
    its EXIF orientation (phones store portraits sideways and say so in EXIF)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"photo: not a readable image ({exc})") from None


@dataclass
class FaceDetection:
    """One detected face: ``box`` (left, top, right, bottom) pixels, the detector's ``score``
    (larger is more certain) and ``landmarks`` [68, 2] float64."""
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray


class FaceDetector:
    """Finds faces and their 68 landmarks.

    ``detector``: "hog" (dlib's frontal HOG + linear SVM detector: no weights, fast) or "cnn"
    (dlib's MMOD CNN). ``upsample``: how many times the image is doubled before detecting
    (each doubling finds faces half as large, at four times the cost).
    """

    def __init__(self, detector: str = "hog", upsample: int = 1):
        if detector not in DETECTORS:
            raise ValueError(f"detector: expected one of {', '.join(DETECTORS)}, "
                             f"got {detector!r}")
        if isinstance(upsample, bool) or not isinstance(upsample, int) or not 0 <= upsample <= 3:
            raise ValueError(f"upsample: expected an integer in 0..3, got {upsample!r}")
        self.detector, self.upsample = detector, upsample
        self._predictor = _load_predictor()
        self._detect = _load_detector(detector)

    def detect(self, image) -> list[FaceDetection]:
        """Every face in ``image``, most certain first."""
        rgb = to_rgb(image)
        if self.detector == "hog":
            boxes, scores, _ = self._detect.run(rgb, self.upsample, 0.0)
        else:
            found = self._detect(rgb, self.upsample)
            boxes, scores = [d.rect for d in found], [d.confidence for d in found]
        detections = [FaceDetection(box=(float(b.left()), float(b.top()), float(b.right()),
                                         float(b.bottom())),
                                    score=float(s), landmarks=self._landmarks(rgb, b))
                      for b, s in zip(boxes, scores)]
        return sorted(detections, key=lambda d: -d.score)

    def __call__(self, image) -> FaceDetection:
        """The most certain face in ``image``; raises ``NoFaceFound`` when there is none."""
        detections = self.detect(image)
        if not detections:
            height, width = np.shape(to_rgb(image))[:2]
            raise NoFaceFound(f"no face found in the {width}x{height} image by the "
                              f"{self.detector} detector (upsample {self.upsample}); a "
                              "frontal, well-lit face at least ~40 pixels across is needed")
        return detections[0]

    def _landmarks(self, rgb: np.ndarray, box) -> np.ndarray:
        shape = self._predictor(rgb, box)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _load_predictor():
    return _dlib().shape_predictor(str(model_file(PREDICTOR_FILE)))


@functools.lru_cache(maxsize=2)
def _load_detector(kind: str):
    dlib = _dlib()
    if kind == "hog":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(str(model_file(CNN_DETECTOR_FILE)))
