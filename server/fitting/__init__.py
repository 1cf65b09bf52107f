"""Photo fitting: a portrait photo -> the rig's parameters.

``PhotoFitter.fit(photo)`` detects the face and its 68 landmarks, aligns the FFHQ crop
DiffusionRig works in (``server.faces``) and estimates, for that crop, identity, expression,
global and jaw rotation, DECA's orthographic camera, SH light and albedo:

* with DECA's encoder (``deca_encoder``) when a ``deca_model.tar`` is given and the face
  model is FLAME (DECA's codes are FLAME coefficients);
* otherwise by optimisation against the landmarks and the photo through the differentiable
  renderer (``optimise``).

Importing the package is cheap (the server imports ``service`` when it starts); the names
below load their modules on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"PhotoFit": "photo", "PhotoFitter": "photo", "FLAME_VERTICES": "photo",
            "rig_from_deca": "photo", "project_landmarks": "photo",
            "FitResult": "optimise", "FitSettings": "optimise", "fit_aligned": "optimise",
            "LandmarkEmbedding": "embedding", "load_flame_embedding": "embedding",
            "embedding_for": "embedding"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
