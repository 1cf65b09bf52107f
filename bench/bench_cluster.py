"""Throughput of the render server in front of a Ray cluster, and what the front end adds.

Starts a local Ray test cluster (``ray.cluster_utils.Cluster``: a head without CPUs and one
node per worker, each with one logical GPU; the preview backend renders on their CPUs) and,
in the same run, a plain server. Prints

* frames/s of a shot rendered through the cluster front end with 1, 2 and 3 workers (nodes
  are added between the runs; the front end picks them up without a restart), from
  ``--clients`` connections at once, batch requests with ``--window`` in flight each;
* the front end's added latency per frame: the median of (round trip - the worker's render
  time / batch size) over one-at-a-time requests, through the cluster and through the plain
  server; the difference is the cost of the hop to an actor (Ray task, object transfer,
  reply re-timing).

On this 2-core machine the workers share two cores with the front end, the clients and Ray's
own processes, so frames/s cannot scale with workers here: the per-frame overhead is the
figure that carries to a real cluster, where each worker has its own GPU.

    python bench/bench_cluster.py [--frames 240] [--size 128] [--clients 3] [--window 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # Ray on 127.0.0.1 only

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray.cluster_utils import Cluster  # noqa: E402

from portrait_rig.client import Client  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 << 20}


def params(i: int) -> dict:
    return {"pose": {"global": [0.0, 0.4 * ((i % 50) / 25 - 1), 0.0]}, "expression": [i % 3]}


def throughput(server, frames: int, size: int, clients: int, window: int) -> float:
    """frames/s of ``frames`` batch requests split over ``clients`` connections."""
    def run(k: int) -> None:
        with Client(server.host, server.port, timeout=300) as client:
            waiting, in_flight = list(range(k, frames, clients)), 0
            while waiting or in_flight:
                while waiting and in_flight < window:
                    i = waiting.pop()
                    client.send_render(params(i), size, size,
                                       shot={"id": f"c{k}", "frame": i})
                    in_flight += 1
                client.receive()
                in_flight -= 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return frames / (time.perf_counter() - start)


def overhead(server, size: int, count: int = 60) -> float:
    """Median ms per frame beyond the backend's own render time (one request at a time)."""
    samples = []
    with Client(server.host, server.port, timeout=60) as client:
        for i in range(count):
            start = time.perf_counter()
            frame = client.render(params(i), size, size)
            wall = (time.perf_counter() - start) * 1e3
            samples.append(wall - frame.timings["render"])
    return statistics.median(samples[5:])


def wait_for_workers(server, count: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        with Client(server.host, server.port, timeout=30) as client:
            if client.hello.get("workers", {}).get("preview") == count:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers not up")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores; preview backend at {args.size} px, {args.frames} "
          f"frames from {args.clients} clients")

    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet") as plain:
        throughput(plain, 30, args.size, 1, args.window)                    # warm up
        plain_fps = throughput(plain, args.frames, args.size, args.clients, args.window)
        plain_overhead = overhead(plain, args.size)
    print(f"plain server:      {plain_fps:7.1f} frames/s, overhead {plain_overhead:6.2f} "
          "ms/frame")

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 80 << 20})
    try:
        cluster.add_node(**NODE)
        with ServerProcess("--model", "demo", "--cluster", cluster.address,
                           "--option", "preview.num_gpus=1", "--quiet") as front:
            for workers in (1, 2, 3):
                if workers > 1:
                    cluster.add_node(**NODE)
                wait_for_workers(front, workers)
                throughput(front, 30, args.size, args.clients, args.window)    # warm up
                fps = throughput(front, args.frames, args.size, args.clients, args.window)
                line = f"cluster, {workers} worker{'s' if workers > 1 else ' '}: {fps:7.1f} frames/s"
                if workers == 1:
                    front_overhead = overhead(front, args.size)
                    line += f", overhead {front_overhead:6.2f} ms/frame"
                print(line, flush=True)
    finally:
        cluster.shutdown()
    print(f"front end + actor hop: {front_overhead - plain_overhead:+.2f} ms per frame over a "
          "plain server (the figure that carries to a real cluster: two cores cap the "
          "frames/s here)")


if __name__ == "__main__":
    main()
