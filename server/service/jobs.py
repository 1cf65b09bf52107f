"""Requests the render worker executes, and their validation from wire headers.

Validation happens on the event loop when a request arrives, so every error that names a
field (``pose.jaw``, ``width``, ``passes[1]``) is answered at once and the worker only ever
sees well-formed jobs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from portrait_rig import protocol
from portrait_rig.params import ParamError, RigParams

from server.service.frame_codec import DEFAULT_JPEG_QUALITY
from server.backends.shots import Shot, ShotError, parse_shot

MAX_ID_LENGTH = 128
_ANSWER = threading.Lock()           # makes ``Job.answer`` exactly-once across threads


class RequestError(Exception):
    """A request the server refuses. ``code`` is a protocol E_* code, ``field`` the offending
    header field (dotted path into ``params`` for rig parameters) or None."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


@dataclass(eq=False)
class Job:
    """One ``render`` or ``vertices`` request on its way through the scheduler.

    ``owner`` is the connection's queue key. ``answer(buffers, error)`` delivers the encoded
    reply (list of buffers) or a RequestError: the first call calls ``done(job, buffers,
    error)``, later ones do nothing, so a worker and the shutdown path may race to answer.
    A live render with ``previews`` also gets ``preview(job, buffers)`` calls with encoded
    ``preview`` messages before that, and may be cancelled while rendering by a newer live
    request (``superseded_by`` then holds the newer request's id). Any running job is
    cancelled when the server stops (``stopping``). Times are ``time.perf_counter()``
    seconds.
    """
    kind: str                        # "render" | "vertices"
    id: Any
    params: RigParams
    owner: Any = None
    done: Callable | None = None
    width: int = 0
    height: int = 0
    backend: str = ""
    format: str = "rgb8"
    quality: int = DEFAULT_JPEG_QUALITY
    passes: tuple[str, ...] = ()
    mode: str = "batch"
    shot: Shot | None = None
    previews: bool = False
    preview: Callable | None = None
    superseded_by: Any = None
    stopping: bool = False
    received: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    answered: bool = False

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one backend call."""
        if self.kind == "vertices":
            return ("vertices",)
        return ("render", self.backend, self.width, self.height)

    @property
    def lane(self) -> str:
        """The worker that runs it: its backend, or "vertices" (the face model alone)."""
        return "vertices" if self.kind == "vertices" else self.backend

    @property
    def reply_bytes(self) -> int:
        """Upper bound of the reply's payload (what the batch memory budget counts)."""
        if self.kind == "vertices":
            return 0
        return protocol.frame_reply_bytes(self.width, self.height, self.format, self.passes)

    @property
    def cost(self) -> int:
        """What fair queuing charges its client: the pixels rendered (vertices: a few)."""
        return 64 * 64 if self.kind == "vertices" else self.width * self.height

    def cancelled(self) -> bool:
        """True once nobody wants the frame: superseded, or the server is stopping."""
        return self.superseded_by is not None or self.stopping

    def answer(self, buffers=None, error: RequestError | None = None) -> bool:
        """Deliver the reply through ``done`` unless the job was answered already; returns
        whether this call answered it."""
        with _ANSWER:
            if self.answered:
                return False
            self.answered = True
        self.done(self, buffers, error)
        return True


def request_id(header: dict):
    """The client's request id: a JSON integer or a short string, required."""
    rid = header.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise RequestError(protocol.E_BAD_MESSAGE, "id: required, an integer or a string", "id")
    if isinstance(rid, str) and len(rid) > MAX_ID_LENGTH:
        raise RequestError(protocol.E_BAD_MESSAGE,
                           f"id: at most {MAX_ID_LENGTH} characters", "id")
    return rid


def parse_params(header: dict, n_shape: int, n_expression: int) -> RigParams:
    if "params" not in header:
        raise RequestError(protocol.E_BAD_PARAMS, "params: required (a RigParams object)",
                           "params")
    try:
        params = RigParams.from_dict(header["params"])
        params.validate_for_model(n_shape, n_expression)
    except ParamError as exc:
        # ``field`` is the path inside params (what a rig UI maps back to its control).
        message = str(exc) if exc.field == "params" else f"params.{exc}"
        raise RequestError(protocol.E_BAD_PARAMS, message, exc.field) from None
    return params


