"""StyleRig backend throughput: frames per second of ``StyleRigBackend.render`` at the
generator's resolution, for live editing (batch 1, a new pose every frame) and for sequence
rendering (batches of frames of one shot, with and without latent smoothing over two
neighbours either side, as the render engine sends them).

    python bench/bench_stylerig.py [--device cuda] [--arch sg2|sg3] [--resolution 1024]
                                   [--batch 8] [--precision auto] [--runs 5]
                                   [--generator FILE] [--rignet FILE] [--threads N]

Without --generator a config-F StyleGAN2 (or config-T StyleGAN3) with random weights is
written to a temporary file and loaded the way the server loads a checkpoint (the cost is the
weights' shapes, not their values); without --rignet a random RigNet for it. Defaults: 1024 px
and fp16 on CUDA, 256 px and fp32 on the CPU. Targets on an H100: 1024x1024 StyleGAN2 + RigNet
at batch 1 in fp16 >= 30 fps; batched sequence rendering at 256 px >= 100 fps. They need a
GPU; CPU figures only track regressions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portrait_rig.face_source import load_face_data  # noqa: E402
from portrait_rig.params import RigParams  # noqa: E402
from server.backends.base import RenderRequest  # noqa: E402
from server.backends.stylerig import StyleRigBackend  # noqa: E402
from server.checkpoints.stylegan import save_generator  # noqa: E402
from server.renderer.face_model import FaceModel  # noqa: E402
from server.models import (StyleGAN2Config, StyleGAN2Generator, StyleGAN3Config,  # noqa: E402
                           StyleGAN3Generator)
from server.models.rignet import ControlLayout, RigNet  # noqa: E402
from server.checkpoints.stylerig import save_rignet  # noqa: E402
from server.backends.shots import Shot  # noqa: E402

TARGETS = {"live_1024_fps": 30.0, "sequence_256_fps": 100.0}


def frame_params(i: int) -> RigParams:
    """A head turning and talking: every frame's controls differ."""
    params = RigParams()
    params.appearance.seed = 1
    params.pose.global_ = [0.05 * (i % 5), 0.3 * ((i % 11) / 10 - 0.5), 0.02 * (i % 3)]
    params.pose.jaw = [0.02 * (i % 7), 0.0, 0.0]
    params.expression = [0.1 * ((i % 9) - 4)] * 10
    return params


def sequence(start: int, count: int, size: int, smooth: bool) -> list[RenderRequest]:
    """Batch requests of frames start .. start+count-1 of one shot; with ``smooth`` each
    carries two neighbours either side, as the render engine sends them."""
    requests = []
    for f in range(start, start + count):
        neighbors = (tuple((n, frame_params(n)) for n in range(f - 2, f + 3) if n != f)
                     if smooth else ())
        shot = Shot("bench/camera", seed=0, frame=f, smooth=smooth, neighbors=neighbors)
        requests.append(RenderRequest(frame_params(f), size, size, shot=shot))
    return requests


def timed(fn, device: torch.device, runs: int) -> tuple[float, dict]:
    """Median seconds of ``runs`` calls after two warm-up calls, and the last call's
    per-stage timings (milliseconds)."""
    for _ in range(2):
        results = fn(-1)
    times = []
    for run in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        results = fn(run)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), results[0].timings


def random_files(folder: Path, arch: str, resolution: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    if arch == "sg2":
        G = StyleGAN2Generator(StyleGAN2Config(img_resolution=resolution))
    else:
        G = StyleGAN3Generator(StyleGAN3Config.preset("t", resolution))
    save_generator(G, folder / "generator.safetensors")
    net = RigNet(G.num_ws, G.w_dim, layout=ControlLayout.for_model(50))
    with torch.no_grad():
        net.decoder.weight.normal_(0, 0.01)
    save_rignet(net, folder / "rignet.safetensors")
    return folder / "generator.safetensors", folder / "rignet.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=["sg2", "sg3"], default="sg2")
    parser.add_argument("--resolution", type=int, help="default 1024 on CUDA, 256 on the CPU")
    parser.add_argument("--batch", type=int, default=8, help="frames per sequence batch")
    parser.add_argument("--precision", default="auto", help="the backend's precision option")
    parser.add_argument("--runs", type=int, default=5, help="timed calls (median)")
    parser.add_argument("--generator", type=Path, help="a generator file (default: random)")
    parser.add_argument("--rignet", type=Path, help="a RigNet file (default: random)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resolution = args.resolution or (1024 if device.type == "cuda" else 256)

    with tempfile.TemporaryDirectory() as folder:
        generator, rignet = args.generator, args.rignet
        if generator is None:
            generator, random_rignet = random_files(Path(folder), args.arch, resolution)
            rignet = rignet or random_rignet
        face_model = FaceModel(load_face_data("demo"), device)
        backend = StyleRigBackend(face_model, str(device), generator=str(generator),
                                  rignet=str(rignet) if rignet else "none",
                                  precision=args.precision)
    size = backend.G.img_resolution
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    kind = "StyleGAN3" if backend.is_stylegan3 else "StyleGAN2"
    print(f"device {device} ({name}, {torch.get_num_threads()} threads), {kind} {size}x{size}, "
          f"precision {backend.precision}, RigNet {'yes' if backend.rignet else 'no'}, "
          f"{'random' if args.generator is None else 'checkpoint'} weights")

    def show(label: str, frames: int, seconds: float, timings: dict) -> None:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        print(f"  {label:<34} {frames / seconds:8.2f} frames/s  ({seconds * 1e3:8.1f} ms per "
              f"call; stages ms: {stages})")

    seconds, stages = timed(lambda run: backend.render([RenderRequest(
        frame_params(run + 100), size, size)]), device, args.runs)
    show("live, batch 1", 1, seconds, stages)
    for smooth in (False, True):
        seconds, stages = timed(lambda run: backend.render(sequence(
            1000 + run * args.batch, args.batch, size, smooth)), device, args.runs)
        show(f"sequence, batch {args.batch}{', smoothed' if smooth else ''}", args.batch,
             seconds, stages)
    print(f"targets on an H100 (need a GPU): StyleGAN2 1024 + RigNet, batch 1, fp16 >= "
          f"{TARGETS['live_1024_fps']:g} frames/s; batched sequences at 256 px >= "
          f"{TARGETS['sequence_256_fps']:g} frames/s")
    if device.type != "cuda":
        print("  (CPU run: the targets need a GPU; these figures only track regressions)")


if __name__ == "__main__":
    main()
