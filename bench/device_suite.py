"""One run that measures every photoreal figure on a device: JSON + a markdown table.

    bash bench/device_suite.sh [--out DIR] [--official-stylegan2 DIR] ...   (on a GPU machine)
    python bench/device_suite.py --quick                                     (CPU, seconds)

Sections, in order of priority (each row is skipped, with a note, once ``--budget`` seconds
have passed; a row that fails records its error and the run goes on):

1. StyleGAN2 config F, StyleGAN3-T and -R at 1024 (random weights: timing only): ms/image at
   batch 1 and 8, fp32 and fp16 (the official mixed precision: the 4 highest resolutions in
   float16, activations clamped to 256), eager and eager replayed as a CUDA graph;
   RigNet; DiffusionRig's 256 px UNet: one step at batch 1 and 4 in fp32 / fp16 / bf16
   (autocast), DDIM-20, DPM-Solver++ 10 and 20 steps, the distilled 2-step sampler, time to
   the first streamed preview.
2. The preview backend on the device at 512 and 1024 px, batch 1 and 8.
3. The stylerig backend end to end through a real server and client (frames/s, p50/p95).
4. StyleGAN3's filtered leaky ReLU, plain against fused (``ops.filtered_lrelu_fused``), on the
   4 largest layers of config T; ``torch.compile`` of the whole generators (fp16, batch 1).
5. The official code on the same weights, where a checkout is given: StyleGAN2-ADA and
   StyleGAN3 (their CUDA kernels, built on first use) and DiffusionRig's UNet; the ratio
   ours / official is measured in the same run.

Every row has the median milliseconds (CUDA: synchronised wall time), p95, throughput and
peak device memory (MiB, CUDA only). ``--quick`` uses tiny networks and sizes and a few
repetitions so CI can run the whole suite on a CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


class Suite:
    """Collects rows; ``measure`` times a callable, ``skip`` notes what was not run."""

    def __init__(self, device: torch.device, quick: bool, budget_s: float):
        self.device, self.quick, self.budget_s = device, quick, budget_s
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.reps, self.warmup = (1, 1) if quick else (10, 3)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, needs_s: float = 0.0) -> bool:
        return self.elapsed() + needs_s > self.budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, section: str, name: str, fn, per: int = 1, needs_s: float = 0.0,
                **config) -> dict | None:
        """Time ``fn()`` (warm-up runs first); ``per``: images or frames per call."""
        if self.over_budget(needs_s):
            return self.skip(section, name, f"budget of {self.budget_s:.0f} s spent", **config)
        row = dict(section=section, name=name, **config)
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            first = time.perf_counter()
            for _ in range(self.warmup):
                fn()
            self.sync()
            row["first_calls_s"] = round(time.perf_counter() - first, 2)
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                self.sync()
                times.append((time.perf_counter() - start) * 1e3)
            row.update(ms=float(np.median(times)), p95_ms=float(np.percentile(times, 95)),
                       per_s=per * 1e3 / float(np.median(times)))
            if self.device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        except Exception as error:  # one failing row must not cost the whole run
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        self.rows.append(row)
        print(_row_text(row), flush=True)
        return row

    def record(self, section: str, name: str, **values) -> dict:
        row = dict(section=section, name=name, **values)
        self.rows.append(row)
        print(_row_text(row), flush=True)
        return row

    def skip(self, section: str, name: str, why: str, **config) -> None:
        self.record(section, name, skipped=why, **config)


def _row_text(row: dict) -> str:
    if "skipped" in row:
        value = f"skipped: {row['skipped']}"
    elif "error" in row:
        value = f"error: {row['error']}"
    else:
        value = "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if k not in ("section", "name"))
    return f"[{row['section']}] {row['name']}: {value}"


# ------------------------------------------------------------------------------- generators

def generator_configs(quick: bool) -> dict:
    from server.models import StyleGAN2Config, StyleGAN3Config
    from tests.support.stylegan_fixtures import SMALL_SG3_R, SMALL_SG3_T, TINY_SG2
    if quick:
        return {"StyleGAN2-F": TINY_SG2, "StyleGAN3-T": SMALL_SG3_T, "StyleGAN3-R": SMALL_SG3_R}
    return {"StyleGAN2-F": StyleGAN2Config(img_resolution=1024, num_fp16_res=4, conv_clamp=256),
            "StyleGAN3-T": StyleGAN3Config.preset("t", 1024),
            "StyleGAN3-R": StyleGAN3Config.preset("r", 1024)}


def cuda_graph(fn, example):
    """``fn(example)`` captured once as a CUDA graph: returns a replaying callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(example)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(example)
    return graph.replay


