"""``ClusterPool``: render groups on Ray actors spread over a cluster (see ``server.cluster``).

Threads: the scheduler's thread calls ``run(group)``, which returns once an actor has taken
the group (so jobs wait in the scheduler's queues, where live requests stay latest-wins,
until a worker is free); a collector thread waits on the actors' replies and answers the
jobs; a placer thread keeps as many actors per backend as the cluster's resources allow.
Every job is answered exactly once: by its reply, or, when its actor died, by the reply of
the actor that renders its group again (at most ``MAX_ATTEMPTS`` actors), or with an error.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from portrait_rig import protocol

from server.service.jobs import Job, RequestError

MAX_ATTEMPTS = 3             # actors a group may be given before it is answered with an error
PLACE_INTERVAL_S = 1.0       # how often the placer looks for room (new nodes, dead actors)
START_TIMEOUT_S = 300.0      # the default backend's first worker must be up within this
LATENCY_DECAY = 0.8          # weight of the past in an actor's per-frame latency estimate
CLUSTER_KEYS = ("num_gpus", "num_cpus", "workers")


def split_options(backend_options: dict) -> tuple[dict, dict]:
    """``--option`` values -> (backend constructor options, placement per backend):
    ``num_gpus`` (GPU share of one actor), ``num_cpus``, ``workers`` (at most this many)."""
    options, placement = {}, {}
    for name, values in backend_options.items():
        options[name] = {k: v for k, v in values.items() if k not in CLUSTER_KEYS}
        chosen = {k: v for k, v in values.items() if k in CLUSTER_KEYS}
        try:
            placement[name] = {k: (int(v) if k == "workers" else float(v))
                               for k, v in chosen.items()}
        except ValueError as exc:
            raise ValueError(f"--option {name}.{'/'.join(chosen)}: {exc}") from None
    return options, placement


def job_fields(job: Job) -> dict:
    """What an actor needs of a job to render it (no callbacks, no connection)."""
    return {"kind": job.kind, "params": job.params, "width": job.width, "height": job.height,
            "backend": job.backend, "format": job.format, "quality": job.quality,
            "passes": job.passes, "mode": job.mode, "shot": job.shot}


@dataclass(eq=False)
class _Actor:
    backend: str
    handle: object
    pid: int = 0
    node: str = ""
    device: str = ""
    busy: bool = False
    latency: float = 0.0          # ms per frame, decaying average
    served: float = 0.0           # time of its last dispatch (least recently used first)


@dataclass(eq=False)
class _Group:
    jobs: list
    attempts: int = 0
    started: float = field(default_factory=time.perf_counter)


class ClusterPool:
    """Render workers for ``backends`` ({name: constructor options}) on the Ray cluster at
    ``address`` ("auto" or an address ``ray.init`` takes); ``placement`` is ``split_options``'s
    second half; ``default`` also renders ``vertices`` requests."""

    def __init__(self, address: str, face_data, backends: dict, placement: dict,
                 default: str, log=None):
        self.address, self.face_data = address, face_data
        self.backends, self.default = backends, default
        self.placement = placement
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._cond = threading.Condition()
        self._actors: list[_Actor] = []
        self._starting: dict = {}                 # info ObjectRef -> _Actor
        self._in_flight: dict = {}                # run ObjectRef -> (_Actor, _Group)
        self._pending: deque[_Group] = deque()    # groups waiting for a worker
        self._shots: dict[str, _Actor] = {}       # shot id -> the actor that rendered it last
        self._failures: dict[str, str] = {}       # backend -> why its workers cannot start
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._ready: queue.SimpleQueue = queue.SimpleQueue()   # refs whose result is in

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Connect to the cluster and wait for the first worker of the default backend."""
        import ray

        from server.cluster.actor import BackendWorker

        # The workers run this server's own Portrait Rig code, shipped by Ray to every node
        # (the nodes need the dependencies: pip install 'portrait-rig[server,cluster]').
        import portrait_rig
        import server
        modules = [str(Path(package.__file__).parent) for package in (portrait_rig, server)]
        ray.init(address=self.address, namespace="portrait-rig", ignore_reinit_error=True,
                 log_to_driver=True, runtime_env={"py_modules": modules})
        self._ray = ray
        self._actor_class = ray.remote(BackendWorker)
        self._face = ray.put(self.face_data)
        for target in (self._place_loop, self._collect_loop):
            thread = threading.Thread(target=target, name=f"cluster-{target.__name__}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._live(self.default):
                if self.default in self._failures:
                    raise RuntimeError(f"the {self.default} backend cannot start on the "
                                       f"cluster: {self._failures[self.default]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {self.default} worker started on the cluster "
                                       f"within {timeout:g} s: {self._resources_text()}")
                self._cond.wait(0.5)

    def close(self, grace: float = 10.0) -> None:
        """Stop placing actors; let groups in flight finish (up to ``grace`` s), answer the
        rest ``shutting_down``; disconnect (Ray ends the actors with their driver)."""
        deadline = time.monotonic() + grace
        with self._cond:
            while self._in_flight and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self._closing = True
            left = [group for _, group in self._in_flight.values()] + list(self._pending)
            self._in_flight.clear()
            self._pending.clear()
            self._cond.notify_all()
        self._ready.put(None)                     # ends the collector
        error = RequestError(protocol.E_SHUTTING_DOWN, "the server is shutting down")
        for group in left:
            for job in group.jobs:
                job.answer(None, error)
        for thread in self._threads:
            thread.join(2.0)
        self._ray.shutdown()

    def workers(self) -> dict[str, int]:
        """Workers up per backend (the hello's ``workers``)."""
        with self._cond:
            return {name: len(self._live(name)) for name in self.backends}

    # ------------------------------------------------------------------ the executor
    def run(self, group: list[Job]) -> None:
        """Hand ``group`` (jobs of one backend and size) to a free worker; returns once one
        took it. Its jobs are answered later, from the collector thread."""
        backend = self._backend_of(group)
        with self._cond:
            if backend in self._failures and not self._live(backend):
                error = RequestError(protocol.E_RENDER_FAILED, f"backend {backend!r} cannot "
                                     f"start on the cluster: {self._failures[backend]}",
                                     "backend")
                for job in group:
                    job.answer(None, error)
                return
            entry = _Group(group)
            self._pending.append(entry)
            self._dispatch()
            while entry in self._pending and not self._closing:
                self._cond.wait()

    def _backend_of(self, group: list[Job]) -> str:
        return self.default if group[0].kind == "vertices" else group[0].backend

    def _dispatch(self) -> None:
        """Give pending groups (oldest first, re-runs before new work) to idle actors.
        Called with the lock held."""
        for entry in list(self._pending):
            actor = self._choose(entry.jobs)
            if actor is None:
                continue
            self._pending.remove(entry)
            actor.busy, actor.served = True, time.monotonic()
            entry.attempts += 1
            now = time.perf_counter()
            for job in entry.jobs:
                job.started = now
                if job.shot is not None:
                    self._shots[job.shot.id] = actor
            ref = actor.handle.run.remote([job_fields(job) for job in entry.jobs])
            self._in_flight[ref] = (actor, entry)
            self._notify_when_done(ref)
        self._cond.notify_all()

    def _choose(self, jobs: list[Job]) -> _Actor | None:
        """An idle actor for ``jobs``: live requests go to the fastest; a shot stays on the
        actor that rendered its last frame while that one is idle; otherwise the actor idle
        the longest."""
        idle = [a for a in self._live(self._backend_of(jobs)) if not a.busy]
        if not idle:
            return None
        if jobs[0].mode == "live":
            return min(idle, key=lambda a: a.latency)
        for job in jobs:
            home = self._shots.get(job.shot.id) if job.shot is not None else None
            if home in idle:
                return home
        return min(idle, key=lambda a: a.served)

    def _live(self, backend: str) -> list[_Actor]:
        return [a for a in self._actors if a.backend == backend]

    # ------------------------------------------------------------------ replies
    def _notify_when_done(self, ref) -> None:
        """Queue ``ref`` for the collector once its result (or error) is in: no polling, so
        a reply is answered as soon as it arrives whichever actor sent it."""
        ref.future().add_done_callback(lambda _future: self._ready.put(ref))

    def _collect_loop(self) -> None:
        while (ref := self._ready.get()) is not None:
            try:
                self._finish(ref)
            except Exception as exc:  # noqa: BLE001 - the collector must survive
                self._log("".join(traceback.format_exception(exc)).rstrip())

    def _finish(self, ref) -> None:
        ray = self._ray
        try:
            result, error = ray.get(ref), None
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError) as exc:
            result, error = None, exc
        except ray.exceptions.RayTaskError as exc:       # raised inside the actor: a bug
            result, error = None, exc
        with self._cond:
            if ref in self._starting:
                self._started(self._starting.pop(ref), result, error)
                return
            entry = self._in_flight.pop(ref, None)
            if entry is None:
                return                                   # answered by close()
            actor, group = entry
            if error is None:
                actor.busy = False
                frames = sum(job.kind == "render" for job in group.jobs)
                ms = (time.perf_counter() - group.jobs[0].started) * 1e3 / max(frames, 1)
                actor.latency = LATENCY_DECAY * actor.latency + (1 - LATENCY_DECAY) * ms \
                    if actor.latency else ms
                self._dispatch()
        if error is None:
            self._answer(group, result)
            return
        if isinstance(error, ray.exceptions.RayTaskError):
            self._fail(group, f"the worker failed: {error}")
            with self._cond:
                actor.busy = False
                self._dispatch()
            return
        with self._cond:
            self._lost(actor, error)
            if group.attempts >= MAX_ATTEMPTS:
                retry = False
            else:
                retry = True
                self._pending.appendleft(group)          # before new work
                self._dispatch()
        if not retry:
            self._fail(group, f"{group.attempts} workers died rendering it "
                              f"(last: {type(error).__name__})")

    def _answer(self, group: _Group, replies: list) -> None:
        for job, reply in zip(group.jobs, replies):
            if reply[0] == "error":
                job.answer(None, RequestError(reply[1], reply[2], reply[3]))
            else:
                job.answer(retime(reply[1], job))

    def _fail(self, group: _Group, message: str) -> None:
        error = RequestError(protocol.E_RENDER_FAILED, message)
        for job in group.jobs:
            job.answer(None, error)

    def _lost(self, actor: _Actor, error) -> None:
        """Forget a dead actor (lock held); the placer starts another where there is room."""
        if actor in self._actors:
            self._actors.remove(actor)
            why = error if isinstance(error, str) else type(error).__name__
            self._log(f"cluster: {actor.backend} worker pid {actor.pid} on node "
                      f"{actor.node[:8]} died ({why}); {self._summary()}")
        for shot, home in list(self._shots.items()):
            if home is actor:
                del self._shots[shot]

    # ------------------------------------------------------------------ placement
    def _place_loop(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
            try:
                self._place()
            except Exception as exc:  # noqa: BLE001 - placement retries next time
                self._log(f"cluster: placing workers failed: {type(exc).__name__}: {exc}")
            time.sleep(PLACE_INTERVAL_S)

    def _place(self) -> None:
        """Forget actors on nodes that left; start actors until each backend has as many as
        the cluster's resources hold."""
        alive = {node["NodeID"] for node in self._ray.nodes() if node["Alive"]}
        with self._cond:
            for actor in [a for a in self._actors if a.node not in alive]:
                self._lost(actor, "its node left the cluster")
        total = self._ray.cluster_resources()
        for backend, options in self.backends.items():
            spec = self._spec(backend, total)
            with self._cond:
                if backend in self._failures or self._closing:
                    continue
                have = len(self._live(backend)) + sum(a.backend == backend
                                                      for a in self._starting.values())
                want = self._capacity(spec, total)
                for _ in range(max(0, want - have)):
                    handle = self._actor_class.options(
                        num_gpus=spec["num_gpus"], num_cpus=spec["num_cpus"],
                        max_restarts=0, max_task_retries=0).remote(self._face, backend, options)
                    ref = handle.info.remote()
                    self._starting[ref] = _Actor(backend, handle)
                    self._notify_when_done(ref)

    def _spec(self, backend: str, total: dict) -> dict:
        """Resources of one actor: the backend's options, else a whole GPU when the cluster
        has GPUs (and one CPU), else one CPU."""
        chosen = self.placement.get(backend, {})
        gpus = chosen.get("num_gpus", 1.0 if total.get("GPU", 0) > 0 else 0.0)
        return {"num_gpus": gpus, "num_cpus": chosen.get("num_cpus", 1.0),
                "workers": chosen.get("workers")}

    @staticmethod
    def _capacity(spec: dict, total: dict) -> int:
        counts = []
        if spec["num_gpus"] > 0:
            counts.append(int(total.get("GPU", 0) / spec["num_gpus"] + 1e-9))
        if spec["num_cpus"] > 0:
            counts.append(int(total.get("CPU", 0) / spec["num_cpus"] + 1e-9))
        count = min(counts) if counts else 1
        return count if spec["workers"] is None else min(count, spec["workers"])

    def _started(self, actor: _Actor, info, error) -> None:
        """An actor answered (or failed) its first call (lock held)."""
        if error is not None:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else \
                type(error).__name__
            if isinstance(error, self._ray.exceptions.RayTaskError):
                self._failures[actor.backend] = message      # the backend itself fails
            self._log(f"cluster: a {actor.backend} worker did not start: {message}")
            self._cond.notify_all()
            return
        actor.pid, actor.node, actor.device = info["pid"], info["node"], info["device"]
        self._actors.append(actor)
        self._log(f"cluster: {actor.backend} worker up (pid {actor.pid}, node "
                  f"{actor.node[:8]}, {actor.device}); {self._summary()}")
        self._dispatch()

    def _summary(self) -> str:
        counts = {name: len(self._live(name)) for name in self.backends}
        return "workers " + ", ".join(f"{name} {n}" for name, n in counts.items())

    def _resources_text(self) -> str:
        total = self._ray.cluster_resources()
        return (f"the cluster has {total.get('GPU', 0):g} GPUs and {total.get('CPU', 0):g} "
                f"CPUs; workers ask for {json.dumps(self.placement) or 'the defaults'}")


def retime(message: bytes, job: Job) -> list:
    """An actor's frame message with this server's request id and times: ``queue`` (from the
    request being read to a worker taking it) and ``total``; the worker's own ``render`` and
    ``pack`` (and the backend's stages) are kept."""
    length = protocol.LENGTH.unpack_from(message)[0]
    header = json.loads(message[4:4 + length])
    timings = header.get("timings", {})
    timings["queue"] = round((job.started - job.received) * 1e3, 3)
    timings["total"] = round((time.perf_counter() - job.received) * 1e3, 3)
    header.update(id=job.id, timings=timings)
    return [protocol.encode_header(header), memoryview(message)[4 + length:]]
