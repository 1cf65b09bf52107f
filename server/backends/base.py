"""What every backend implements (a batch of render requests in, frames and passes out) and
the parts backends share: typed options, device and precision setup, a file-stamped LRU cache,
and fitting a generator's square image to the requested frame."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

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
    ``timings`` holds per-stage milliseconds. ``info``: JSON-ready facts about the frame for
    the client (the frame header's ``info``), e.g. which exemplar style it shows."""
    image: np.ndarray
    passes: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


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


class BackendUnavailable(RuntimeError):
    """A backend that cannot be built (files missing or of the wrong kind, bad options):
    the message says why and what to do; no traceback is worth showing."""


class RenderCancelled(Exception):
    """Raised by ``Backend.render`` when it stopped early because every request of the batch
    was cancelled (``RenderRequest.cancelled``)."""


def stop_if_cancelled(requests: list[RenderRequest]) -> None:
    """Raise ``RenderCancelled`` when nobody wants any frame of the batch any more."""
    if all(r.cancelled() for r in requests):
        raise RenderCancelled(f"all {len(requests)} request(s) of the batch were cancelled")


# ------------------------------------------------------------------------------ options
# Options arrive as strings from the command line (``--option BACKEND.KEY=VALUE``) or as
# values from Python. Each backend declares them once (``Option``); the registry parses and
# validates them before the backend is built, so a typo fails at start, not at the first frame.

@dataclass(frozen=True)
class Option:
    """One backend option: ``parse(value)`` returns the typed value or raises ValueError
    with the reason (the caller prefixes ``backend.name``)."""
    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any] = lambda value: value


def integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must lie in {low}..{high}, got {number}")
        return number
    return parse


def choice(*values: str) -> Callable[[Any], str]:
    def parse(value) -> str:
        if value not in values:
            raise ValueError(f"expected one of {', '.join(values)}, got {value!r}")
        return value
    return parse


def real(low: float, high: float) -> Callable[[Any], float]:
    def parse(value) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must lie in [{low:g}, {high:g}], got {number:g}")
        return number
    return parse


def plain_name(value) -> str | None:
    """A plain folder name (letters, digits, '.', '_', '-'), or None."""
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(f"expected a plain name (letters, digits, '.', '_', '-'), got {value!r}")
    return value


def optional_integer(low: int, high: int) -> Callable[[Any], int | None]:
    """An integer, or None / "auto" for the backend's own default."""
    whole = integer(low, high)
    return lambda value: None if value in (None, "auto") else whole(value)


def file_or(*keywords: str) -> Callable[[Any], str | None]:
    """A keyword (e.g. "auto", "none") or a file path, kept as a string (None stays None:
    the default place)."""
    def parse(value) -> str | None:
        if value is None or value in keywords:
            return value
        if not isinstance(value, (str, Path)) or not str(value):
            words = [repr(k) for k in keywords] + ["a file path"]
            raise ValueError(f"expected {' or '.join(words)}, got {value!r}")
        return str(value)
    return parse


def colour(value) -> tuple[float, float, float]:
    """Three sRGB values in [0, 1], as a sequence or a comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        rgb = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"expected 3 sRGB values in [0, 1], got {value!r}") from None
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise ValueError(f"expected 3 sRGB values in [0, 1], got {value!r}")
    return rgb


def parse_options(backend: str, options: tuple[Option, ...], given: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """Typed values of every option of ``backend`` (defaults filled in). Raises ValueError
    naming ``backend.key`` for an unknown option or a bad value."""
    known = {option.name: option for option in options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {backend} option(s): {', '.join(unknown)} "
                         f"(known: {', '.join(known) or 'none'})")
    values = {}
    for name, option in known.items():
        value = given.get(name, option.default)
        try:
            values[name] = option.parse(value) if name in given else value
        except ValueError as exc:
            raise ValueError(f"{backend}.{name}: {exc}") from None
    return values


# ------------------------------------------------------------------------------ devices

def torch_device(device: str) -> torch.device:
    """The torch device for ``device``; refuses CUDA when torch sees none."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a torch device (cpu, cuda, cuda:1 ...)") \
            from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was requested but torch sees no CUDA device (is this "
                         "the CUDA build of torch, and is a GPU visible?); use --device cpu")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "fp16" on CUDA, "fp32" elsewhere; float16 is refused off CUDA."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in ("fp16", "native") and device.type != "cuda":
        raise ValueError(f"precision {precision!r}: float16 needs a CUDA device (use fp32)")
    return precision


# ------------------------------------------------------------------------------ caches

def file_stamp(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, modification time): a cache key that changes with the file."""
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class LRU(OrderedDict):
    """A small least-recently-used cache: ``get`` refreshes, ``put`` evicts the oldest
    beyond ``capacity``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)
        return value


# ------------------------------------------------------------------------------ frames

def cover_frame(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Square images [B, C, S, S] -> [B, C, height, width]: resized (bicubic, antialiased
    when shrinking) to the square covering the frame, side max(width, height), then
    centre-cropped - how every generator's square portrait fills a frame of any shape."""
    side, native = max(width, height), images.shape[-1]
    if side != native:
        images = F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False,
                               antialias=side < native)
    top, left = (side - height) // 2, (side - width) // 2
    return images[:, :, top: top + height, left: left + width]


def opaque_rgba(rgb: torch.Tensor) -> np.ndarray:
    """uint8 RGB [B, H, W, 3] (any device) -> host RGBA [B, H, W, 4] with alpha 255."""
    return torch.cat([rgb, torch.full_like(rgb[..., :1], 255)], dim=-1).cpu().numpy()


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

    def summary(self) -> str:
        """One log line: what was loaded (files, kind, resolution, device, precision)."""
        return f"on {self.device}"