def bench_generators(suite: Suite, generators: dict) -> None:
    from tests.support.stylegan_fixtures import random_generator
    batches = (1, 2) if suite.quick else (1, 8)
    for label, cfg in generator_configs(suite.quick).items():
        G = random_generator(cfg).to(suite.device)
        generators[label] = G
        for batch in batches:
            ws = G.mapping(torch.randn([batch, G.z_dim], device=suite.device))
            for precision in ("fp32", "fp16"):
                if precision == "fp16" and suite.device.type != "cuda":
                    continue
                force = precision == "fp32"
                run = torch.no_grad()(lambda: G.synthesis(ws, force_fp32=force))
                suite.measure("generators", label, run, per=batch, batch=batch,
                              precision=precision, mode="eager")
                if suite.device.type == "cuda":
                    with torch.no_grad():
                        replay = cuda_graph(lambda w: G.synthesis(w, force_fp32=force), ws)
                    suite.measure("generators", label, replay, per=batch, batch=batch,
                                  precision=precision, mode="cuda graph")


def bench_rignet(suite: Suite, generators: dict) -> None:
    from portrait_rig.demo_head import demo_head
    from server.models.rignet import ControlLayout, RigNet
    G = generators["StyleGAN2-F"]
    layout = ControlLayout.for_model(demo_head().n_expression)
    net = RigNet(G.num_ws, G.w_dim, layout=layout).to(suite.device).eval()
    for batch in (1, 8):
        w = torch.randn(batch, G.num_ws, G.w_dim, device=suite.device)
        p = torch.randn(batch, layout.dim, device=suite.device)
        suite.measure("generators", "RigNet", torch.no_grad()(lambda: net(w, p)), per=batch,
                      batch=batch, precision="fp32", mode="eager")


# ------------------------------------------------------------------------------ DiffusionRig

def bench_diffusionrig(suite: Suite) -> None:
    from tests.support.diffusionrig_fixtures import TINY
    from server.diffusion import (NoiseSchedule, ddim_sample, distilled_sample,
                                  dpm_solver_pp_sample)
    from server.models.diffusionrig_unet import DiffusionRigUNet, UNetConfig
    cfg = TINY if suite.quick else UNetConfig()
    unet = DiffusionRigUNet(cfg).to(suite.device).eval()
    size, schedule = cfg.image_size, NoiseSchedule.linear()
    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if suite.device.type != "cuda":
        dtypes.pop("fp16")

    def inputs(batch):
        d = suite.device
        return (torch.randn(batch, 3, size, size, device=d),
                torch.rand(batch, 9, size, size, device=d) * 2 - 1,
                torch.randn(batch, cfg.latent_dim, device=d))

    def autocast(dtype):
        return torch.autocast(suite.device.type, dtype=dtype, enabled=dtype is not None)

    for batch in ((1, 2) if suite.quick else (1, 4)):
        x, buffers, z = inputs(batch)
        t = torch.full([batch], 500, device=suite.device)
        for precision, dtype in dtypes.items():
            def step():
                with torch.no_grad(), autocast(dtype):
                    unet(x, t, buffers, z)
            suite.measure("diffusionrig", "UNet step", step, per=batch, batch=batch,
                          precision=precision)
    precision = "fp16" if suite.device.type == "cuda" else "fp32"
    dtype = dtypes[precision]
    samplers = {
        "DDIM-20": lambda d, x: ddim_sample(d, x, schedule, schedule.respaced(20)),
        "DPM-Solver++ 10": lambda d, x: dpm_solver_pp_sample(d, x, schedule, steps=10),
        "DPM-Solver++ 20": lambda d, x: dpm_solver_pp_sample(d, x, schedule, steps=20),
        "distilled 2-step": lambda d, x: distilled_sample(d, x, schedule, steps=2),
    }
    for batch in ((1,) if suite.quick else (1, 4)):
        noise, buffers, z = inputs(batch)

        def denoise(x_t, t):
            with autocast(dtype):
                return unet(x_t, t, buffers, z).float()
        for name, sample in samplers.items():
            suite.measure("diffusionrig", name, lambda: sample(denoise, noise), per=batch,
                          batch=batch, precision=precision)
    noise, buffers, z = inputs(1)
    firsts = []

    def first_preview():
        start = time.perf_counter()

        def callback(step, x0):
            suite.sync()
            firsts.append((time.perf_counter() - start) * 1e3)
            raise StopIteration  # the preview has arrived: stop sampling
        try:
            ddim_sample(lambda x_t, t: unet(x_t, t, buffers, z), noise, schedule,
                        callback=callback)
        except StopIteration:
            pass
    with autocast(dtype):
        row = suite.measure("diffusionrig", "first preview (DDIM step 1)", first_preview,
                            batch=1, precision=precision)
    if row and firsts:
        row["ms"] = float(np.median(firsts[-suite.reps:]))


