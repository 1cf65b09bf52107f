"""The backends: one record each (``BackendSpec``), and lazy construction.

A record says everything the server, ``--help`` and ``--check`` need without importing the
backend: its name, what it renders, whether it streams previews, its options (parsed and
validated before the backend is built) and where its files are looked for. A backend's module
is imported only when that backend is created, so a server that runs the preview never loads
generator code or its dependencies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from server import paths
from server.backends.base import (Backend, Option, RenderCancelled, RenderRequest, RenderResult,
                                  choice, colour, file_or, integer, optional_integer,
                                  parse_options, plain_name, real)


@dataclass(frozen=True)
class BackendSpec:
    """``module``/``cls``: where the class lives under ``server.backends``; ``previews``: it
    refines frames over sampler steps and streams ``preview`` messages to live requests that
    ask (clients learn it from the hello); ``files(options)``: the files it needs, as
    ``paths.FileNeed`` entries (checked at start and by ``--check``)."""
    name: str
    module: str
    cls: str
    description: str
    options: tuple[Option, ...]
    previews: bool = False
    files: Callable[[Mapping[str, Any]], list] = lambda options: []


SPECS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(
        "preview", "preview", "PreviewBackend",
        "Real-time preview of the face model: its albedo under the rig's SH light (CPU or "
        "CUDA)",
        (Option("background", (0.5, 0.5, 0.5), "sRGB colour behind the face, 'r,g,b' in [0, 1]",
                colour),
         Option("path", "auto", "'fast' (numba, CPU), 'torch' (any device) or 'auto'",
                choice("auto", "fast", "torch")))),
    BackendSpec(
        "stylerig", "stylerig", "StyleRigBackend",
        "StyleRig: StyleGAN2/3 portraits whose pose, expression and light follow the rig "
        "through RigNet (needs a generator; identity only without RigNet weights)",
        (Option("generator", None, "StyleGAN2/3 generator file (NVIDIA .pkl, rosinality .pt, "
                "our .safetensors); default: the model folder's stylegan/generator.*",
                file_or()),
         Option("rignet", "auto", "'auto' (the model folder's stylerig/rignet.safetensors when "
                "present), 'none', or a RigNet file", file_or("auto", "none")),
         Option("precision", "auto", "'auto' (fp16 on CUDA, else fp32), 'fp32', 'fp16' or "
                "'native' (the checkpoint's own mixed precision, CUDA)",
                choice("auto", "fp32", "fp16", "native")),
         Option("max_identities", 64, "identity latents kept in memory", integer(1, 100_000)),
         Option("directions", None, "folder of edit directions (InterFaceGAN / "
                "stylegan3-editing .npy); default: the model folder's stylegan/directions/",
                file_or()),
         Option("max_personal", 2, "pivotal-tuning generators kept loaded", integer(1, 64)),
         Option("framing", "ffhq", "StyleGAN2: 'ffhq' (the FFHQ-aligned portrait placed where "
                "the rig's head is, at its size and roll), 'centre' (moved to the head's FFHQ "
                "centre only) or 'rig' (the portrait fills the frame)",
                choice("ffhq", "centre", "rig"))),
        files=paths.stylerig_files),
    BackendSpec(
        "diffusionrig", "diffusionrig", "DiffusionRigBackend",
        "DiffusionRig: photoreal portraits conditioned on the rig's DECA buffers and a "
        "reference photo's appearance (needs its checkpoint; CUDA)",
        (Option("checkpoint", None, "stage-1 model file; default: the model folder's "
                "diffusionrig/model.pt", file_or()),
         Option("sampler", "ddim", "'ddim' (the official DDIM), 'dpm++' (DPM-Solver++(2M)) "
                "or 'distilled' (a few-step student from server.training.diffusionrig.distill "
                "as the checkpoint, on the grid its file carries)",
                choice("ddim", "dpm++", "distilled")),
         Option("steps", None, "sampler steps (default 20 for ddim, 10 for dpm++; a distilled "
                "student's come from its file)", optional_integer(2, 1000)),
         Option("precision", "auto", "'auto' (fp16 autocast on CUDA, else fp32), 'fp32', "
                "'fp16' or 'bf16'", choice("auto", "fp32", "fp16", "bf16")),
         Option("texture", "auto", "'auto' (the model folder's flame/FLAME_texture.npz when it "
                "fits the face model), 'none' (vertex albedo) or a FLAME_texture.npz",
                file_or("auto", "none")),
         Option("resolution", 256, "the size the model samples at", integer(8, 1024)),
         Option("framing", "ffhq", "'ffhq' (the network sees the head FFHQ-aligned, as it was "
                "trained, and the portrait is placed back), 'centre' (only the FFHQ centre "
                "placed, as the official inference) or 'rig' (the rig's own framing)",
                choice("ffhq", "centre", "rig")),
         Option("personal_dir", None, "folder of personal models; default: the model "
                "folder's personal/", file_or()),
         Option("max_models", 2, "checkpoints kept loaded, stage 1 included", integer(1, 64))),
        previews=True, files=paths.diffusionrig_files),
    BackendSpec(
        "dualstylegan", "dualstylegan", "DualStyleGANBackend",
        "DualStyleGAN: the rig's face in the style of an exemplar portrait (cartoon, "
        "caricature, anime...), steered by RigNet like stylerig (needs a style folder: "
        "generator.pt and exemplar codes)",
        (Option("folder", None, "folder of style families (the official checkpoint/ layout); "
                "default: the model folder's dualstylegan/", file_or()),
         Option("family", None, "the default style family (default: cartoon when present, "
                "else the first)", plain_name),
         Option("rignet", "auto", "'auto' (the model folder's stylerig/rignet.safetensors when "
                "present, trained for the FFHQ StyleGAN2), 'none', or a RigNet file",
                file_or("auto", "none")),
         Option("encoder", "auto", "'auto' (the folder's encoder.pt when present), 'none', or "
                "the Z+ pSp encoder file (photo identities, your own style images)",
                file_or("auto", "none")),
         Option("photo_truncation", 0.75, "truncation of photo content towards 0, as the "
                "official style_transfer.py", real(0.0, 2.0)),
         Option("max_identities", 64, "identity latents kept in memory", integer(1, 100_000)),
         Option("max_families", 2, "style families kept loaded", integer(1, 64))),
        files=paths.dualstylegan_files),
)}

BACKEND_NAMES: tuple[str, ...] = tuple(SPECS)


def spec(name: str) -> BackendSpec:
    if name not in SPECS:
        raise ValueError(f"unknown backend {name!r} (available: {', '.join(BACKEND_NAMES)})")
    return SPECS[name]


def backend_options(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The typed options of backend ``name`` (``--option`` strings or values); raises
    ValueError for an unknown backend, an unknown option or a bad value."""
    record = spec(name)
    return parse_options(name, record.options, given or {})


def describe_backends() -> list[dict[str, Any]]:
    """[{name, description, previews}] for every backend (imports nothing)."""
    return [{"name": s.name, "description": s.description, "previews": s.previews}
            for s in SPECS.values()]


def create_backend(name: str, face_model, device: str = "cpu", **options) -> Backend:
    """Build backend ``name`` for ``face_model`` (a ``server.renderer.face_model.FaceModel``)
    on ``device``; ``options`` are validated (``backend_options``) and go to its constructor."""
    values = backend_options(name, options)
    record = spec(name)
    module = importlib.import_module(f"{__name__}.{record.module}")
    return getattr(module, record.cls)(face_model, device, **values)


__all__ = ["BACKEND_NAMES", "SPECS", "Backend", "BackendSpec", "RenderCancelled",
           "RenderRequest", "RenderResult", "backend_options", "create_backend",
           "describe_backends", "spec"]
