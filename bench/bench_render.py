"""Preview backend frame times: full render (skin + geometry + raster + shade + composite +
uint8 RGBA) per frame, median and p95, with per-stage medians, at each size and device.

    python bench/bench_render.py [--sizes 256 512] [--runs 60] [--batch 4] [--threads N]

Uses the demo head (``portrait_rig.demo_head``) when present, else a FLAME-sized synthetic
sphere head (about 5k vertices, 10k triangles). Stage figures are medians of the per-stage
milliseconds (per frame). Figures depend on load: on a shared machine the minimum shows what
the code costs, the median what the machine allowed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")      # BLAS threads fight numba's
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse                                          # noqa: E402
import sys                                               # noqa: E402
import time                                              # noqa: E402
from pathlib import Path                                 # noqa: E402

import numpy as np                                       # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_face():
    try:
        from portrait_rig.demo_head import demo_head
        return demo_head(), "demo head"
    except ImportError:
        from tests.support.synthetic_face import synthetic_face
        return synthetic_face(n_lat=64, n_lon=80), "synthetic sphere head"


def frame_params(i: int):
    """Slightly different parameters every frame (nothing may be cached between frames)."""
    from portrait_rig.params import RigParams
    params = RigParams()
    params.pose.global_ = [0.05 * np.sin(i * 0.3), 0.3 * np.sin(i * 0.1), 0.0]
    params.pose.jaw = [0.1 + 0.1 * np.sin(i * 0.2), 0.0, 0.0]
    params.expression = [float(np.sin(i * 0.05))]
    return params


def measure(backend, size: int, batch: int, runs: int, warmup: int):
    from server.backends.base import RenderRequest
    walls, stages = [], {}
    for i in range(warmup + runs):
        requests = [RenderRequest(frame_params(i * batch + k), size, size) for k in range(batch)]
        start = time.perf_counter()
        result = backend.render(requests)[0]
        wall = (time.perf_counter() - start) * 1e3 / batch
        if i >= warmup:
            walls.append(wall)
            for name, ms in result.timings.items():
                stages.setdefault(name, []).append(ms / batch)
    return np.array(walls), {name: float(np.median(v)) for name, v in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="batch for the batched figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, plus cuda when available")
    parser.add_argument("--torch-path", action="store_true",
                        help="also time the torch reference path on the CPU")
    args = parser.parse_args()

    import numba
    import torch

    from server.backends import create_backend
    from server.renderer.face_model import FaceModel

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    face, label = load_face()
    print(f"model: {label}, {face.n_vertices} vertices, {face.n_triangles} triangles; "
          f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()} "
          f"({numba.config.THREADING_LAYER} layer); {os.cpu_count()} CPUs")

    configs = [(device, "auto") for device in devices]
    if args.torch_path:
        configs.append(("cpu", "torch"))
    for device, path in configs:
        backend = create_backend("preview", FaceModel(face, device), device, path=path)
        start = time.perf_counter()
        backend.warmup()
        print(f"\n[{device}, {backend.path} path] warmup {time.perf_counter() - start:.2f} s")
        for batch in sorted({1, args.batch}):
            for size in args.sizes:
                walls, stages = measure(backend, size, batch, args.runs if batch == 1 else
                                        max(10, args.runs // batch), args.warmup)
                stage_text = "  ".join(f"{k} {v:.2f}" for k, v in stages.items())
                print(f"  {size:4d}px batch {batch}: median {np.median(walls):6.2f} ms/frame, "
                      f"p95 {np.percentile(walls, 95):6.2f}, min {walls.min():6.2f}  |  "
                      f"{stage_text}")


if __name__ == "__main__":
    main()