# -------------------------------------------------------------------------------- backends

def bench_preview(suite: Suite) -> None:
    from portrait_rig.demo_head import demo_head
    from portrait_rig.params import RigParams
    from server.backends import create_backend
    from server.backends.base import RenderRequest
    from server.renderer.face_model import FaceModel
    backend = create_backend("preview", FaceModel(demo_head(), suite.device),
                             str(suite.device))
    backend.warmup()
    for size in ((64, 128) if suite.quick else (512, 1024)):
        for batch in ((1, 2) if suite.quick else (1, 8)):
            requests = [RenderRequest(RigParams(), size, size) for _ in range(batch)]
            suite.measure("backends", "preview", lambda: backend.render(requests), per=batch,
                          size=size, batch=batch)


def bench_stylerig_server(suite: Suite, generators: dict) -> None:
    from portrait_rig.client import Client
    from portrait_rig.demo_head import demo_head
    from server.checkpoints.stylegan import save_generator
    from server.checkpoints.stylerig import save_rignet
    from server.models.rignet import ControlLayout, RigNet
    from tests.support.server_process import ServerProcess
    if suite.over_budget(60):
        return suite.skip("backends", "stylerig server", "budget")
    G = generators["StyleGAN2-F"]
    count = 5 if suite.quick else 100
    with tempfile.TemporaryDirectory() as folder:
        generator_file, rignet_file = Path(folder) / "G.safetensors", Path(folder) / "rig.st"
        save_generator(G, generator_file)
        layout = ControlLayout.for_model(demo_head().n_expression)
        save_rignet(RigNet(G.num_ws, G.w_dim, layout=layout).eval(), rignet_file)
        side = G.img_resolution
        with ServerProcess("--backend", "stylerig", "--model", "demo", "--quiet",
                           "--device", str(suite.device),
                           "--option", f"stylerig.generator={generator_file}",
                           "--option", f"stylerig.rignet={rignet_file}") as proc, \
                Client(proc.host, proc.port, timeout=120.0) as client:
            for i in range(3):
                client.render({"pose": {"jaw": [0.01 * i, 0, 0]}}, side, side, format="rgb8")
            trips = []
            start = time.perf_counter()
            for i in range(count):
                begin = time.perf_counter()
                client.render({"pose": {"global": [0, 0.01 * i, 0]}}, side, side,
                              format="rgb8", mode="live")
                trips.append((time.perf_counter() - begin) * 1e3)
            wall = time.perf_counter() - start
    suite.record("backends", "stylerig server round trip", size=side, frames=count,
                 ms=float(np.median(trips)), p95_ms=float(np.percentile(trips, 95)),
                 per_s=count / wall)


# ---------------------------------------------------------------------------- compiled paths

