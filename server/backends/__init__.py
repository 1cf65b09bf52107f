"""Backend registry: names, descriptions and lazy construction.

A backend's module is imported only when that backend is created, so a server that runs the
preview never loads generator code or its dependencies.
"""

from __future__ import annotations

import importlib

from server import paths

from server.backends.base import Backend, RenderCancelled, RenderRequest, RenderResult

# name -> (module under server.backends, class name, one-line description for clients)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "preview": ("preview", "PreviewBackend",
                "Real-time preview of the face model: its albedo under the rig's SH light "
                "(CPU or CUDA)"),
    "diffusionrig": ("diffusionrig", "DiffusionRigBackend",
                     "DiffusionRig: photoreal portraits conditioned on the rig's DECA buffers and "
                     "a reference photo's appearance (needs its checkpoint; CUDA)"),
    "stylerig": ("stylerig", "StyleRigBackend",
                 "StyleRig: StyleGAN2/3 portraits whose pose, expression and light follow the "
                 "rig through RigNet (needs a generator checkpoint; identity only without "
                 "RigNet weights)"),
    "dualstylegan": ("dualstylegan", "DualStyleGANBackend",
                     "DualStyleGAN: the rig's face in the style of an exemplar portrait "
                     "(cartoon, caricature, anime...), steered by RigNet like stylerig (needs a "
                     "style folder: generator.pt and exemplar codes)"),
}

# Backends that refine a frame over sampler steps and stream ``preview`` messages for live
# requests that ask for them (clients learn it from the hello's ``backends[*].previews``).
_PROGRESSIVE = {"diffusionrig"}

# name -> cheap check of the files a backend needs, (**options) -> problem or None; run at
# server start so a missing model file is reported before anyone asks for that backend.
_PREFLIGHT = {"diffusionrig": paths.diffusionrig_problem,
              "stylerig": paths.stylerig_problem,
              "dualstylegan": paths.dualstylegan_problem}

BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def describe_backends() -> list[dict[str, str]]:
    """[{name, description, previews}] for every registered backend (imports nothing)."""
    return [{"name": name, "description": entry[2], "previews": name in _PROGRESSIVE}
            for name, entry in _REGISTRY.items()]


def backend_problem(name: str, **options) -> str | None:
    """Why backend ``name`` could not start with ``options`` (a model file is missing), or
    None. Imports and loads nothing; ``create_backend`` still reports every other problem."""
    check = _PREFLIGHT.get(name)
    return check(**options) if check is not None else None


def create_backend(name: str, face_model, device: str = "cpu", **options) -> Backend:
    """Build backend ``name`` for ``face_model`` (a ``server.renderer.face_model.FaceModel``) on
    ``device``; ``options`` go to the backend's constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r} (available: {', '.join(BACKEND_NAMES)})")
    module_name, class_name, _ = _REGISTRY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(face_model, device, **options)


__all__ = ["BACKEND_NAMES", "Backend", "RenderCancelled", "RenderRequest", "RenderResult",
           "backend_problem", "create_backend", "describe_backends"]
