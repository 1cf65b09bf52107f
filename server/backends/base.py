"""What every backend implements: a batch of render requests in, frames and passes out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from portrait_rig.params import RigParams
from server.temporal import Shot


@dataclass
class RenderRequest:
    """One frame to render. ``passes`` names extra buffers (portrait_rig.protocol.PASSES).
    ``shot`` (None for a lone frame) places it in a sequence: fixed noise per shot, latent
    smoothing over neighbouring frames (``server.temporal``)."""
    params: RigParams
    width: int
    height: int
    passes: tuple[str, ...] = ()
    shot: Shot | None = None


@dataclass
class RenderResult:
    """``image`` is display-referred sRGB, uint8 [H, W, 4] (RGBA, rows top to bottom; alpha
    is the face mask or 255). ``passes`` maps pass names to float32 [H, W, C] arrays.
    ``timings`` holds per-stage milliseconds."""
    image: np.ndarray
    passes: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class Backend:
    """Base class. Subclasses set ``name`` and implement ``render``.

    A backend lives on one device and is driven by one worker thread at a time, so it may
    keep per-device caches without locks. ``render`` receives requests the scheduler grouped
    into a batch (same size not guaranteed) and returns one result per request, in order.
    """

    name = "base"
    description = ""

    def __init__(self, face_model, device: str = "cpu", **options):
        self.face_model = face_model
        self.device = device
        self.options = options

    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        raise NotImplementedError

    def warmup(self) -> None:
        """Compile kernels / fill caches before the first client request (optional)."""
