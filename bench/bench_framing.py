"""What the FFHQ framing of the photoreal backends costs per frame: the head's landmarks and
framing, the reframed DECA codes, the conditioning buffers in the aligned square, and placing a
portrait into the frame, against the rig framing (buffers of the covering square, resize and
crop). Median and minimum milliseconds per frame of a batch.

    python bench/bench_framing.py [--frames 512x384 1024x1024] [--resolution 256]
                                  [--batch 4] [--runs 20] [--device cpu|cuda] [--threads 1]

Uses the demo head (its landmarks are found on a render of it once, before timing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def params_for(i: int):
    from portrait_rig.params import RigParams
    return RigParams.from_dict({"pose": {"global": [0.05, 0.3 * np.sin(i), 0.2 * np.cos(i)],
                                         "jaw": [0.1, 0.0, 0.0]},
                                "translation": [0.03 * np.sin(i), 0.01, -0.3]})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", nargs="+", default=["512x384", "1024x1024"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: figures a loaded machine can reproduce)")
    args = parser.parse_args()

    from portrait_rig.face_source import load_face_data
    from server.backends.framing import HeadFramer, place
    from server.renderer.deca import DecaBufferRenderer, DecaCodes
    from server.renderer.face_model import FaceModel

    device = torch.device(args.device)
    model = FaceModel(load_face_data("demo"), device)
    renderer = DecaBufferRenderer(model)
    framer = HeadFramer(model)
    size = args.resolution
    portrait = torch.rand(args.batch, 3, size, size, device=device)
    torch.set_num_threads(args.threads)
    print(f"device {device}, network square {size} px, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}")
    for frame in args.frames:
        width, height = (int(v) for v in frame.split("x"))
        for mode in ("rig", "ffhq"):
            times = []
            for run in range(args.runs + 2):
                params = [params_for(run * args.batch + i) for i in range(args.batch)]
                sync(device)
                start = time.perf_counter()
                codes = DecaCodes.cat([renderer.codes([p], width, height) for p in params])
                framings = framer.framings(codes, mode)
                aligned = framer.reframe(codes, framings)
                renderer.render(aligned, size)
                place(portrait, framings, [(width, height)] * args.batch)
                sync(device)
                if run >= 2:                                   # first runs compile kernels
                    times.append((time.perf_counter() - start) * 1e3 / args.batch)
            print(f"{frame:>10} {mode:>5}: median {np.median(times):7.2f} ms/frame, "
                  f"min {np.min(times):7.2f}")


if __name__ == "__main__":
    main()
