"""The render server in front of a Ray cluster: ``portrait-rig-server --cluster auto|ADDRESS``.

The asyncio front end is unchanged (protocol, limits, token, per-connection queues, latest-wins,
batching); only the execution of a group moves: instead of the device thread calling the
backend, a ``ClusterPool`` (``pool.py``) hands the group to a Ray actor (``actor.py``) holding
that backend on one GPU of any node, and answers the group's jobs when the actor replies.
Ray is imported only here, so a server started without ``--cluster`` never imports it.

The interface the pool relies on, and offers (to re-attach it to another scheduler):

* The scheduler forms groups exactly as for a local device: jobs of one key (one backend and
  size, or ``vertices``), at most ``max_batch``, live with live and batch with batch.
* ``pool.start()`` once before the first group (blocks until a worker of the default backend
  is up); ``pool.run(group)`` from one thread: returns as soon as a worker took the group
  (and blocks while every worker of that backend is busy, so jobs keep waiting in the
  scheduler, where a newer live request can still replace a queued one); ``pool.close()``
  after the last group. ``pool.workers()`` -> {backend: workers up}, for the hello.
* Each job of a group is answered exactly once with ``job.answer(buffers)`` or
  ``job.answer(None, error)`` (from
  the pool's collector thread): ``buffers`` a ready ``frame``/``vertices`` message with the
  job's own ``id`` and times, or ``error`` a ``RequestError``. ``job.started`` is set when a
  worker takes the group. A group whose actor dies is rendered again by another one.
* Jobs cross to the actors as ``pool.job_fields(job)``: ``kind``, ``params``, ``width``,
  ``height``, ``backend``, ``format``, ``quality``, ``passes``, ``mode``, ``shot``.
* Not carried: previews and cancelling a live request while it renders (the hello reports
  ``previews: false`` for every backend on a cluster).

Placement: each backend served gets actors of ``num_gpus`` GPUs (``--option NAME.num_gpus=``,
default 1 when the cluster has GPUs, 0 otherwise; fractions pack light backends several to a
GPU), ``num_cpus`` (default 1) and at most ``workers`` of them (default: as many as the
cluster's resources hold). The pool re-checks the cluster every second, so nodes that join are
used without a restart and actors that died are replaced.
"""

from __future__ import annotations

from server.cluster.pool import ClusterPool, job_fields, split_options


class ClusterLane:
    """A scheduler lane (``server/service/worker.py``'s interface) whose groups run on the
    cluster's actors of its backend. The pool starts with the first lane and closes with the
    last."""

    def __init__(self, pool: ClusterPool, lane: str, lanes: list):
        self.pool, self.lane, self._lanes = pool, lane, lanes

    def start(self) -> None:
        if not self._lanes:
            self.pool.start()
        self._lanes.append(self)

    def execute(self, group) -> None:
        self.pool.run(group)

    def close(self) -> None:
        if self in self._lanes:
            self._lanes.remove(self)
            if not self._lanes:
                self.pool.close()


def build_cluster_server(config):
    """A RenderServer whose backend lanes execute groups on the cluster ``config.cluster``
    (posing the face model alone, the "vertices" lane, stays local). Serves the default
    backend plus every backend given a cluster option."""
    from portrait_rig.face_source import load_face_data

    from server.backends import backend_options, describe_backends
    from server.paths import face_model_source
    from server.service.app import RenderServer
    from server.service.scheduler import Scheduler
    from server.service.worker import LocalWorker

    options, placement = split_options(config.backend_options)
    served = [config.backend, *(name for name in placement if name != config.backend)]
    for name in served:
        backend_options(name, options.get(name, {}))        # a typo fails at start
    face_data = load_face_data(face_model_source(config.model))
    pool = ClusterPool(config.cluster, face_data, {name: options.get(name, {}) for name in served},
                       placement, config.backend)
    started: list = []

    def worker_factory(lane: str):
        if lane == "vertices":
            return LocalWorker(lane, scheduler.face_model, "cpu", None)
        return ClusterLane(pool, lane, started)

    scheduler = Scheduler(face_data, "cpu", config.backend, None,
                          max_queued_batch=config.max_queued_batch, max_batch=config.max_batch,
                          max_batch_bytes=config.max_batch_bytes, worker_factory=worker_factory)
    scheduler.start()
    backends = [dict(entry, previews=False) for entry in describe_backends()
                if entry["name"] in served]
    server = RenderServer(config, face_data, scheduler, backends)
    server.cluster = pool
    return server


__all__ = ["ClusterPool", "build_cluster_server", "job_fields", "split_options"]