def bench_compiled(suite: Suite, generators: dict) -> None:
    from server.models.ops import filtered_lrelu, filtered_lrelu_fused
    from bench_filtered_lrelu import layer_args
    if suite.quick:
        return suite.skip("compiled", "fused filtered lrelu / torch.compile",
                          "--quick (compiling takes minutes on a CPU: bench_filtered_lrelu.py)")
    G = generators["StyleGAN3-T"]
    net = G.synthesis
    dtype = torch.float16 if suite.device.type == "cuda" else torch.float32
    for name in net.layer_names[-5:-1]:
        x, args = layer_args(getattr(net, name), 1, suite.device, dtype)
        for path, op in (("plain", filtered_lrelu), ("fused", filtered_lrelu_fused)):
            suite.measure("compiled", f"filtered lrelu {name}", torch.no_grad()(
                lambda: op(x, *args)), needs_s=60, path=path, shape=list(x.shape),
                precision=str(dtype).removeprefix("torch."))
    for label, G in generators.items():
        ws = G.mapping(torch.randn([1, G.z_dim], device=suite.device))
        compiled = torch.compile(G.synthesis)
        suite.measure("compiled", label, torch.no_grad()(lambda: compiled(ws)), needs_s=120,
                      batch=1, precision="fp16", mode="torch.compile")


# -------------------------------------------------------------------------- official code

def bench_official(suite: Suite, generators: dict, roots: dict) -> None:
    """Same weights in the official networks (names are equal), same inputs, same run."""
    builders = {
        "StyleGAN2-F": ("stylegan2", "training.networks", dict(
            mapping_kwargs=dict(num_layers=8), synthesis_kwargs=dict(
                channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))),
        "StyleGAN3-T": ("stylegan3", "training.networks_stylegan3", dict(
            mapping_kwargs=dict(num_layers=2), channel_base=32768, channel_max=512)),
        "StyleGAN3-R": ("stylegan3", "training.networks_stylegan3", dict(
            mapping_kwargs=dict(num_layers=2), channel_base=65536, channel_max=1024,
            conv_kernel=1, use_radial_filters=True)),
    }
    for label, (repo, module, kwargs) in builders.items():
        if not roots.get(repo):
            suite.skip("official", label, f"no --official-{repo} checkout given")
            continue
        if suite.quick:
            suite.skip("official", label, "--quick")
            continue
        ours = generators[label]
        try:
            sys.path.insert(0, roots[repo])
            for name in [m for m in sys.modules if m.split(".")[0] in ("training",
                                                                       "torch_utils", "dnnlib")]:
                del sys.modules[name]
            official = __import__(module, fromlist=["Generator"]).Generator(
                z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3, **kwargs)
            official.load_state_dict(ours.state_dict())
            official = official.to(suite.device).eval().requires_grad_(False)
        except Exception as error:
            suite.record("official", label, error=f"{type(error).__name__}: {error}"[:300])
            continue
        finally:
            sys.path.remove(roots[repo])
        ws = ours.mapping(torch.randn([1, 512], device=suite.device))
        with torch.no_grad():
            diff = (official.synthesis(ws, noise_mode="const", force_fp32=True)
                    - ours.synthesis(ws, force_fp32=True)).abs().max().item()
        mine = suite.measure("official", label, torch.no_grad()(
            lambda: ours.synthesis(ws)), needs_s=90, code="ours", batch=1, precision="fp16")
        theirs = suite.measure("official", label, torch.no_grad()(
            lambda: official.synthesis(ws, noise_mode="const")), needs_s=60, code="official",
            batch=1, precision="fp16", max_diff_fp32=diff)
        if mine and theirs and "ms" in mine and "ms" in theirs:
            theirs["ours_over_official"] = mine["ms"] / theirs["ms"]
    bench_official_unet(suite, roots.get("diffusionrig"))


