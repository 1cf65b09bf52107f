"""A live preview next to a DiffusionRig batch: preview round trips with and without
DiffusionRig renders running on the same server, in one run.

Starts the real server (``python -m server``, default backend ``preview``, demo head) with a
``diffusionrig`` backend of random weights, then prints p50/p95 of an artist's live preview
renders (``--size`` px, one request at a time, as the live link sends them):

* idle: nothing else on the server;
* batch: while a second client keeps ``--batch`` DiffusionRig batch renders queued (its
  first request also loads the checkpoint), until two of its backend calls are done, with
  the DiffusionRig frames' own time.

With a render lane per backend the preview never waits for a DiffusionRig call; what is left
is the CPU or GPU the two lanes share (on a 2-core VM, most of the difference). Figures on a
shared VM vary by +-20%: compare runs on the same machine.

    python bench/bench_scheduling.py [--device cpu] [--config tiny|full] [--count 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.diffusionrig_fixtures import BACKEND_TINY, write_checkpoint  # noqa: E402
from portrait_rig.client import Client  # noqa: E402
from server.models.diffusionrig_unet import UNetConfig  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def previews(server, size: int, count: int, until=lambda: True) -> list[float]:
    """Round trips (ms) of live preview renders, each a new pose: ``count`` of them, and
    more until ``until()`` holds."""
    out = []
    with Client(server.host, server.port, timeout=600) as client:
        i = 0
        while i < count or not until():
            i += 1
            start = time.perf_counter()
            client.render({"pose": {"global": [0, 0.3 * np.sin(0.2 * i), 0],
                                    "jaw": [0.1 + 0.05 * np.sin(i), 0, 0]}},
                          size, size, format="rgba8", mode="live")
            out.append((time.perf_counter() - start) * 1e3)
    return out


class DiffusionBatch:
    """A client keeping ``depth`` DiffusionRig batch renders queued until stopped."""

    def __init__(self, server, depth: int, size: int):
        self.client = Client(server.host, server.port, timeout=600)
        self.depth, self.size = depth, size
        self.stop = threading.Event()
        self.frames: list[float] = []           # server ms of each DiffusionRig frame
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client as client:
            params = {"appearance": {"latent_file": "latent.npy"}}
            in_flight = 0
            i = 0
            while not self.stop.is_set() or in_flight:
                while in_flight < self.depth and not self.stop.is_set():
                    params["expression"] = [0.1 * (i % 10)]
                    client.send_render(params, self.size, self.size, backend="diffusionrig")
                    in_flight += 1
                    i += 1
                frame = client.receive(timeout=600)
                in_flight -= 1
                self.frames.append(frame.timings["render"])
                self.started.set()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=["full", "tiny"],
                    help="random DiffusionRig size (default: full on CUDA, tiny on the CPU)")
    ap.add_argument("--steps", type=int, default=20, help="DiffusionRig sampler steps")
    ap.add_argument("--size", type=int, default=256, help="preview frame side")
    ap.add_argument("--batch", type=int, default=8, help="DiffusionRig requests kept queued")
    ap.add_argument("--count", type=int, default=100, help="previews per figure")
    args = ap.parse_args()
    config = args.config or ("full" if args.device.startswith("cuda") else "tiny")
    unet = UNetConfig() if config == "full" else BACKEND_TINY

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        write_checkpoint(home / "diffusionrig" / "model.safetensors", unet)
        (home / "latents").mkdir()
        np.save(home / "latents" / "latent.npy",
                np.random.default_rng(0).normal(size=64).astype(np.float32))
        with ServerProcess("--backend", "preview", "--model", "demo", "--quiet",
                           "--device", args.device,
                           "--option", f"diffusionrig.resolution={unet.image_size}",
                           "--option", f"diffusionrig.steps={args.steps}",
                           env={"PORTRAIT_RIG_HOME": str(home)},
                           startup_timeout=600) as server:
            previews(server, args.size, 20)                              # warm-up
            idle = previews(server, args.size, args.count)
            with DiffusionBatch(server, args.batch, unet.image_size) as batch:
                start = time.perf_counter()
                busy = previews(server, args.size, args.count,
                                until=lambda: len(batch.frames) >= 2 * args.batch)
                busy_s = time.perf_counter() - start
                during = len(batch.frames)
            frames = batch.frames
    print(f"device {args.device}, random {config} DiffusionRig ({unet.image_size} px, "
          f"{args.steps} steps), previews {args.size}x{args.size} rgba8, {args.count} each")
    print(f"preview alone:                   p50 {percentile(idle, 50):7.1f} ms   "
          f"p95 {percentile(idle, 95):7.1f} ms")
    print(f"preview beside DiffusionRig:     p50 {percentile(busy, 50):7.1f} ms   "
          f"p95 {percentile(busy, 95):7.1f} ms   (max {max(busy):.0f} ms, "
          f"{len(busy)} previews)")
    if frames:
        print(f"DiffusionRig meanwhile: {during} frames during the {busy_s:.1f} s of previews, "
              f"a frame's backend call p50 {percentile(frames, 50):.0f} ms, "
              f"max {max(frames):.0f} ms (the first loads the checkpoint)")


if __name__ == "__main__":
    main()
