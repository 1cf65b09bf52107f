"""Thread counts for the CPU preview's stages, chosen by measurement while it runs.

On an artist's machine Blender shares the cores with the server, and while it evaluates the
scene one core is taken. A parallel region split evenly over every core then waits, at its
closing barrier, for the thread that shares a core with Blender (or was pre-empted): a
skinning step of 1.4 ms took 46 ms that way. So:

* small work (skinning 5k vertices: a few MFLOP) runs on one torch thread (``torch_threads``);
* the numba stages (visibility, shading) each keep a running time per unit of work for one
  thread and for all cores (``StageThreads``), run with the faster and, every
  ``probe_every`` frames, once with the other, so they follow the machine as it becomes
  busy or quiet;
* the preview leaves one core to the rest of the machine (``preview_threads``): Blender, the
  client and the server's own I/O thread. On two cores the second thread bought 20 % of a
  quiet frame and cost more than that whenever Blender took a core (measured in
  docs/performance.md); on many cores one less changes nothing;
* numba's OpenMP workers sleep when idle instead of spinning (``OMP_WAIT_POLICY=PASSIVE``,
  set before its thread pool starts), so a finished region does not steal the core the next
  stage, or Blender, needs.
"""

from __future__ import annotations

import contextlib
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import torch  # noqa: E402


def _start_numba_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count: numba's OpenMP layer
    resets the process' OpenMP thread count to all cores when it starts, which would silently
    undo a ``torch.set_num_threads`` made before the first render (and busy threads that only
    wait cost ten times the CPU on a loaded machine)."""
    threads = torch.get_num_threads()
    numba.get_num_threads()
    torch.set_num_threads(threads)


_start_numba_threads()


@contextlib.contextmanager
def torch_threads(count: int):
    """Run torch's CPU ops of the calling thread on ``count`` intra-op threads."""
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StageThreads:
    """Per stage: the numba thread count that measured faster per unit of work.

    ``with threads.stage("raster", work=pixels) as n:`` sets numba's thread count (thread
    local) for the block to n and records its time. Averages are exponential (weight
    ``smoothing`` for each new frame); until both counts have been measured, and every
    ``probe_every`` frames after, the other count is tried once.
    """

    def __init__(self, max_threads: int | None = None, probe_every: int = 16,
                 smoothing: float = 0.25):
        self.max_threads = max(1, min(max_threads or numba.config.NUMBA_NUM_THREADS,
                                      numba.config.NUMBA_NUM_THREADS))
        self.probe_every, self.smoothing = probe_every, smoothing
        self.cost: dict[str, dict[int, float]] = {}  # stage -> threads -> seconds per unit
        self.frames: dict[str, int] = {}

    def choice(self, stage: str) -> int:
        """The thread count the next run of ``stage`` uses."""
        options = sorted({1, self.max_threads})
        if len(options) == 1:
            return options[0]
        costs = self.cost.setdefault(stage, {})
        frame = self.frames.get(stage, 0)
        for n in options:
            if n not in costs:
                return n
        best = min(options, key=costs.__getitem__)
        if frame % self.probe_every == self.probe_every - 1:
            return next(n for n in options if n != best)
        return best

    @contextlib.contextmanager
    def stage(self, name: str, work: float = 1.0):
        n = self.choice(name)
        before = numba.get_num_threads()
        numba.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield n
        finally:
            per_unit = (time.perf_counter() - start) / max(work, 1.0)
            numba.set_num_threads(before)
            costs = self.cost.setdefault(name, {})
            old = costs.get(n)
            costs[n] = per_unit if old is None else old + self.smoothing * (per_unit - old)
            self.frames[name] = self.frames.get(name, 0) + 1


def preview_threads() -> int:
    """numba threads the preview may use: every core but one (at least one)."""
    return max(1, numba.config.NUMBA_NUM_THREADS - 1)


PREVIEW = StageThreads(preview_threads())
"""The CPU preview's stages (one render worker per device renders them)."""
