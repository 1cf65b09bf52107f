"""Backend registry: names, descriptions and lazy construction.

A backend's module is imported only when that backend is created, so a server that runs the
preview never loads generator code or its dependencies.
"""

from __future__ import annotations

import importlib

from .base import Backend, RenderRequest, RenderResult

# name -> (module under server.backends, class name, one-line description for clients)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "preview": ("preview", "PreviewBackend",
                "Real-time preview of the face model: its albedo under the rig's SH light "
                "(CPU or CUDA)"),
}

BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def describe_backends() -> list[dict[str, str]]:
    """[{name, description}] for every registered backend (imports nothing)."""
    return [{"name": name, "description": entry[2]} for name, entry in _REGISTRY.items()]


def create_backend(name: str, face_model, device: str = "cpu", **options) -> Backend:
    """Build backend ``name`` for ``face_model`` (a ``server.face_model.FaceModel``) on
    ``device``; ``options`` go to the backend's constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r} (available: {', '.join(BACKEND_NAMES)})")
    module_name, class_name, _ = _REGISTRY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(face_model, device, **options)


__all__ = ["BACKEND_NAMES", "Backend", "RenderRequest", "RenderResult", "create_backend",
           "describe_backends"]
