"""DiffusionRig inference cost at full size (256x256, 12-channel input, batch 1): seconds per
UNet step, per encoder call, per 20-step DDIM image, per 10-step DPM-Solver++ image, and the
latency of the first x0 preview.

    python bench/bench_diffusionrig.py [--device cuda] [--autocast fp16] [--weights model.pt]
                                       [--runs 5] [--full] [--threads N]

Without --weights the model is randomly initialised: the cost is the same. On the CPU the
per-image figures are estimated from the measured per-step time plus the measured sampler
overhead (20 full-size UNet calls take minutes there); --full runs the samplers for real, as
is the default on a GPU. Targets (H100): DDIM-20 <= 1.0 s, fast sampler <= 0.4 s, first
preview <= 0.15 s per image; they need a GPU, the CPU figures only track regressions.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.diffusion import (NoiseSchedule, ddim_sample, dpm_solver_pp_sample,  # noqa: E402
                              initial_noise)
from server.models.diffusionrig import DiffusionRig  # noqa: E402
from server.checkpoints.diffusionrig import load_diffusionrig  # noqa: E402

TARGETS = {"ddim": 1.0, "fast": 0.4, "preview": 0.15}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int) -> tuple[float, object]:
    """Median seconds of ``runs`` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, help="official model*.pt (default: random)")
    parser.add_argument("--autocast", choices=["none", "fp16", "bf16"], default="none")
    parser.add_argument("--runs", type=int, default=3, help="timed UNet steps (median)")
    parser.add_argument("--full", action="store_true", help="run the samplers on the CPU too")
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--fast-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.weights:
        model = load_diffusionrig(args.weights, device=device)
    else:
        torch.manual_seed(0)
        model = DiffusionRig().to(device).eval().requires_grad_(False)
    size = model.config.image_size
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.autocast)
    amp = (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext())

    generator = torch.Generator().manual_seed(1)
    buffers = (torch.rand(1, 9, size, size, generator=generator) * 2 - 1).to(device)
    photo = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(device)
    noise = initial_noise(2, (1, 3, size, size), device)
    schedule = NoiseSchedule.linear()

    with torch.no_grad(), amp:
        t_encoder, z = timed(lambda: model.encode(photo), device, args.runs)

        def denoise(x, t):
            return model(x, t, buffers, z).float()

        t_step, _ = timed(lambda: denoise(noise, torch.tensor([500], device=device)), device,
                          args.runs)

    # Sampler arithmetic alone (a free denoiser), to add to the model calls when estimating.
    def zero_eps(x, t):
        return torch.zeros_like(x)

    t_ddim_overhead, _ = timed(lambda: ddim_sample(zero_eps, noise, schedule), device, 3)
    t_fast_overhead, _ = timed(
        lambda: dpm_solver_pp_sample(zero_eps, noise, schedule, steps=args.fast_steps), device, 3)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}, {torch.get_num_threads()} threads), autocast {args.autocast}, "
          f"{'official weights' if args.weights else 'random weights'}, batch 1, {size}x{size}")
    print(f"  encoder (ResNet-18)       {t_encoder:8.3f} s")
    print(f"  UNet step                 {t_step:8.3f} s")

    run_full = args.full or device.type == "cuda"
    if run_full:
        with torch.no_grad(), amp:
            start = {}

            def first_preview(i, x0):
                if i == 0:
                    sync(device)
                    start["preview"] = time.perf_counter() - start["t0"]

            def run(sampler, **kw):
                sync(device)
                start["t0"] = time.perf_counter()
                sampler(denoise, noise, schedule, callback=first_preview, **kw)
                sync(device)
                return time.perf_counter() - start["t0"]

            run(ddim_sample)                                   # warm-up
            t_ddim = run(ddim_sample, timesteps=schedule.respaced(args.ddim_steps))
            t_preview = start["preview"]
            t_fast = run(dpm_solver_pp_sample, steps=args.fast_steps)
        how = "measured"
    else:
        t_ddim = args.ddim_steps * t_step + t_ddim_overhead
        t_fast = args.fast_steps * t_step + t_fast_overhead
        t_preview = t_step
        how = "estimated: steps x UNet step + sampler overhead"
    print(f"  DDIM-{args.ddim_steps} image             {t_ddim:8.3f} s   ({how}; "
          f"sampler overhead {t_ddim_overhead * 1e3:.1f} ms)")
    print(f"  DPM-Solver++-{args.fast_steps} image     {t_fast:8.3f} s   ({how}; "
          f"sampler overhead {t_fast_overhead * 1e3:.1f} ms)")
    print(f"  first x0 preview          {t_preview:8.3f} s")
    print(f"targets on an H100 (need a GPU): DDIM-20 <= {TARGETS['ddim']} s, fast <= "
          f"{TARGETS['fast']} s, first preview <= {TARGETS['preview']} s "
          "(the encoder runs once per photo, not per frame)")


if __name__ == "__main__":
    main()
