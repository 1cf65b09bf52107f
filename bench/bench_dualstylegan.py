"""DualStyleGAN throughput: seconds per image of ``DualStyleGAN.forward`` (intrinsic StyleGAN2
+ ModRes blocks + colour transforms) for the official architecture at a given resolution,
batch 1 (live editing) and batched (sequence rendering), and of the extrinsic code mapping.

    python bench/bench_dualstylegan.py [--device cuda] [--resolution 1024] [--batch 8]
                                       [--runs 5] [--threads N]

Random weights (the cost is the shapes, not the values). The paper reports about 0.13 s per
1024x1024 image on a V100; CPU figures only track regressions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.models.dualstylegan import DualStyleGAN, DualStyleGANConfig  # noqa: E402
from server.models.stylegan2 import StyleGAN2Config  # noqa: E402


def timed(fn, device: torch.device, runs: int) -> float:
    """Median seconds of ``runs`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default 1024 on CUDA, 256 on the CPU")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resolution = args.resolution or (1024 if device.type == "cuda" else 256)
    config = DualStyleGANConfig(StyleGAN2Config(img_resolution=resolution),
                                structure_layers=7)
    model = DualStyleGAN(config).to(device).eval().requires_grad_(False)
    L, C = config.num_ws, config.generator.w_dim
    print(f"DualStyleGAN {resolution}x{resolution}, {L} layers, device {device}, "
          f"{torch.get_num_threads()} CPU threads")
    with torch.inference_mode():
        for batch in (1, args.batch):
            codes = torch.randn(2, batch, L, C, device=device)
            content, exstyle = model.map_codes(codes[0]), model.map_codes(codes[1])
            weights = torch.tensor([0.75] * 7 + [1.0] * (L - 7), device=device)
            seconds = timed(lambda: model(content, exstyle, weights), device, args.runs)
            print(f"forward, batch {batch:2d}: {seconds / batch * 1e3:9.1f} ms per image "
                  f"({batch / seconds:.2f} images/s)")
        seconds = timed(lambda: model.map_codes(codes[1]), device, args.runs)
        print(f"map_codes, batch {args.batch}: {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
