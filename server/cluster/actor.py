"""The Ray actor that renders: one backend on one device (a GPU Ray assigned, or the CPU).

It runs the server's own execution of a group (``LocalWorker.execute``: one backend call per
group, a failing request isolated from the others, frames encoded as wire messages), so a
frame from the cluster is byte for byte the frame a plain server renders.
"""

from __future__ import annotations

import copy
import os
import time


class BackendWorker:
    """``backend`` (with ``options``) on this actor's device, for ``face_data``."""

    def __init__(self, face_data, backend: str, options: dict):
        import ray
        import torch

        from server.backends import create_backend
        from server.renderer.face_model import FaceModel
        from server.service.worker import LocalWorker

        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.node = ray.get_runtime_context().get_node_id()
        face_data = copy.deepcopy(face_data)     # own, writable arrays (Ray's are read-only)
        face_model = FaceModel(face_data, self.device)
        instance = create_backend(backend, face_model, self.device, **options)
        instance.warmup()
        self.worker = LocalWorker(backend, lambda: face_model, self.device,
                                  lambda name, model, device: instance)

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": self.node, "device": self.device}

    def run(self, batch: list) -> list:
        """``batch``: Job fields (``server.cluster.pool.job_fields``) of one group. Returns one
        reply per job: ``("frame", message bytes, render ms)`` or ``("error", code, message,
        field)``."""
        from server.service.jobs import Job

        replies: dict[int, tuple] = {}

        def done(job, buffers, error):
            if error is not None:
                replies[job.id] = ("error", error.code, str(error), error.field)
            else:
                replies[job.id] = ("frame", b"".join(buffers))

        now = time.perf_counter()
        jobs = [Job(**fields, id=i, done=done, received=now) for i, fields in enumerate(batch)]
        self.worker.execute(jobs)
        return [replies[i] for i in range(len(jobs))]