def bench_official_unet(suite: Suite, root: str | None) -> None:
    if not root or suite.quick:
        return suite.skip("official", "DiffusionRig UNet",
                          "--quick" if root else "no --official-diffusionrig checkout given")
    from server.models.diffusionrig_unet import DiffusionRigUNet, UNetConfig
    sys.path.insert(0, root)
    try:
        from utils.script_util import create_model_and_diffusion, model_and_diffusion_defaults
        official, _ = create_model_and_diffusion(**model_and_diffusion_defaults())
        theirs = official.denoisingUNet
    except Exception as error:
        return suite.record("official", "DiffusionRig UNet",
                            error=f"{type(error).__name__}: {error}"[:300])
    finally:
        sys.path.remove(root)
    ours = DiffusionRigUNet(UNetConfig())
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(suite.device).eval(), theirs.to(suite.device).eval()
    x = torch.randn(1, 3, 256, 256, device=suite.device)
    buffers = torch.rand(1, 9, 256, 256, device=suite.device)
    z, t = torch.randn(1, 64, device=suite.device), torch.tensor([500], device=suite.device)
    rows = []
    for code, net in (("ours", ours), ("official", theirs)):
        def step():
            with torch.no_grad(), torch.autocast(suite.device.type, dtype=torch.float16):
                net(x, t, buffers, z)
        rows.append(suite.measure("official", "DiffusionRig UNet step", step, code=code,
                                  batch=1, precision="fp16"))
    if all(r and "ms" in r for r in rows):
        rows[1]["ours_over_official"] = rows[0]["ms"] / rows[1]["ms"]


# ---------------------------------------------------------------------------------- output

def environment(device: torch.device) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    env = dict(torch=torch.__version__, python=platform.python_version(), commit=commit,
               machine=platform.machine(), cpus=__import__("os").cpu_count(),
               device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def markdown(env: dict, rows: list[dict]) -> str:
    keys = ["batch", "size", "precision", "mode", "path", "code"]
    lines = [f"Device suite on {env.get('gpu', env['device'])} (torch {env['torch']}, "
             f"commit {env['commit']}).", "",
             "| section | what | config | ms (p50) | p95 | per s | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config = ", ".join(f"{k} {r[k]}" for k in keys if k in r)
        note = r.get("skipped") or r.get("error") or ""
        if "ours_over_official" in r:
            note = f"ours/official {r['ours_over_official']:.2f}"
        cells = [f"{r[k]:.2f}" if isinstance(r.get(k), float) else "" for k in
                 ("ms", "p95_ms", "per_s", "peak_mib")]
        lines.append(f"| {r['section']} | {r['name']} | {config} | " + " | ".join(cells)
                     + f" | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (CI)")
    ap.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds after which remaining rows are skipped")
    for repo in ("stylegan2", "stylegan3", "diffusionrig"):
        ap.add_argument(f"--official-{repo}", default=None, metavar="DIR",
                        help=f"a checkout of the official {repo} code (optional)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and
                                          not args.quick else "cpu"))
    if device.type == "cpu":
        # Small ops on a shared CPU: one thread. Two threads made a 16 px UNet step 90x
        # slower on the busy 2-core development VM (every op's barrier waits for a
        # pre-empted thread).
        torch.set_num_threads(1)
    suite = Suite(device, args.quick, args.budget)
    env = environment(device)
    print(json.dumps(env), flush=True)
    generators: dict = {}
    roots = {"stylegan2": args.official_stylegan2, "stylegan3": args.official_stylegan3,
             "diffusionrig": args.official_diffusionrig}
    for step in (lambda: bench_generators(suite, generators),
                 lambda: bench_rignet(suite, generators),
                 lambda: bench_diffusionrig(suite),
                 lambda: bench_preview(suite),
                 lambda: bench_stylerig_server(suite, generators),
                 lambda: bench_compiled(suite, generators),
                 lambda: bench_official(suite, generators, roots)):
        try:
            step()
        except Exception as error:  # a whole section failed to set up: note it, go on
            suite.record("setup", getattr(error, "__qualname__", "section"),
                         error=f"{type(error).__name__}: {error}"[:300])
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(environment=env, quick=args.quick, seconds=round(suite.elapsed(), 1),
                  rows=suite.rows)
    (args.out / "device_suite.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "device_suite.md").write_text(markdown(env, suite.rows))
    print(f"wrote {args.out / 'device_suite.json'} and device_suite.md "
          f"({suite.elapsed():.0f} s)")
    return 1 if any("error" in r for r in suite.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
