"""The server under abuse, at full scale: malformed messages, clients that never read, and
a storm of connections against one well-behaved client.

Starts the real server (``python -m server``, preview backend, demo head, default limits) and
prints, in one run:

* fuzz: messages sent (malformed framing, JSON, types and fields, hostile numbers and
  nesting, random bytes), connections the server dropped, whether it still answers, its
  RSS before and after;
* never-reading clients: server RSS before and at the end of each pattern - 60 ``model``
  requests, 400k bad messages, 8 frames of 1024 px with every pass (and, with ``--large``,
  a 4096 px RGBA frame with every pass, refused when the server bounds reply sizes);
* storm: p50/p95 of a well-behaved client's live 128 px renders on the idle server, then
  while ``--storm`` connections (from four other loopback addresses, so within the server's
  per-address cap) pipeline renders and pings as fast as they may; the ratio says how much
  the storm costs that client.

Figures on a shared 2-core VM vary by +-20%: compare runs on the same machine.

    python bench/bench_abuse.py [--storm 200] [--count 100] [--large]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from portrait_rig.client import Client  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

STORM_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")  # 127/8: loopback


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def message(header: dict) -> bytes:
    return frame(json.dumps(header).encode())


def connect(server, source: str | None = None, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((server.host, server.port))
    sock.sendall(message({"type": "hello", "protocol": 1, "client": "bench_abuse"}))
    return sock


# ---------------------------------------------------------------------------- fuzz

def fuzz_messages(rng: random.Random) -> list[bytes]:
    """One of each kind of malformed message, with random variation."""
    junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    deep = b"[" * rng.randrange(40, 200_000)
    return [
        frame(junk),                                                   # not JSON
        frame(b'{"type": "render", "id": 1, '),                        # truncated
        frame(b"[1, 2, 3]"),                                           # not an object
        message({"type": rng.choice(["teleport", "", "x" * 5000])}),   # unknown type
        message({"type": "render", "id": rng.random(), "params": {}}),
        message({"type": "render", "id": 1, "params": {"shape": "x"}, "width": 8,
                 "height": 8}),
        message({"type": "render", "id": 2, "params": {}, "width": -1, "height": 1e9}),
        message({"type": "render", "id": 3, "params": {"pose": {"jaw": [1, 2]}},
                 "width": 8, "height": 8, "format": "webp", "passes": ["x"]}),
        frame(b'{"type": "ping", "id": 4, "x": NaN}'),
        frame(b'{"type": "ping", "id": 5, "x": 1e999}'),
        frame(b'{"type": "render", "id": 6, "width": 8, "height": 8, "params": '
              b'{"shape": [1' + b"0" * rng.randrange(20, 4000) + b"]}}"),
        frame(b'{"type": "ping", "x": ' + deep + deep.replace(b"[", b"]") + b"}"),
        message({"type": "ping", "id": "\n" * 200}),
        message({"type": "vertices", "id": 7, "params": {"appearance": {"latent_file":
                                                                        "/etc/passwd"}}}),
        _with_payload({"type": "ping", "id": 8}, rng.randrange(1, 1000), rng),
    ]


def _with_payload(header: dict, n: int, rng: random.Random) -> bytes:
    return message(dict(header, payload_bytes=n)) + bytes(rng.randrange(256) for _ in range(n))


def fuzz(server, count: int) -> dict:
    rng = random.Random(0)
    sent = dropped = 0
    before = rss_mib(server.proc.pid)
    sock = connect(server)
    for _ in range(count):
        batch = fuzz_messages(rng)
        try:
            sock.sendall(b"".join(batch))
            sent += len(batch)
            sock.settimeout(0.001)
            try:
                while sock.recv(1 << 20):
                    pass
            except (socket.timeout, BlockingIOError):
                pass
            sock.settimeout(10)
        except OSError:
            dropped += 1
            sock.close()
            sock = connect(server)
    sock.close()
    # The framing killers: a zero and an oversized length prefix (each closes its connection).
    for prefix in (0, 1 << 30):
        raw = connect(server)
        raw.sendall(struct.pack(">I", prefix))
        raw.close()
        sent += 1
    with Client(server.host, server.port, timeout=30) as client:
        alive = client.ping() >= 0
    return {"sent": sent, "dropped": dropped, "alive": alive and server.proc.poll() is None,
            "rss": (before, rss_mib(server.proc.pid))}


# ---------------------------------------------------------------------------- never reading

def never_read(payload: bytes, settle_s: float = 5.0) -> tuple[float, float, float]:
    """Send ``payload`` to a fresh server on a connection that never reads: the server's
    RSS before, at its peak while the pattern runs, and after the connection closed."""
    with start_server() as server:
        pid = server.proc.pid
        with Client(server.host, server.port, timeout=60) as client:
            client.render({}, 64, 64)                       # warm: the baseline serves
        time.sleep(0.5)
        before = peak = rss_mib(pid)
        sock = connect(server, rcvbuf=4096)
        sender = threading.Thread(target=_send_quietly, args=(sock, payload), daemon=True)
        sender.start()
        end = time.monotonic() + settle_s
        while time.monotonic() < end or sender.is_alive() and time.monotonic() < end + 60:
            peak = max(peak, rss_mib(pid))
            time.sleep(0.05)
        sock.close()
        time.sleep(1.0)
        return before, peak, rss_mib(pid)


def _send_quietly(sock: socket.socket, payload: bytes) -> None:
    sock.settimeout(3.0)
    view = memoryview(payload)
    try:
        while view:
            sent = sock.send(view[: 1 << 16])
            view = view[sent:]
    except OSError:
        pass                                    # the server stopped reading, or dropped us


def never_reading(large: bool) -> dict[str, tuple[float, float, float]]:
    every = ["normal", "albedo", "shading", "rendered", "mask", "depth"]
    patterns = {
        "60 model requests": b"".join(message({"type": "model", "id": i}) for i in range(60)),
        "400k bad messages": message({"type": "teleport", "id": 1}) * 400_000,
        "8 x 1024 px, every pass": b"".join(
            message({"type": "render", "id": i, "params": {}, "width": 1024, "height": 1024,
                     "format": "rgba8", "passes": every}) for i in range(8)),
    }
    if large:
        patterns["4096 px rgba8, every pass"] = message(
            {"type": "render", "id": 1, "params": {}, "width": 4096, "height": 4096,
             "format": "rgba8", "passes": every})
    return {name: never_read(payload) for name, payload in patterns.items()}


def start_server() -> ServerProcess:
    return ServerProcess("--backend", "preview", "--model", "demo", "--quiet")


# ---------------------------------------------------------------------------- storm

def latencies(server, count: int, limit_s: float = 60.0) -> list[float]:
    """Round trips of ``count`` live renders, in ms (inf for one not answered within
    ``limit_s``, after which the client stops)."""
    out = []
    with Client(server.host, server.port, timeout=limit_s) as client:
        for i in range(count):
            start = time.perf_counter()
            try:
                client.render({"pose": {"global": [0, 0.01 * (i % 30), 0]}}, 128, 128,
                              mode="live")
            except TimeoutError:
                return out + [float("inf")] * (count - len(out))
            out.append((time.perf_counter() - start) * 1e3)
    return out


class Storm:
    """``n`` connections from STORM_ADDRESSES, each keeping a pipeline of batch renders and
    pings full and reading what comes back, on one thread with a selector."""

    def __init__(self, server, n: int, depth: int = 8):
        import selectors

        self.selector = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.sent = 0
        self.request = b"".join(
            message({"type": "render", "id": i, "params": {"expression": [0.1 * i]},
                     "width": 128, "height": 128}) for i in range(depth // 2)) + \
            b"".join(message({"type": "ping", "id": 100 + i}) for i in range(depth // 2))
        for i in range(n):
            sock = connect(server, source=STORM_ADDRESSES[i % len(STORM_ADDRESSES)])
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, [0])
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for key in self.selector.get_map().values():
            self._refill(key.fileobj)
        while not self.stop.is_set():
            for key, _ in self.selector.select(0.1):
                try:
                    data = key.fileobj.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(key.fileobj)
                    continue
                key.data[0] += len(data)
                if key.data[0] > 40_000:            # roughly a pipeline's replies: refill
                    key.data[0] = 0
                    self._refill(key.fileobj)

    def _refill(self, sock) -> None:
        try:
            sock.send(self.request)
            self.sent += 1
        except OSError:
            pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storm", type=int, default=200, help="storming connections")
    ap.add_argument("--count", type=int, default=100, help="renders per latency figure")
    ap.add_argument("--fuzz", type=int, default=2000, help="rounds of malformed messages")
    ap.add_argument("--large", action="store_true",
                    help="also a 4096 px frame with every pass (about 1 GB where unbounded)")
    args = ap.parse_args()

    with start_server() as server:
        result = fuzz(server, args.fuzz)
    print(f"fuzz: {result['sent']} malformed messages sent, {result['dropped']} connections "
          f"dropped by the server, server alive after: {result['alive']}, "
          f"RSS {result['rss'][0]:.0f} -> {result['rss'][1]:.0f} MiB")
    for name, (before, peak, after) in never_reading(args.large).items():
        print(f"never reading, {name}: server RSS {before:.0f} MiB before, peak "
              f"{peak:.0f} (+{peak - before:.0f}), {after:.0f} after the client left")

    with start_server() as server:
        latencies(server, 20)                                       # warm-up
        idle = latencies(server, args.count)
        with Storm(server, args.storm) as storm:
            time.sleep(2.0)
            stormed = latencies(server, args.count)
            pipelines = storm.sent
        alive = server.proc.poll() is None
    print(f"live 128 px render, idle server:  p50 {percentile(idle, 50):7.1f} ms  "
          f"p95 {percentile(idle, 95):7.1f} ms")
    print(f"live 128 px render, {args.storm} connections storming: "
          f"p50 {percentile(stormed, 50):7.1f} ms  p95 {percentile(stormed, 95):7.1f} ms "
          f"({pipelines} storm pipelines sent, server alive: {alive})")
    print(f"storm / idle: p50 x{percentile(stormed, 50) / percentile(idle, 50):.1f}, "
          f"p95 x{percentile(stormed, 95) / percentile(idle, 95):.1f} "
          f"(mean idle {statistics.mean(idle):.1f} ms)")


if __name__ == "__main__":
    main()
