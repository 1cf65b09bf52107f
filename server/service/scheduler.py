"""Request queues, fair queuing across clients, and one render lane per backend.

Each connection owns two queues here:

* ``live``: one slot. A newer live request replaces a queued (not yet started) one, which is
  answered ``superseded`` and never rendered - an interactive client only ever waits for its
  latest parameters. A live request that streams previews is cancelled even while it renders:
  progressive backends check between sampler steps and stop, and it is answered
  ``superseded`` (a request without previews completes, so a client editing faster than one
  render takes still gets frames).
* ``batch``: a FIFO bounded by ``max_queued_batch``. Never dropped, answered in order: a
  connection has at most one batch group in flight, whatever its backend.

Every backend has a lane of its own - a worker (``server/service/worker.py``) and a thread -
and posing the face model alone (``vertices``) has one too, so a live preview never waits
behind a DiffusionRig batch, nor behind a checkpoint being loaded. A lane takes the next job
for its backend by fair queuing over clients (the connections of one address count as one
client): the client it has rendered the fewest pixels for goes next, then that client's
connections take turns, live before batch within a connection. With that job the lane groups
compatible ones - same ``Job.key``, at the heads of the queues - up to ``max_batch`` jobs
and ``max_batch_bytes`` of replies (a job alone may be larger), into one backend call so a
GPU backend can batch; each client is charged for its own jobs. Connections whose unsent
output is over its bound are skipped until it drains: their frames would only pile up in
memory, and for live requests waiting means the newest parameters are rendered once the
client can receive them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque

from portrait_rig import protocol

from server.service.jobs import Job, RequestError
from server.service.worker import LocalWorker

VERTICES = "vertices"


class QueueFull(Exception):
    pass


class _Queues:
    """One connection's queues."""
    __slots__ = ("owner", "client", "live", "batch", "blocked", "rendering", "batch_running")

    def __init__(self, owner, client):
        self.owner, self.client = owner, client
        self.live: Job | None = None
        self.batch: deque[Job] = deque()
        self.blocked = False
        self.rendering: Job | None = None       # this connection's live job being rendered
        self.batch_running = False              # a batch group of this connection in flight

    def head(self, lane: str) -> Job | None:
        """The job this connection would have ``lane`` render next, if any."""
        if self.blocked:
            return None
        if self.live is not None and self.live.lane == lane:
            return self.live
        if self.batch and not self.batch_running and self.batch[0].lane == lane:
            return self.batch[0]
        return None


class _Lane:
    """A worker, its thread, its group in flight and its fair-queuing accounts: the pixels
    it rendered for each client (``served``), the account of the client it served last
    (``clock``), and each client's connection served last."""
    __slots__ = ("name", "worker", "thread", "running", "served", "clock", "last_owner")

    def __init__(self, name: str, worker):
        self.name, self.worker = name, worker
        self.thread: threading.Thread | None = None
        self.running: list[Job] = []
        self.served: dict = {}
        self.clock = 0.0
        self.last_owner: dict = {}


