"""StyleGAN3's filtered leaky ReLU: plain ops against the compiled (fused) path, per layer.

Builds a StyleGAN3 synthesis network (random weights) and, for each layer, times
``ops.filtered_lrelu`` and ``ops.filtered_lrelu_fused`` on that layer's own input shape,
filters and padding, alternating the two (minimum of --runs each: on a shared machine the
minimum is what the code costs). Prints per-layer milliseconds, the largest difference
between the two, each layer's compile time, and the totals.

    python bench/bench_filtered_lrelu.py [--preset t] [--resolution 64] [--device cpu]
                                         [--batch 1] [--threads 1] [--runs 7]

Full size on a GPU: --resolution 1024 --device cuda (compiles 15 graphs first).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from server.models import StyleGAN3Config  # noqa: E402
from server.models.ops import filtered_lrelu, filtered_lrelu_fused  # noqa: E402
from server.models.stylegan3 import SynthesisNetwork  # noqa: E402


def layer_args(layer, batch: int, device, dtype):
    """(x, the other filtered_lrelu arguments) for one synthesis layer."""
    side = layer.in_size + layer.conv_kernel - 1
    x = torch.randn(batch, layer.out_channels, side, side, device=device, dtype=dtype)
    act_gain, slope = (1.0, 1.0) if layer.is_torgb else (2 ** 0.5, 0.2)
    return x, (layer.up_filter, layer.down_filter, layer.bias.detach().to(dtype),
               layer.up_factor, layer.down_factor, layer.padding, act_gain, slope,
               layer.conv_clamp)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def compare(network, batch: int, device, dtype, runs: int) -> list[dict]:
    """Per-layer rows: name, shape, plain_ms, fused_ms, max_diff, compile_s."""
    rows = []
    for name in network.layer_names:
        x, args = layer_args(getattr(network, name), batch, device, dtype)
        with torch.no_grad():
            start = time.perf_counter()
            fused = filtered_lrelu_fused(x, *args)
            compile_s = time.perf_counter() - start
            diff = (fused.float() - filtered_lrelu(x, *args).float()).abs().max().item()
            plain_ms, fused_ms = [], []
            for _ in range(runs):
                plain_ms.append(timed(lambda: filtered_lrelu(x, *args), device))
                fused_ms.append(timed(lambda: filtered_lrelu_fused(x, *args), device))
        rows.append(dict(layer=name, shape=list(x.shape), plain_ms=min(plain_ms),
                         fused_ms=min(fused_ms), max_diff=diff, compile_s=compile_s))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=("t", "r"), default="t")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--channels", type=int, default=None,
                    help="channel_max (default: the official 512/1024 at 1024 px, scaled "
                         "down with the resolution)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    scale = args.resolution / 1024
    base = StyleGAN3Config.preset(args.preset, args.resolution)
    channel_max = args.channels or max(8, int(base.channel_max * scale))
    cfg = StyleGAN3Config.preset(args.preset, args.resolution,
                                 channel_base=max(64, int(base.channel_base * scale)),
                                 channel_max=channel_max)
    network = SynthesisNetwork(cfg).to(device)
    print(f"StyleGAN3-{args.preset.upper()} {args.resolution} px, channel_max {channel_max}, "
          f"batch {args.batch}, {args.dtype}, {device}, torch threads {torch.get_num_threads()}"
          f"; min of {args.runs} alternating runs")
    rows = compare(network, args.batch, device, dtype, args.runs)
    for r in rows:
        print(f"  {r['layer']:<14} {str(r['shape']):<20} plain {r['plain_ms']:8.2f} ms  fused "
              f"{r['fused_ms']:8.2f} ms  max diff {r['max_diff']:.1e}  compile "
              f"{r['compile_s']:5.1f} s")
    plain = sum(r["plain_ms"] for r in rows)
    fused = sum(r["fused_ms"] for r in rows)
    print(f"total: plain {plain:.1f} ms, fused {fused:.1f} ms ({plain / fused:.2f}x), "
          f"largest difference {max(r['max_diff'] for r in rows):.1e}")


if __name__ == "__main__":
    main()
