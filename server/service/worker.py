"""Render workers: what runs a group of jobs for one backend.

The scheduler (``server/service/scheduler.py``) gives each lane - a backend, or "vertices"
for posing the face model alone - a worker and a thread of its own, and hands the worker
one group of compatible jobs at a time. The interface is small so that workers running
elsewhere (a cluster's actors) plug into the same queues::

    class RenderWorker:
        lane: str                         # the backend it renders, or "vertices"
        def start(self) -> None:          # build and warm up now; raise what prevented it
        def execute(self, group) -> None: # answer every job of the group exactly once
        def close(self) -> None:

``execute`` answers each job with ``job.answer(buffers)`` (the encoded reply) or
``job.answer(None, RequestError)``, as soon as that job's reply is ready, so a batch never
holds more than one encoded frame at a time; it never raises. A job whose ``cancelled()``
turns true may be answered without a frame: ``superseded`` when a newer live request
replaced it, ``shutting_down`` when the server stops. Jobs arrive validated
(``server/service/jobs.py``); a group shares ``Job.key`` and is at most ``max_batch`` jobs
whose replies fit ``max_batch_bytes``.

``LocalWorker`` runs a backend in this process. It builds the backend on first use, on its
own thread (so loading a large checkpoint never stalls another lane), on its own CUDA
stream (so a lane never waits for another lane's kernels). A backend that failed to build
is not built again for every request: its error is kept and sent to each request until
a file of the data folder or of the backend's options changes.
"""

from __future__ import annotations

import sys
import time
import traceback

import numpy as np

from portrait_rig import protocol

from server import paths
from server.backends.base import BackendUnavailable
from server.service import frame_codec
from server.service.jobs import Job, RequestError


SHUTTING_DOWN = "the server is shutting down"


def _superseded(job: Job) -> list:
    return [protocol.encode_header({"type": "superseded", "id": job.id,
                                    "by": job.superseded_by})]


def answer_cancelled(job: Job) -> None:
    """Answer a cancelled job: ``superseded`` or ``shutting_down``."""
    if job.superseded_by is not None:
        job.answer(_superseded(job))
    else:
        job.answer(None, RequestError(protocol.E_SHUTTING_DOWN, SHUTTING_DOWN))


def failure(exc: BaseException, prefix: str = "") -> RequestError:
    """``render_failed`` for an exception, its message redacted for the client; the field
    it names when it names one (``appearance.latent_file``)."""
    field = getattr(exc, "field", None)
    return RequestError(protocol.E_RENDER_FAILED,
                        paths.redact(f"{prefix}{type(exc).__name__}: {exc}"),
                        field if isinstance(field, str) else None)