class Scheduler:
    """Queues of every connection and the lanes that render them on ``device``.

    ``backend_factory(name, face_model, device)`` builds a backend; ``face_model`` is the
    torch ``server.renderer.face_model.FaceModel`` for ``device``, created once and shared by
    every lane. ``worker_factory(lane)``, when given, replaces the in-process
    ``LocalWorker`` (see ``server/service/worker.py`` for the interface);
    ``backend_files(name)`` lists the files a backend's options name (see
    ``LocalWorker``).
    """

    def __init__(self, face_data, device: str, default_backend: str, backend_factory,
                 max_queued_batch: int = 64, max_batch: int = 8,
                 max_batch_bytes: int = 128 << 20, backend_files=None, worker_factory=None,
                 log=None):
        self.face_data = face_data
        self.device = device
        self.default_backend = default_backend
        self.max_queued_batch = max_queued_batch
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._worker_factory = worker_factory or (lambda lane: LocalWorker(
            lane, self.face_model, device, backend_factory,
            backend_files(lane) if backend_files else (), self._log))

        self._cond = threading.Condition()
        self._queues: dict[object, _Queues] = {}
        self._clients: dict[object, list] = {}     # client -> its connections, in order
        self._lanes: dict[str, _Lane] = {}
        self._started = self._stopping = False
        self._ready = threading.Event()
        self._face_lock = threading.Lock()
        self._face_model = None

    def face_model(self):
        """The device's torch face model (created on first use, by whichever lane asks)."""
        with self._face_lock:
            if self._face_model is None:
                from server.renderer.face_model import FaceModel   # torch: off the event loop

                self._face_model = FaceModel(self.face_data, self.device)
                if str(self.device).startswith("cuda"):
                    import torch

                    torch.cuda.synchronize(self.device)     # other lanes' streams read it
            return self._face_model

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float | None = None) -> None:
        """Start the lanes; returns once the default backend is built and warmed up (raises
        what prevented it)."""
        default = self._lane(self.default_backend)
        errors: list[BaseException] = []

        def warm() -> None:
            try:
                default.worker.start()
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)

        # On a thread of its own so that ``timeout`` holds whatever the backend does.
        thread = threading.Thread(target=warm, name=f"start-{self.default_backend}",
                                  daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the {self.default_backend!r} backend did not start in time")
        if errors:
            raise errors[0]
        with self._cond:
            self._started = True
            self._lane(VERTICES)
            for lane in self._lanes.values():
                self._start_thread(lane)
        self._ready.set()

    def stop(self) -> list[Job]:
        """Stop taking jobs; returns the queued ones (never started) for the caller to answer.
        Jobs being rendered are cancelled: progressive backends stop at their next step and
        answer ``shutting_down``; the others complete and are delivered."""
        with self._cond:
            self._stopping = True
            dropped = []
            for queues in self._queues.values():
                if queues.live is not None:
                    dropped.append(queues.live)
                    queues.live = None
                dropped.extend(queues.batch)
                queues.batch.clear()
            for job in self.running():
                job.stopping = True
            self._cond.notify_all()
        return dropped

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s in all for the lanes to finish; True when they did."""
        end = None if timeout is None else time.monotonic() + timeout
        for lane in list(self._lanes.values()):
            if lane.thread is not None:
                lane.thread.join(None if end is None else max(end - time.monotonic(), 0.0))
        return not any(lane.thread is not None and lane.thread.is_alive()
                       for lane in self._lanes.values())

    def running(self) -> list[Job]:
        """The jobs being rendered now, every lane."""
        return [job for lane in list(self._lanes.values()) for job in list(lane.running)]

    # ------------------------------------------------------------------ event-loop side
    def register(self, owner, client=None) -> None:
        """A new connection; ``client`` (default: the connection itself) groups the
        connections that share a fair-queuing turn (one remote address)."""
        client = owner if client is None else client
        with self._cond:
            self._queues[owner] = _Queues(owner, client)
            self._clients.setdefault(client, []).append(owner)

    def unregister(self, owner) -> list[Job]:
        """Forget a connection; its queued jobs are dropped and returned, its running ones
        cancelled (nobody is left to receive them)."""
        with self._cond:
            queues = self._queues.pop(owner, None)
            if queues is None:
                return []
            owners = self._clients[queues.client]
            owners.remove(owner)
            if not owners:
                del self._clients[queues.client]
                for lane in self._lanes.values():
                    lane.last_owner.pop(queues.client, None)
                    lane.served.pop(queues.client, None)
            for job in self.running():
                if job.owner is owner:
                    job.stopping = True
            return ([queues.live] if queues.live else []) + list(queues.batch)

    def submit(self, job: Job) -> Job | None:
        """Queue a job. Returns the live job it superseded, if any (not answered: the
        caller answers it). Raises QueueFull when the connection's batch queue is at its
        limit and RequestError (shutting_down) once stopping."""
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
            self._lane(job.lane)
            self._cond.notify_all()
            return superseded

    def set_blocked(self, owner, blocked: bool) -> None:
        """Mark a connection's output as backed up (skipped) or drained (served again)."""
        with self._cond:
            queues = self._queues.get(owner)
            if queues is not None and queues.blocked != blocked:
                queues.blocked = blocked
                if not blocked:
                    self._cond.notify_all()

    # ------------------------------------------------------------------ lanes
    def _lane(self, name: str) -> _Lane:
        """The lane of ``name``, created (and started, once the scheduler runs) on first use.
        Called with the lock held or before the threads start."""
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(name, self._worker_factory(name))
            if self._started:
                self._start_thread(lane)
        return lane

    def _start_thread(self, lane: _Lane) -> None:
        if lane.thread is None:
            lane.thread = threading.Thread(target=self._serve, args=(lane,), daemon=True,
                                           name=f"render-{lane.name}-{self.device}")
            lane.thread.start()

    def _serve(self, lane: _Lane) -> None:
        self._ready.wait()
        while (group := self._take(lane)) is not None:
            try:
                lane.worker.execute(group)
            except Exception as exc:  # noqa: BLE001 - a worker must not raise; if one does,
                self._log(f"lane {lane.name}: {type(exc).__name__}: {exc}")  # answer anyway
                error = RequestError(protocol.E_INTERNAL, f"the {lane.name} lane failed")
                for job in group:
                    job.answer(None, error)
            finally:
                self._finished(lane, group)
        lane.worker.close()

    def _take(self, lane: _Lane) -> list[Job] | None:
        """Block until this lane has work; take the next group (None once stopping)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                first = self._pick(lane)
                if first is not None:
                    lane.running = self._collect(lane, first)
                    return lane.running
                self._cond.wait()

    def _pick(self, lane: _Lane) -> _Queues | None:
        """Fair queuing: of the clients with work for this lane, the one it has rendered the
        fewest pixels for (a client that was idle starts level with the last one served, so
        it cannot claim the time it did not use); within that client, its next connection
        after the last one served."""
        best, best_served = None, None
        for client, owners in self._clients.items():
            if not any(self._queues[owner].head(lane.name) is not None for owner in owners):
                continue
            served = lane.served[client] = max(lane.served.get(client, 0.0), lane.clock)
            if best is None or served < best_served:
                best, best_served = client, served
        if best is None:
            return None
        lane.clock = best_served
        owners = self._clients[best]
        last = lane.last_owner.get(best)
        first = owners.index(last) + 1 if last in owners else 0
        for j in range(len(owners)):
            queues = self._queues[owners[(first + j) % len(owners)]]
            if queues.head(lane.name) is not None:
                lane.last_owner[best] = queues.owner
                return queues
        return None

    def _collect(self, lane: _Lane, first: _Queues) -> list[Job]:
        """The chosen head plus compatible heads of the other connections (same key, live
        with live, batch with batch), within ``max_batch`` jobs and ``max_batch_bytes``."""
        head = first.head(lane.name)
        live, key = head is first.live, head.key
        group: list[Job] = []
        nbytes = 0

        def fits(job: Job) -> bool:
            return not group or (len(group) < self.max_batch
                                 and nbytes + job.reply_bytes <= self.max_batch_bytes)

        for queues in [first, *(q for q in self._queues.values() if q is not first)]:
            if queues.blocked:
                continue
            if live:
                job = queues.live
                if job is not None and job.key == key and fits(job):
                    group.append(job)
                    nbytes += job.reply_bytes
                    queues.rendering, queues.live = job, None
            elif not queues.batch_running:
                taken = False
                while queues.batch and queues.batch[0].key == key and fits(queues.batch[0]):
                    job = queues.batch.popleft()
                    group.append(job)
                    nbytes += job.reply_bytes
                    taken = True
                queues.batch_running = taken
        now = time.perf_counter()
        for job in group:
            job.started = now
            client = self._queues[job.owner].client          # every client pays for its jobs
            lane.served[client] = lane.served.get(client, lane.clock) + job.cost
        return group

    def _finished(self, lane: _Lane, group: list[Job]) -> None:
        with self._cond:
            for job in group:
                queues = self._queues.get(job.owner)
                if queues is None:
                    continue
                if queues.rendering is job:
                    queues.rendering = None
                if job.mode != "live" or job.kind != "render":
                    queues.batch_running = False
            lane.running = []
            self._cond.notify_all()
