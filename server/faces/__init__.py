"""Faces in photos: detection, 68-point landmarks (dlib) and FFHQ-style alignment."""

from .align import FaceAlignment, align_face, ffhq_square
from .landmarks import (N_LANDMARKS, Face, FaceDetector, FaceModelsMissing, NoFaceFound,
                        decode_photo, to_rgb)

__all__ = ["FaceAlignment", "align_face", "ffhq_square", "N_LANDMARKS", "Face", "FaceDetector",
           "FaceModelsMissing", "NoFaceFound", "decode_photo", "to_rgb"]
