"""What every backend implements: a batch of render requests in, frames and passes out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from portrait_rig.params import RigParams
from portrait_rig.protocol import MAX_FRAME_SIDE, PASSES
from server.backends.shots import Shot


@dataclass
class RenderRequest:
    """One frame to render. ``passes`` names extra buffers (portrait_rig.protocol.PASSES).
    ``shot`` (None for a lone frame) places it in a sequence: fixed noise per shot, latent
    smoothing over neighbouring frames (``server.backends.shots``).

    Progressive backends (diffusion samplers) may report intermediate images while they
    render: ``on_preview(step, steps, result)``, when set, takes a preview ``RenderResult``
    (image only) after ``step`` of ``steps`` sampler steps; it is never called for the last
    step, whose image is the final one. ``cancelled()`` turns true once nobody wants the frame
    any more (a newer live request replaced it); such a backend checks it between steps and
    raises ``RenderCancelled`` when every request of its batch is cancelled."""
    params: RigParams
    width: int
    height: int
    passes: tuple[str, ...] = ()
    shot: Shot | None = None
    on_preview: Callable[[int, int, "RenderResult"], None] | None = None
    cancelled: Callable[[], bool] = lambda: False


@dataclass
class RenderResult:
    """``image`` is display-referred sRGB, uint8 [H, W, 4] (RGBA, rows top to bottom; alpha
    is the face mask or 255). ``passes`` maps pass names to float32 [H, W, C] arrays.
    ``timings`` holds per-stage milliseconds."""
    image: np.ndarray
    passes: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def check_request(index: int, request: RenderRequest) -> None:
    """Reject a request the scheduler should never have built (backends called directly)."""
    where = f"requests[{index}]"
    if not isinstance(request.params, RigParams):
        raise ValueError(f"{where}.params: expected RigParams, got "
                         f"{type(request.params).__name__}")
    for name in ("width", "height"):
        size = getattr(request, name)
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_FRAME_SIDE:
            raise ValueError(f"{where}.{name}: expected an integer in 1..{MAX_FRAME_SIDE}, "
                             f"got {size!r}")
    for name in request.passes:
        if name not in PASSES:
            raise ValueError(f"{where}.passes: unknown pass {name!r} "
                             f"(known: {', '.join(PASSES)})")


class StageTimer:
    """Per-stage milliseconds for ``RenderResult.timings``: ``lap("skin")`` closes the stage
    that began at the previous lap. Synchronises the current CUDA stream (not the device: the
    other backends' streams run on) so each lap measures its own stage."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.times: dict[str, float] = {}
        self.start = self.last = time.perf_counter()

    def elapsed(self) -> float:
        """Milliseconds since the timer started."""
        return (time.perf_counter() - self.start) * 1e3

    def __call__(self, stage: str) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + (now - self.last) * 1e3
        self.last = now


class RenderCancelled(Exception):
    """Raised by ``Backend.render`` when it stopped early because every request of the batch
    was cancelled (``RenderRequest.cancelled``)."""


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
