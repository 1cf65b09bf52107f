"""Faces in photos: detection and 68-point landmarks (dlib), FFHQ alignment, and fitting the
rig to a photo.

``PhotoFitter.fit(photo)`` detects the face and its landmarks, aligns the FFHQ crop
DiffusionRig works in (``align``) and estimates, for that crop, identity, expression, global
and jaw rotation, DECA's orthographic camera, SH light and albedo:

* with DECA's encoder (``server.models.deca_encoder``) when a ``deca_model.tar`` is given and
  the face model is FLAME (DECA's codes are FLAME coefficients);
* otherwise by optimisation against the landmarks and the photo through the differentiable
  renderer (``optimise``).

Importing the package is cheap (the server imports it when it starts); the names below load
their modules (dlib, torch) on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"FaceAlignment": "align", "align_face": "align", "ffhq_square": "align",
            "N_LANDMARKS": "landmarks", "FaceDetection": "landmarks",
            "FaceDetector": "landmarks",
            "FaceModelsMissing": "landmarks", "NoFaceFound": "landmarks",
            "decode_photo": "landmarks", "to_rgb": "landmarks",
            "PhotoFit": "fit", "PhotoFitter": "fit", "FLAME_VERTICES": "fit",
            "rig_from_deca": "fit", "project_landmarks": "fit",
            "FitResult": "optimise", "FitSettings": "optimise", "fit_aligned": "optimise",
            "LandmarkEmbedding": "embedding", "load_flame_embedding": "embedding",
            "embedding_for": "embedding"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
