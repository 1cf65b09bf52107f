"""The server's ``fit`` request: a photo in, the rig's parameters out (docs/protocol.md).

One ``FitService`` per server. The fitter (face detector, landmark embedding, DECA's encoder
when configured) is built on the first request, on the CPU, apart from the render lanes, and
serves one photo at a time on a thread of its own: fitting is seconds of CPU work that must
not stall rendering. Its queue is bounded - ``max_queued`` photos in all, ``max_per_owner``
per connection, each up to 32 MiB - and a connection learns whether there is room before
its photo is read (``room_for``).
"""

from __future__ import annotations

import io
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from portrait_rig import protocol
from server import paths

MAX_PHOTO_PIXELS = 40_000_000      # larger photos are refused before decoding
MAX_QUEUED = 8                     # photos waiting or being fitted, whole server
MAX_PER_OWNER = 2                  # ... per connection
_ANSWER = threading.Lock()


class FitError(Exception):
    """A fit the server refuses; ``code`` is a protocol E_* code, ``field`` the offending
    request field or None."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field


def default_deca_model() -> Path | None:
    """``server.paths.deca_model()`` when it exists."""
    path = paths.deca_model()
    return path if path.is_file() else None


def default_embedding() -> Path | None:
    """``server.paths.landmark_embedding()`` when it exists."""
    path = paths.landmark_embedding()
    return path if path.is_file() else None


def read_photo(photo: bytes):
    """RGB uint8 [H, W, 3] of a request's photo bytes, upright (EXIF); raises ``FitError``
    (``bad_message``, ``too_large``) before decoding anything too large."""
    from PIL import Image

    from server.photo import decode_photo

    try:
        with Image.open(io.BytesIO(photo)) as probe:
            width, height = probe.size
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify
        raise FitError(protocol.E_BAD_MESSAGE, "payload: not an image Pillow can read "
                       "(send PNG or JPEG bytes)", "payload") from None
    if width * height > MAX_PHOTO_PIXELS:
        raise FitError(protocol.E_TOO_LARGE, f"payload: a {width}x{height} photo exceeds "
                       f"{MAX_PHOTO_PIXELS} pixels", "payload")
    try:
        return decode_photo(photo)
    except ValueError as exc:
        raise FitError(protocol.E_BAD_MESSAGE, str(exc), "payload") from None


@dataclass(eq=False)
class FitJob:
    """One ``fit`` request. ``answer(reply, error)`` calls ``done(job, reply, error)`` once
    (later calls do nothing): ``reply`` is the fit's fields, ``error`` a FitError or the
    unexpected exception."""
    owner: Any
    id: Any
    photo: bytes
    done: Callable
    received: float = field(default_factory=time.perf_counter)
    answered: bool = False

    def answer(self, reply: dict | None = None, error: Exception | None = None) -> bool:
        with _ANSWER:
            if self.answered:
                return False
            self.answered = True
        self.done(self, reply, error)
        return True


class FitService:
    """Fits photos to ``face_data`` (a ``FaceData``). ``deca_model`` and ``embedding``: files
    (None: the defaults above, used when present and the face model is FLAME); ``texture``:
    the texture space as the ``diffusionrig`` backend's option names it ("auto", "none" or
    a file), whose code the optimisation fits."""

    def __init__(self, face_data, deca_model=None, embedding=None, texture: str = "auto",
                 max_queued: int = MAX_QUEUED, max_per_owner: int = MAX_PER_OWNER, log=None):
        self.face_data = face_data
        self.deca_model, self.embedding, self.texture = deca_model, embedding, texture
        self.max_queued, self.max_per_owner = max_queued, max_per_owner
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._fitter = None
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[FitJob] = deque()
        self._running: FitJob | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ the queue
    def room_for(self, owner) -> str | None:
        """Why a fit from ``owner`` would be refused now (``queue_full``), or None."""
        with self._cond:
            jobs = [*self._queue, *([self._running] if self._running else [])]
            if self._stopping:
                return "the server is shutting down"
            if sum(job.owner is owner for job in jobs) >= self.max_per_owner:
                return (f"{self.max_per_owner} fits already queued on this connection; wait "
                        "for their replies before sending more")
            if len(jobs) >= self.max_queued:
                return f"{self.max_queued} fits already queued on this server; try again soon"
        return None

    def submit(self, job: FitJob) -> None:
        """Queue a fit; raises FitError (``queue_full``) when there is no room."""
        with self._cond:
            reason = self.room_for(job.owner)
            if reason is not None:
                code = protocol.E_SHUTTING_DOWN if self._stopping else protocol.E_QUEUE_FULL
                raise FitError(code, reason)
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="fit", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> list[FitJob]:
        """Take no more fits; returns the open ones (queued and running) for the caller to
        answer. The running fit cannot be interrupted; its reply, if it comes, is dropped."""
        with self._cond:
            self._stopping = True
            open_jobs = [*([self._running] if self._running else []), *self._queue]
            self._queue.clear()
            self._cond.notify()
        return open_jobs

    def busy(self) -> bool:
        """True while a fit is running."""
        return self._running is not None

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._queue.popleft()
            try:
                job.answer(self.fit(job.photo))
            except FitError as exc:
                job.answer(None, exc)
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the queue
                self._log("".join(traceback.format_exception(exc)).rstrip())
                job.answer(None, exc)
            finally:
                job.photo = b""                     # up to 32 MiB: not kept until it is freed
                with self._cond:
                    self._running = None

    def _get_fitter(self):
        if self._fitter is None:
            from server.renderer.face_model import FaceModel
            from server.renderer.texture import choose_texture
            from server.photo import FLAME_VERTICES, PhotoFitter

            flame = self.face_data.n_vertices == FLAME_VERTICES
            deca = self.deca_model or (default_deca_model() if flame else None)
            embedding = self.embedding or (default_embedding() if flame else None)
            texture = choose_texture(self.texture, self.face_data.n_triangles)   # ValueError
            self._fitter = PhotoFitter(FaceModel(self.face_data, "cpu"), deca_model=deca,
                                       embedding=embedding, texture=texture)
        return self._fitter

    def fit(self, photo: bytes) -> dict:
        """The ``fit`` reply's fields for ``photo`` (encoded image bytes). Blocking; raises
        ``FitError``."""
        from server.photo import FaceModelsMissing, NoFaceFound

        started = time.perf_counter()
        rgb = read_photo(photo)
        with self._lock:
            try:
                fit = self._get_fitter().fit(rgb)
            except NoFaceFound as exc:
                raise FitError(protocol.E_NO_FACE, str(exc)) from None
            except (FaceModelsMissing, FileNotFoundError, ValueError) as exc:
                raise FitError(protocol.E_FIT_FAILED, str(exc)) from None
        result = fit.result
        return {"params": result.params.to_dict(), "method": result.method,
                "landmark_error": round(result.landmark_error, 4),
                "albedo_gain": [round(float(g), 6) for g in result.albedo_gain],
                "aligned_size": int(fit.aligned.shape[0]),
                "face_box": [float(v) for v in fit.detection.box],
                "landmarks": [[round(float(x), 3), round(float(y), 3)]
                              for x, y in fit.detection.landmarks],
                "photo_size": [int(rgb.shape[1]), int(rgb.shape[0])],
                "ms": round((time.perf_counter() - started) * 1e3, 1)}
