"""Round trip client -> server -> frame bytes, with the server's own timings subtracted.

Starts the real server (``python -m server``, preview backend, demo head) on an ephemeral
port and renders raw RGB frames one at a time through ``portrait_rig.client`` - the
interactive path: each request waits for its frame. Per size it prints p50/p95 of

* ``round trip``: wall time from ``send_render`` to the last frame byte received,
* ``server total``: the server's ``timings.total`` (request read -> reply ready to send),
* ``backend render``: ``timings.render`` (the backend call alone),
* ``overhead``: round trip - backend render (framing, queueing, packing, socket, client),
* ``wire``: round trip - server total (socket transfer and the client alone),

plus the ping round trip. Targets: p50 round trip <= 25 ms at 512 px, p50 overhead <= 3 ms.
Figures on a shared 2-core VM vary by +-20%: compare runs on the same machine.

``--busy`` then measures how the preview degrades when another process keeps one core busy
(as Blender does while it evaluates a scene): blocks of ``--count`` frames alternate quiet
and with a busy-looping process beside the server (``--blocks`` of each), and the ratio of
the two round-trip p50s comes from that one run. Target: at most 1.5.

    python bench/bench_roundtrip.py [--sizes 256 512] [--count 200] [--device cpu] [--model demo]
                                    [--busy --blocks 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from portrait_rig.client import Client  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def params(i: int) -> dict:
    """A slowly turning, talking head: every request differs, as when dragging a slider."""
    return {"pose": {"global": [0.0, 0.3 * ((i % 40) / 20 - 1), 0.0],
                     "jaw": [0.15 * (i % 7) / 6, 0.0, 0.0]},
            "expression": [(i % 11) / 5 - 1.0]}


def measure(client: Client, size: int, count: int, warmup: int) -> dict[str, list[float]]:
    for i in range(warmup):
        client.render(params(i), size, size, mode="live")
    out = {"round trip": [], "server total": [], "backend render": [], "overhead": [],
           "wire": []}
    for i in range(count):
        start = time.perf_counter()
        frame = client.render(params(i), size, size, format="rgb8", mode="live")
        rt = (time.perf_counter() - start) * 1e3
        assert len(frame.pixels) == size * size * 3
        out["round trip"].append(rt)
        out["server total"].append(frame.timings["total"])
        out["backend render"].append(frame.timings["render"])
        out["overhead"].append(rt - frame.timings["render"])
        out["wire"].append(rt - frame.timings["total"])
    return out


def busy_ratio(client: Client, size: int, count: int, blocks: int) -> dict[str, float]:
    """Round-trip p50 quiet and with one busy-looping process, alternating blocks."""
    quiet, busy = [], []
    for block in range(blocks):
        quiet += measure(client, size, count, warmup=5)["round trip"]
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)
            busy += measure(client, size, count, warmup=5)["round trip"]
        finally:
            spinner.kill()
            spinner.wait()
    return {"quiet": percentile(quiet, 50), "busy": percentile(busy, 50),
            "busy p95": percentile(busy, 95), "quiet p95": percentile(quiet, 95)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="preview")
    ap.add_argument("--model", default="demo", help="face model source (demo or a file)")
    ap.add_argument("--busy", action="store_true",
                    help="also measure the p50 ratio with one core kept busy")
    ap.add_argument("--blocks", type=int, default=3, help="--busy: blocks of each kind")
    args = ap.parse_args()

    with ServerProcess("--backend", args.backend, "--model", args.model,
                       "--device", args.device) as server:
        with Client(server.host, server.port, timeout=60.0) as client:
            pings = []
            for _ in range(100):            # paced below the server's rate limit
                pings.append(client.ping() * 1e3)
                time.sleep(0.005)
            print(f"server: backend {args.backend} on {args.device}, "
                  f"{client.hello['face_model']['vertices']} vertices; "
                  f"{args.count} sequential raw RGB frames per size")
            print(f"ping round trip: p50 {percentile(pings, 50):.3f} ms, "
                  f"p95 {percentile(pings, 95):.3f} ms")
            print(f"{'size':>5} {'figure':<15} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
            for size in args.sizes:
                for name, values in measure(client, size, args.count, args.warmup).items():
                    print(f"{size:>5} {name:<15} {percentile(values, 50):8.2f} "
                          f"{percentile(values, 95):8.2f} {statistics.fmean(values):8.2f}")
            if args.busy:
                print(f"one busy core beside the server, {args.blocks} alternating blocks of "
                      f"{args.count} frames each:")
                for size in args.sizes:
                    r = busy_ratio(client, size, args.count, args.blocks)
                    print(f"{size:>5} round trip p50 quiet {r['quiet']:.2f} ms, busy "
                          f"{r['busy']:.2f} ms: ratio {r['busy'] / r['quiet']:.2f} (p95 quiet "
                          f"{r['quiet p95']:.2f}, busy {r['busy p95']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