def _side(header: dict, name: str) -> int:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(protocol.E_BAD_MESSAGE, f"{name}: required, a positive integer",
                           name)
    if value > protocol.MAX_FRAME_SIDE:
        raise RequestError(protocol.E_TOO_LARGE,
                           f"{name}: {value} exceeds the limit {protocol.MAX_FRAME_SIDE}", name)
    return value


def _choice(header: dict, name: str, options: tuple[str, ...], default: str,
            code: str = protocol.E_BAD_MESSAGE) -> str:
    """A string field that must be one of ``options``; absent or null gives ``default``."""
    value = header.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or value not in options:
        raise RequestError(code, f"{name}: {value!r} is not one of {', '.join(options)}", name)
    return value


def parse_render(header: dict, backends: tuple[str, ...], default_backend: str,
                 n_shape: int, n_expression: int, max_frame_bytes: int | None = None) -> Job:
    """Validate a ``render`` header (see docs/protocol.md) into a Job. ``max_frame_bytes``
    bounds ``protocol.frame_reply_bytes`` of the reply (None: no bound)."""
    rid = request_id(header)
    width, height = _side(header, "width"), _side(header, "height")

    backend = _choice(header, "backend", backends, default_backend, protocol.E_UNKNOWN_BACKEND)
    fmt = _choice(header, "format", tuple(protocol.FRAME_FORMATS), "rgb8")
    quality = header.get("quality")
    quality = DEFAULT_JPEG_QUALITY if quality is None else quality
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise RequestError(protocol.E_BAD_MESSAGE, "quality: an integer in 1..100", "quality")

    passes = header.get("passes")
    passes = [] if passes is None else passes
    if not isinstance(passes, list):
        raise RequestError(protocol.E_BAD_MESSAGE, "passes: expected a list of pass names",
                           "passes")
    for i, name in enumerate(passes):
        if not isinstance(name, str) or name not in protocol.PASSES:
            raise RequestError(protocol.E_BAD_MESSAGE, f"passes[{i}]: unknown pass {name!r} "
                               f"(known: {', '.join(protocol.PASSES)})", f"passes[{i}]")
    if len(set(passes)) != len(passes):
        raise RequestError(protocol.E_BAD_MESSAGE, "passes: names repeated", "passes")
    size = protocol.frame_reply_bytes(width, height, fmt, passes)
    if max_frame_bytes is not None and size > max_frame_bytes:
        raise RequestError(protocol.E_TOO_LARGE, f"{width}x{height} {fmt} with "
                           f"{len(passes)} pass(es) makes a reply of up to {size} bytes, over "
                           f"the limit of {max_frame_bytes} (hello.limits.max_frame_bytes): "
                           "ask for fewer passes or a smaller frame",
                           "passes" if passes else "width")

    mode = _choice(header, "mode", protocol.MODES, "batch")
    previews = header.get("previews")
    previews = False if previews is None else previews
    if not isinstance(previews, bool):
        raise RequestError(protocol.E_BAD_MESSAGE, "previews: expected true or false",
                           "previews")
    if previews and mode != "live":
        raise RequestError(protocol.E_BAD_MESSAGE, 'previews: only live requests '
                           '("mode": "live") stream previews', "previews")

    params = parse_params(header, n_shape, n_expression)
    shot = None
    if header.get("shot") is not None:
        try:
            shot = parse_shot(header["shot"], n_shape, n_expression)
        except ShotError as exc:
            raise RequestError(protocol.E_BAD_MESSAGE, str(exc), exc.field) from None
        except ParamError as exc:
            raise RequestError(protocol.E_BAD_PARAMS, str(exc), exc.field) from None
    return Job("render", rid, params, width=width, height=height, backend=backend,
               format=fmt, quality=quality, passes=tuple(passes), mode=mode, shot=shot,
               previews=previews)


def parse_vertices(header: dict, n_shape: int, n_expression: int) -> Job:
    """Validate a ``vertices`` header into a Job (always queued like a batch request)."""
    rid = request_id(header)
    return Job("vertices", rid, parse_params(header, n_shape, n_expression))
