"""The diffusionrig backend end to end: frame time and time to first preview through the real
server (``python -m server --backend diffusionrig``) and ``portrait_rig.client``.

For each sampler it prints medians over ``--runs`` frames whose parameters all differ (as when
dragging a slider; nothing is cached but the appearance latent):

* ``frame``: a blocking batch render, send -> last frame byte (buffers, sampling, encoding,
  transport),
* ``first preview``: a live render with previews, send -> first ``preview`` message (one UNet
  evaluation after the buffers),
* the server's own split of a frame (``buffers``, ``sample``, ``image``) from its timings.

    python bench/bench_diffusionrig_backend.py [--device cuda] [--weights model.pt]
        [--config full|tiny] [--runs 5] [--size 256]

Without ``--weights`` the model has random weights (the cost is the same). ``--config tiny``
(the default on the CPU) is the 32 px test configuration, for tracking regressions only;
``full`` is DiffusionRig's 256 px model. Targets (H100, full size, fp16 autocast): DDIM-20
frame <= 1.0 s, DPM-Solver++ frame <= 0.4 s, first preview <= 0.15 s - they need a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.diffusionrig_fixtures import BACKEND_TINY, write_checkpoint  # noqa: E402
from portrait_rig.client import Client, Preview  # noqa: E402
from server.models.diffusionrig_unet import UNetConfig  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402

TARGETS = {"ddim": 1.0, "dpm++": 0.4, "preview": 0.15}
SAMPLERS = (("ddim", 20), ("dpm++", 10))


def params(i: int, latent: Path) -> dict:
    """A turning, talking head: every request differs."""
    pose = {"jaw": [0.05 + 0.05 * np.sin(i), 0, 0], "global": [0, 0.3 * np.sin(0.3 * i), 0]}
    return {"expression": [0.4 * np.sin(0.5 * i)], "pose": pose,
            "appearance": {"latent_file": latent.name, "seed": 1}}


def bench(server_args: list[str], home: Path, size: int, runs: int) -> dict:
    latent = home / "latents" / "latent.npy"
    with ServerProcess(*server_args, env={"PORTRAIT_RIG_HOME": str(home)},
                       startup_timeout=600) as server, \
            Client(server.host, server.port, timeout=600) as client:
        client.render(params(0, latent), size, size)                      # warm-up
        frames, previews, splits = [], [], []
        for i in range(1, runs + 1):
            start = time.perf_counter()
            frame = client.render(params(i, latent), size, size)
            frames.append(time.perf_counter() - start)
            splits.append(frame.timings)
            start, first = time.perf_counter(), None
            rid = client.send_render(params(100 + i, latent), size, size, mode="live",
                                     previews=True)
            while (reply := client.receive()).id != rid or isinstance(reply, Preview):
                if first is None and reply.id == rid:
                    first = time.perf_counter() - start
            previews.append(first)
    split = {k: statistics.median(t.get(k, 0.0) for t in splits) / 1e3
             for k in ("buffers", "sample", "image")}
    return {"frame": statistics.median(frames), "preview": statistics.median(previews), **split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, help="official model*.pt (default: random)")
    parser.add_argument("--config", choices=["full", "tiny"],
                        help="random model size (default: full on CUDA, tiny on the CPU)")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    config = args.config or ("full" if args.device.startswith("cuda") else "tiny")
    unet = UNetConfig() if config == "full" else BACKEND_TINY

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        if args.weights:
            (home / "diffusionrig").mkdir()
            (home / "diffusionrig" / "model.pt").symlink_to(args.weights.resolve())
            unet = UNetConfig()
        else:
            write_checkpoint(home / "diffusionrig" / "model.safetensors", unet)
        (home / "latents").mkdir()
        np.save(home / "latents" / "latent.npy",
                np.random.default_rng(0).normal(size=64).astype(np.float32))
        what = "official weights" if args.weights else f"random {config} model"
        print(f"diffusionrig backend, device {args.device}, {what} "
              f"({unet.image_size} px, {unet.model_channels} channels), precision "
              f"{args.precision}, frames {args.size}x{args.size}, medians of {args.runs}")
        for sampler, steps in SAMPLERS:
            figures = bench(["--backend", "diffusionrig", "--model", "demo", "--device",
                             args.device, "--quiet",
                             "--option", f"diffusionrig.sampler={sampler}",
                             "--option", f"diffusionrig.steps={steps}",
                             "--option", f"diffusionrig.resolution={unet.image_size}",
                             "--option", f"diffusionrig.precision={args.precision}"],
                            home, args.size, args.runs)
            print(f"  {sampler:>5}-{steps:<2}  frame {figures['frame']:7.3f} s   first preview "
                  f"{figures['preview']:7.3f} s   (server: buffers {figures['buffers']:.3f} s, "
                  f"sample {figures['sample']:.3f} s, image {figures['image']:.3f} s)")
    print(f"targets on an H100, full size: DDIM-20 frame <= {TARGETS['ddim']} s, DPM-Solver++ "
          f"frame <= {TARGETS['dpm++']} s, first preview <= {TARGETS['preview']} s; "
          "they need a GPU (CPU figures only track regressions)")


if __name__ == "__main__":
    main()
