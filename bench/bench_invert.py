"""Photo inversion costs: one optimisation step (synthesis, the losses, backward) and one
encoder pass, on scikit-image's astronaut.

    python bench/bench_invert.py [--generator FILE] [--steps 20] [--device cpu|cuda]
                                 [--encoder restyle_e4e|e4e|none] [--threads N]

Without ``--generator`` the tiny test generator (tests/data/stylegan2_tiny.safetensors)
runs. The encoder has random weights (its cost does not depend on them) at the official
sizes: IR-SE-50 at 256 x 256, 512-channel heads. Prints medians and minima in milliseconds;
on a shared machine the minimum shows what the code costs, the median what the machine
allowed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default=str(ROOT / "tests/data/stylegan2_tiny.safetensors"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoder", default="restyle_e4e", choices=("restyle_e4e", "e4e", "none"))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()

    import torch
    from skimage import data

    from server.checkpoints.stylegan import load_generator
    from server.inversion.invert import PhotoInverter

    if args.threads:
        torch.set_num_threads(args.threads)
    G = load_generator(args.generator, args.device)
    inverter = PhotoInverter(G)
    times, last = [], [time.perf_counter()]

    def lap(*_):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append((now - last[0]) * 1e3)
        last[0] = now

    last[0] = time.perf_counter()
    inverter.invert(data.astronaut(), "optimisation", steps=args.steps, on_progress=lap)
    steps = times[1:] or times
    print(f"optimisation step, {G.img_resolution}px generator on {args.device}: "
          f"median {statistics.median(steps):.1f} ms, min {min(steps):.1f} ms "
          f"({torch.get_num_threads()} threads)")

    if args.encoder != "none":
        from tests.support.encoder_fixtures import random_encoder_state
        from server.models.encoders import E4EEncoder, ReStyleEncoder

        n = 18
        net = E4EEncoder(n) if args.encoder == "e4e" else ReStyleEncoder(n, progressive=True)
        net.load_state_dict(random_encoder_state(args.encoder, n), assign=True)
        net = net.eval().to(args.device)
        x = torch.zeros(1, 3 if args.encoder == "e4e" else 6, 256, 256, device=args.device)
        passes = []
        with torch.no_grad():
            for _ in range(4):
                start = time.perf_counter()
                net(x)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                passes.append((time.perf_counter() - start) * 1e3)
        print(f"{args.encoder} encoder pass at 256 on {args.device}: "
              f"median {statistics.median(passes[1:]):.0f} ms, min {min(passes[1:]):.0f} ms")


if __name__ == "__main__":
    main()