class LocalWorker:
    """Runs ``lane`` (a backend name, or "vertices") in this process.

    ``face_model()`` returns the device's shared torch ``FaceModel``;
    ``backend_factory(name, face_model, device)`` builds a backend; ``files`` are paths
    whose changes, with the data folder's, make a failed backend worth building again.
    """

    def __init__(self, lane: str, face_model, device: str, backend_factory, files=(),
                 log=None):
        self.lane = lane
        self.device = device
        self._face_model = face_model
        self._factory = backend_factory
        self._files = tuple(files)
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._backend = None
        self._failed: tuple[RequestError, tuple] | None = None
        self._stream = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Build the backend and warm it up now (the server's default backend)."""
        with self._on_stream():
            if self.lane == "vertices":
                self._face_model()
                return
            backend = self._factory(self.lane, self._face_model(), self.device)
            backend.warmup()
            self._backend = backend

    def close(self) -> None:
        self._backend = None

    def _on_stream(self):
        """A CUDA stream of this worker's own (a no-op context on the CPU)."""
        import contextlib

        import torch

        if not str(self.device).startswith("cuda"):
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(torch.device(self.device))
        return torch.cuda.stream(self._stream)

    # ------------------------------------------------------------------ execution
    def execute(self, group: list[Job]) -> None:
        try:
            if all(job.cancelled() for job in group):
                for job in group:
                    answer_cancelled(job)
                return
            with self._on_stream():
                if self.lane == "vertices":
                    self._vertices(group)
                else:
                    self._render(group)
        except Exception as exc:  # noqa: BLE001 - every job is answered whatever happens
            self._log_exception(exc)
            error = failure(exc)
            for job in group:
                job.answer(None, error)
        finally:
            for job in group:           # nothing reaches here unanswered
                if job.cancelled():
                    answer_cancelled(job)
                job.answer(None, RequestError(protocol.E_RENDER_FAILED,
                                              "the backend stopped without a result"))

    def backend(self):
        """The backend, built on first use. Raises the RequestError of a build that failed
        (kept until a file changes: see the module notes)."""
        if self._backend is not None:
            return self._backend
        if self._failed is not None:
            error, stamp = self._failed
            if paths.stamp(self._files) == stamp:
                raise error
            self._log(f"backend {self.lane}: its files changed, starting it again")
        stamp = paths.stamp(self._files)
        try:
            self._backend = self._factory(self.lane, self._face_model(), self.device)
        except BackendUnavailable as exc:   # files or options: the message says what to do
            self._log(str(exc))
            error = RequestError(protocol.E_BACKEND_UNAVAILABLE, paths.redact(
                f"{exc} (the server tries again once its files change)"), "backend")
            self._failed = (error, stamp)
            raise error from None
        except Exception as exc:  # noqa: BLE001 - reported to every request for this backend
            detail = f"{type(exc).__name__}: {exc}"
            self._log(f"backend {self.lane} could not start: {detail}")
            if not isinstance(exc, (OSError, ValueError)):     # unexpected: show where
                self._log_exception(exc)
            error = RequestError(protocol.E_RENDER_FAILED, paths.redact(
                f"backend {self.lane!r} is not available: {detail} (the server tries again "
                "once its files change)"), "backend")
            self._failed = (error, stamp)
            raise error from None
        self._failed = None
        return self._backend

    def _render(self, group: list[Job]) -> None:
        from server.backends.base import RenderCancelled, RenderRequest

        try:
            backend = self.backend()
        except RequestError as error:
            for job in group:
                job.answer(None, error)
            return
        requests = [RenderRequest(j.params, j.width, j.height, j.passes, j.shot,
                                  cancelled=j.cancelled) for j in group]
        for job, request in zip(group, requests):
            if job.previews:
                request.on_preview = self._previewer(job)
        t0 = time.perf_counter()
        try:
            results = backend.render(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"backend returned {len(results)} results "
                                   f"for {len(requests)} requests")
        except RenderCancelled:
            results = [None] * len(group)       # every job was cancelled
        except Exception as exc:  # noqa: BLE001
            if len(group) > 1:      # isolate the failing request; the others still render
                for job in group:
                    self._render([job])
                return
            self._log_exception(exc)
            group[0].answer(None, failure(exc))
            return
        render_ms = (time.perf_counter() - t0) * 1e3
        del requests
        # One frame at a time: encode, answer, drop the backend's arrays, then the next.
        for i, job in enumerate(group):
            result, results[i] = results[i], None
            if job.cancelled():
                answer_cancelled(job)
            elif result is not None:
                reply = self._encode(job, result, render_ms, len(group))
                del result
                if isinstance(reply, RequestError):
                    job.answer(None, reply)
                else:
                    job.answer(reply)

    def _previewer(self, job: Job):
        """``RenderRequest.on_preview`` for ``job``: encodes a ``preview`` message (the frame's
        layout without passes) and hands it to the connection."""
        def on_preview(step: int, steps: int, result) -> None:
            header = {"type": "preview", "id": job.id, "width": job.width,
                      "height": job.height, "format": job.format, "backend": job.backend,
                      "mode": job.mode, "step": step, "steps": steps}
            timings = {name: round(float(ms), 3) for name, ms in result.timings.items()}
            try:
                buffers = frame_codec.encode_frame(header, result.image, {}, (), job.format,
                                                   job.quality, lambda: timings)
            except frame_codec.EncodeError as exc:
                self._log(f"preview {step}/{steps} of request {protocol.excerpt(job.id)} "
                          f"dropped: {exc}")
                return
            if job.preview is not None and not job.answered:
                job.preview(job, buffers)
        return on_preview

    def _encode(self, job: Job, result, render_ms: float, batch_size: int):
        encode_start = time.perf_counter()

        def timings() -> dict:
            # The backend's own stages, then the server's (reserved names, they win).
            now = time.perf_counter()
            out = {name: round(float(ms), 3) for name, ms in result.timings.items()}
            out.update(queue=round((job.started - job.received) * 1e3, 3),
                       render=round(render_ms, 3),
                       pack=round((now - encode_start) * 1e3, 3),
                       total=round((now - job.received) * 1e3, 3))
            return out

        header = {"type": "frame", "id": job.id, "width": job.width, "height": job.height,
                  "format": job.format, "backend": job.backend, "mode": job.mode,
                  "batch_size": batch_size}
        if result.info:                     # facts the backend reports, e.g. the exemplar
            header["info"] = result.info
        try:
            return frame_codec.encode_frame(header, result.image, result.passes, job.passes,
                                            job.format, job.quality, timings)
        except frame_codec.EncodeError as exc:
            return RequestError(protocol.E_RENDER_FAILED, str(exc))

    def _vertices(self, group: list[Job]) -> None:
        import torch

        with torch.inference_mode():
            verts, _ = self._face_model().pose_params([job.params for job in group])
        verts = verts.detach().to("cpu", torch.float32).numpy()
        for job, v in zip(group, verts):
            job.answer(frame_codec.encode_vertices({"type": "vertices", "id": job.id},
                                                   np.ascontiguousarray(v)))

    def _log_exception(self, exc: BaseException) -> None:
        self._log("".join(traceback.format_exception(exc)).rstrip())
