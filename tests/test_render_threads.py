"""The CPU preview's thread choices (``server/renderer/threads.py``)."""

import numba

from server.renderer.threads import PREVIEW, StageThreads, preview_threads


def test_the_preview_leaves_one_core_to_the_rest_of_the_machine():
    assert preview_threads() == max(1, numba.config.NUMBA_NUM_THREADS - 1)
    assert PREVIEW.max_threads == preview_threads()


def test_a_stage_measures_both_counts_then_keeps_the_faster_and_probes_the_other():
    threads = StageThreads(max_threads=2, probe_every=4)
    threads.max_threads = 2                      # as on a machine with two or more cores
    cost = {1: 1.0, 2: 3.0}                      # one thread is faster (a busy machine)
    chosen = []
    for _ in range(8):
        n = threads.choice("raster")
        chosen.append(n)
        costs = threads.cost.setdefault("raster", {})
        costs[n] = cost[n]
        threads.frames["raster"] = threads.frames.get("raster", 0) + 1
    assert chosen[:2] == [1, 2]                  # both measured first
    assert chosen[2:] == [1, 2, 1, 1, 1, 2]      # then the faster, the other every 4th frame


def test_one_thread_is_all_a_single_core_budget_uses():
    threads = StageThreads(max_threads=1)
    with threads.stage("shade", work=10) as n:
        assert n == 1 and numba.get_num_threads() == 1
    assert threads.choice("shade") == 1 and set(threads.cost["shade"]) == {1}
