"""Request queues and the render worker of one device.

Each connection owns two queues here:

* ``live``: one slot. A newer live request replaces a queued (not yet started) one, which is
  answered ``superseded`` and never rendered - an interactive client only ever waits for its
  latest parameters. A live request that streams previews is cancelled even while it renders:
  progressive backends check between sampler steps and stop, and it is answered
  ``superseded`` (a request without previews completes, so a client editing faster than one
  render takes still gets frames).
* ``batch``: a FIFO bounded by ``max_queued_batch``. Never dropped, answered in order.

One worker thread per device owns the backends and the torch face model, so a backend's
per-device caches need no locks and the event loop never blocks on rendering or encoding.
The worker serves connections round-robin (within a connection, live before batch) and
groups compatible jobs - same backend and size, queued at the heads of the queues - into one
``Backend.render`` call so a GPU backend can batch. Connections whose socket cannot take more
output are skipped until it drains: their frames would only pile up in memory, and for live
requests waiting means the newest parameters are rendered once the client can receive them.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque

import numpy as np

from portrait_rig import protocol

from server.service import frame_codec
from server.service.jobs import Job, RequestError


class QueueFull(Exception):
    pass


class _Queues:
    __slots__ = ("live", "batch", "blocked", "rendering")

    def __init__(self):
        self.live: Job | None = None
        self.batch: deque[Job] = deque()
        self.blocked = False
        self.rendering: Job | None = None       # this connection's live job being rendered


class RenderWorker:
    """Queues for every connection plus the thread that renders them on ``device``.

    ``backend_factory(name, face_model, device)`` builds a backend; ``face_model`` is the
    torch ``server.renderer.face_model.FaceModel`` created on the worker thread for ``device``.
    With an ``executor`` (``server.cluster.ClusterPool``) the thread builds neither and hands
    each group to ``executor.run(group)`` instead, which answers every job exactly once;
    ``executor.start()`` runs first and ``executor.close()`` after the last group.
    """

    def __init__(self, face_data, device: str, default_backend: str, backend_factory,
                 max_queued_batch: int = 64, max_batch: int = 8, log=None, executor=None):
        self.face_data = face_data
        self.device = device
        self.default_backend = default_backend
        self._backend_factory = backend_factory
        self.max_queued_batch = max_queued_batch
        self.max_batch = max_batch
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))

        self._cond = threading.Condition()
        self._queues: dict[object, _Queues] = {}
        self._order: deque[object] = deque()       # round-robin order of owners
        self._stopping = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"render-{device}", daemon=True)
        self.face_model = None
        self.backends: dict[str, object] = {}
        self.executor = executor

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> None:
        """Start the thread; returns once the default backend is built and warmed up."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the {self.default_backend!r} backend did not start in time")
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self) -> list[Job]:
        """Stop taking jobs; returns the queued ones (never started) for the caller to answer.
        The group being rendered, if any, completes and is delivered normally."""
        with self._cond:
            self._stopping = True
            dropped = []
            for queues in self._queues.values():
                if queues.live is not None:
                    dropped.append(queues.live)
                    queues.live = None
                dropped.extend(queues.batch)
                queues.batch.clear()
            self._cond.notify_all()
        return dropped

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ event-loop side
    def register(self, owner) -> None:
        with self._cond:
            self._queues[owner] = _Queues()
            self._order.append(owner)

    def unregister(self, owner) -> list[Job]:
        """Forget a connection; its queued jobs are dropped and returned."""
        with self._cond:
            queues = self._queues.pop(owner, None)
            if queues is None:
                return []
            self._order.remove(owner)
            return ([queues.live] if queues.live else []) + list(queues.batch)

    def submit(self, job: Job) -> Job | None:
        """Queue a job. Returns the live job it superseded, if any.
        Raises QueueFull when the connection's batch queue is at its limit and RequestError
        (shutting_down) once stopping."""
        with self._cond:
            if self._stopping:
                raise RequestError(protocol.E_SHUTTING_DOWN, "the server is shutting down")
            queues = self._queues[job.owner]
            superseded = None
            if job.kind == "render" and job.mode == "live":
                superseded, queues.live = queues.live, job
                running = queues.rendering
                if running is not None and running.previews and running.superseded_by is None:
                    running.superseded_by = job.id      # the backend stops between steps
            else:
                if len(queues.batch) >= self.max_queued_batch:
                    raise QueueFull(f"{self.max_queued_batch} requests already queued on this "
                                    "connection; wait for replies before sending more")
                queues.batch.append(job)
            self._cond.notify()
            return superseded

    def set_blocked(self, owner, blocked: bool) -> None:
        """Mark a connection's output as backed up (skipped) or drained (served again)."""
        with self._cond:
            queues = self._queues.get(owner)
            if queues is not None and queues.blocked != blocked:
                queues.blocked = blocked
                if not blocked:
                    self._cond.notify()

    # ------------------------------------------------------------------ worker side
    def _run(self) -> None:
        execute = self.run if self.executor is None else self.executor.run
        try:
            if self.executor is not None:
                self.executor.start()
            else:
                from server.renderer.face_model import FaceModel   # torch: on the worker's thread
                self.face_model = FaceModel(self.face_data, self.device)
                backend = self._backend(self.default_backend)
                backend.warmup()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while (group := self._next_group()) is not None:
            execute(group)
        if self.executor is not None:
            self.executor.close()

    def run(self, group: list[Job]) -> None:
        """Render ``group`` (jobs of one key) on the calling thread and answer each job
        exactly once. ``face_model`` must be set (the worker thread sets it)."""
        self._execute(group)

    def _backend(self, name: str):
        backend = self.backends.get(name)
        if backend is None:
            backend = self._backend_factory(name, self.face_model, self.device)
            self.backends[name] = backend
        return backend

    def _next_group(self) -> list[Job] | None:
        """Block until work is available; take the next job and the compatible ones queued
        at the heads of the queues (per-connection order preserved)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                for _ in range(len(self._order)):
                    owner = self._order[0]
                    self._order.rotate(-1)
                    queues = self._queues[owner]
                    if not queues.blocked and (queues.live or queues.batch):
                        return self._collect(owner)
                self._cond.wait()

    def _collect(self, first_owner) -> list[Job]:
        queues = self._queues[first_owner]
        live = queues.live is not None
        key = (queues.live or queues.batch[0]).key
        group: list[Job] = []
        # Start with the chosen connection, then the others in round-robin order.
        for owner in [first_owner, *(o for o in self._order if o is not first_owner)]:
            q = self._queues[owner]
            if q.blocked:
                continue
            if live:
                if q.live is not None and q.live.key == key and len(group) < self.max_batch:
                    group.append(q.live)
                    q.rendering, q.live = q.live, None
            else:
                while q.batch and q.batch[0].key == key and len(group) < self.max_batch:
                    group.append(q.batch.popleft())
        now = time.perf_counter()
        for job in group:
            job.started = now
        return group

    def _execute(self, group: list[Job]) -> None:
        try:
            if group[0].kind == "vertices":
                replies = self._vertices(group)
            else:
                replies = self._render(group)
        except Exception as exc:  # noqa: BLE001 - the worker must survive anything
            self._log_exception(exc)
            error = RequestError(protocol.E_RENDER_FAILED, f"{type(exc).__name__}: {exc}")
            replies = [error] * len(group)
        with self._cond:
            # From here on no request can cancel these jobs: a job is superseded exactly
            # when it was marked while rendering, whatever the backend returned.
            for job in group:
                queues = self._queues.get(job.owner)
                if queues is not None and queues.rendering is job:
                    queues.rendering = None
        for i, job in enumerate(group):
            if job.superseded_by is not None:
                replies[i] = [protocol.encode_header({"type": "superseded", "id": job.id,
                                                      "by": job.superseded_by})]
            elif replies[i] is None:
                replies[i] = RequestError(protocol.E_RENDER_FAILED,
                                          "the backend stopped without a cancellation")
        for job, reply in zip(group, replies):
            if isinstance(reply, RequestError):
                job.done(job, None, reply)
            else:
                job.done(job, reply, None)

    def _render(self, group: list[Job]) -> list:
        from server.backends.base import BackendUnavailable, RenderCancelled, RenderRequest

        try:
            backend = self._backend(group[0].backend)
        except BackendUnavailable as exc:       # says what to do; no traceback to show
            return [RequestError(protocol.E_BACKEND_UNAVAILABLE, str(exc), "backend")] * len(group)
        except Exception as exc:  # noqa: BLE001
            self._log_exception(exc)
            error = RequestError(protocol.E_RENDER_FAILED, f"backend {group[0].backend!r} "
                                 f"could not start: {type(exc).__name__}: {exc}", "backend")
            return [error] * len(group)

        requests = [RenderRequest(j.params, j.width, j.height, j.passes, j.shot)
                    for j in group]
        for job, request in zip(group, requests):
            if job.previews:
                request.on_preview = self._previewer(job)
                request.cancelled = lambda job=job: job.superseded_by is not None
        t0 = time.perf_counter()
        try:
            results = backend.render(requests)
            if len(results) != len(requests):
                raise RuntimeError(f"backend returned {len(results)} results "
                                   f"for {len(requests)} requests")
        except RenderCancelled:
            return [None] * len(group)          # every job was superseded (see _execute)
        except Exception as exc:  # noqa: BLE001
            if len(group) > 1:      # isolate the failing request; the others still render
                return [r for job in group for r in self._render([job])]
            self._log_exception(exc)
            return [RequestError(protocol.E_RENDER_FAILED, f"{type(exc).__name__}: {exc}")]
        render_ms = (time.perf_counter() - t0) * 1e3
        return [self._encode(job, result, render_ms, len(group))
                for job, result in zip(group, results)]

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
                self._log(f"preview {step}/{steps} of request {job.id!r} dropped: {exc}")
                return
            if job.preview is not None:
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
        if result.info:
            header["info"] = result.info
        try:
            return frame_codec.encode_frame(header, result.image, result.passes, job.passes,
                                            job.format, job.quality, timings)
        except frame_codec.EncodeError as exc:
            return RequestError(protocol.E_RENDER_FAILED, str(exc))

    def _vertices(self, group: list[Job]) -> list:
        import torch

        with torch.inference_mode():
            verts, _ = self.face_model.pose_params([job.params for job in group])
        verts = verts.detach().to("cpu", torch.float32).numpy()
        return [frame_codec.encode_vertices({"type": "vertices", "id": job.id},
                                            np.ascontiguousarray(v))
                for job, v in zip(group, verts)]

    def _log_exception(self, exc: BaseException) -> None:
        self._log("".join(traceback.format_exception(exc)).rstrip())
