"""Does StyleRig training give rig control? Measured in a world whose truth is known.

    python bench/bench_rignet_control.py [--out DIR] [--face-model demo] [--count 96000]
        [--image-size 64] [--dfr-steps 4000] [--rignet-steps 2000] [--variants ...]
        [--threads 1] [--quick]

A truth world (``tests/support/truth_world.py``: StyleGAN's interface over renders of the face
model under a known, entangled, non-linear map M from W+ to rig parameters, plus background
and colour cast, degraded off the W distribution) is saved as a generator file, and the
shipped CLI (``python -m server.training.stylerig``, run in-process with its progress display)
trains on it as a user would: corpus -> landmarks (dlib, or the world's exact landmarks for a
face model dlib cannot see) -> dfr -> rignet, plus the paper's ablations (sec. 8.4): without
L_consist (``--w-consist 0``), without L_rec (``--w-rec 0``) and the 'steering' baseline (an
MLP from control deltas to latent deltas, blind to the latent; trained here with the same
objective, pairs and optimiser), then the refinement round ('refined'): an edit corpus of the
full RigNet (``corpus --rignet``), F refined on both corpora (``dfr --also --init``) and RigNet
trained again with that F; 'control-only': with the refined F, L_rec and L_control alone
(``--w-render 0``: nothing rendered) on 80 times the pairs, in less time than 'refined'. A
bound ('truth-judged'): the same network and L_rec trained with the world's truth M as its
judge instead of F (no rendering), what a perfect F would allow.
Every stage resumes: run the same command again after a kill.

Then, on held-out latents (never in the corpus), because M is known:
* DFR accuracy: F(w) against M(w);
* control and preservation per variant and edit (pose, expression, lighting, all three at
  once: sec. 8.5), see ``tests/support/rig_control.py``;
* interactive control (sec. 8.2): yaw, one expression coefficient and the light's azimuth
  swept on one identity, achieved against requested, and a contact sheet (generated images
  above the rig's target renders) in ``DIR/contact_sheet.png``;
* light as images show it: the light fitted to each held-out image with every other true
  parameter given but the albedo (``rig_control.light_seen_in_images``), the floor of any
  judge that reads images, next to F's error on the same faces;
* the ``evaluate`` stage's own report (F as estimator, and dlib + the photo fit on the
  generated images), to compare with the truth.

Everything is printed and written to ``DIR/results.json`` and ``DIR/report.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portrait_rig import sh as sh_code  # noqa: E402
from server.checkpoints.stylerig import load_dfr, load_rignet, save_rignet  # noqa: E402
from server.checkpoints.torch_file import write_torch_file  # noqa: E402
from server.models.rignet import MODES, RigNet, mix_controls  # noqa: E402
from server.training.stylerig.cli import main as cli  # noqa: E402
from server.training.stylerig.corpus import to_pipeline_images  # noqa: E402
from server.training.stylerig.data import TrainingData  # noqa: E402
from server.training.stylerig.face_render import FaceRenderer  # noqa: E402
from server.training.stylerig.losses import RenderLoss, RenderLossWeights  # noqa: E402
from server.training.stylerig.preview import save_grid  # noqa: E402
from server.training.stylerig.run import scheduled_lr, set_lr  # noqa: E402
from server.training.progress import Progress  # noqa: E402
from server.training.stylerig.train_rignet import (Pairs, RigNetObjective,  # noqa: E402
                                                   RigNetSettings, control_terms)
from tests.support.stylerig_fixtures import write_test_face  # noqa: E402
from tests.support import rig_control  # noqa: E402
from tests.support.truth_world import (TruthWorld, WorldConfig, load_world, save_world,  # noqa: E402
                                       serving_worlds, write_true_landmarks)

VARIANTS = {"full": [], "paper": ["--w-control", "0"], "no-consist": ["--w-consist", "0"],
            "no-rec": ["--w-rec", "0"], "steering": None}
# 'refined': F refined on an edit corpus of the full RigNet, then RigNet trained again with it.
# 'control-only': the refined F, nothing rendered (--w-render 0), 80 x the pairs.
# 'truth-judged': the same network and L_rec judged by the world's truth instead of F (a bound).
CHOICES = [*VARIANTS, "refined", "control-only", "truth-judged"]
CONTROL_ONLY = {"batch": 8, "steps": 10}          # x the F-judged rows' batch and steps
TRUNCATION = 0.7          # the held-out faces that are edited: portraits as users sample them


class SteeringNet(nn.Module):
    """The 'steering' baseline: w_hat = w + MLP((p - F(w)'s controls) / scale), an MLP from
    the change of the controls to a W+ offset that never sees w itself. Hidden layers of
    ``hidden`` ELUs; the last layer starts at zero (an untrained net is the identity)."""

    def __init__(self, dfr, layout, num_ws: int, w_dim: int, scale: torch.Tensor,
                 hidden: int = 256):
        super().__init__()
        self.dfr, self.layout, self.num_ws, self.w_dim = [dfr], layout, num_ws, w_dim
        self.register_buffer("control_scale", scale)     # RigNet's name: the objective reads it
        self.mlp = nn.Sequential(nn.Linear(layout.dim, hidden), nn.ELU(),
                                 nn.Linear(hidden, hidden), nn.ELU(),
                                 nn.Linear(hidden, num_ws * w_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            current = self.dfr[0](w).controls(self.layout)
        return w + self.mlp((p - current) / self.control_scale).view(-1, self.num_ws,
                                                                      self.w_dim)


def train_steering(args, run: Path, world: TruthWorld, dfr_path: Path) -> SteeringNet:
    """The baseline trained with RigNet's objective, pairs, optimiser and step count;
    checkpointed like the CLI's runs (resumes)."""
    data = TrainingData(args.out / "corpus")
    dfr, _ = load_dfr(dfr_path)
    layout = dfr.layout.control_layout()
    settings = RigNetSettings(dfr=str(dfr_path), face_model=args.face_model,
                              embedding=args.embedding, steps=args.rignet_steps,
                              batch_size=args.rignet_batch, lr_decay=0.5)
    with torch.no_grad():
        controls = dfr(data.w(data.sample(4096), "cpu")).controls(layout)
    torch.manual_seed(0)
    net = SteeringNet(dfr, layout, data.corpus.num_ws, data.corpus.w_dim,
                      controls.std(0).clamp_min(1e-3))
    optimizer = torch.optim.Adadelta(net.parameters(), lr=settings.lr, rho=settings.rho,
                                     eps=settings.eps)
    loss = RenderLoss(FaceRenderer(world.face, world.embedding, dfr.layout), data.image_size,
                      RenderLossWeights(settings.w_landmarks), settings.supersample)
    objective = RigNetObjective(net, dfr, loss, settings)
    run.mkdir(parents=True, exist_ok=True)
    path, step = run / "checkpoint.pt", 0
    if path.is_file():
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    bar = Progress(settings.steps, "steering", start=step)
    while step < settings.steps:
        pairs = Pairs(data, settings, step)
        set_lr(optimizer, scheduled_lr(settings.lr, step, settings.steps, settings.lr_decay))
        size = data.image_size
        terms = objective(data.w(pairs.w_index, "cpu"), data.w(pairs.v_index, "cpu"),
                          data.targets(pairs.w_index, size, "cpu"),
                          data.targets(pairs.v_index, size, "cpu"), pairs.modes)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        step += 1
        bar.update(1, loss=float(terms["loss"].detach()))
        if step % 250 == 0 or step == settings.steps:
            write_torch_file({"step": step, "model": net.state_dict(),
                              "optimizer": optimizer.state_dict()}, path)
    bar.close()
    return net.eval()


def truth_judged_runs(args) -> dict[str, tuple[Path, float]]:
    """Row label -> (run folder, L_rec weight) for each ``--truth-w-rec``."""
    return {("truth-judged" if w == 1 else f"truth-judged, L_rec {w:g}"):
            (args.out / ("rignet_truth-judged" if w == 1 else f"rignet_truth-judged-rec{w:g}"), w)
            for w in args.truth_w_rec}


def train_truth_judged(args, run: Path, world: TruthWorld, w_rec: float,
                       label: str = "truth-judged") -> None:
    """The paper's RigNet trained with the world's truth M as its judge instead of F: the
    recipe's L_control (``control_terms``) on M's parameters of the edit plus
    ``w_rec`` x L_rec, no rendering, optimised hard (Adam, 32 pairs x 20 000 steps,
    about 3 min; 80 times the pairs of the F-judged RigNets at the defaults). What a perfect F
    would let the recipe's network and L_rec reach: the bound the F-judged rows are read
    against. Writes ``rignet.safetensors`` when done."""
    path = run / "rignet.safetensors"
    if path.is_file():
        return
    data = TrainingData(args.out / "corpus")
    layout = world.layout.control_layout()
    steps, pairs = (2000, 8) if args.quick else (20000, 32)
    modes = list(MODES)
    torch.manual_seed(0)
    net = RigNet(world.num_ws, world.w_dim, RigNetSettings().latent_dim, layout=layout)
    with torch.no_grad():
        net.set_control_statistics(world.truth(data.w(data.sample(4096), "cpu")).controls(layout))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    bar = Progress(steps, label)
    for step in range(steps):
        set_lr(optimizer, scheduled_lr(1e-3, step, steps, 0.5))
        w = data.w(data.batch(0, step, 2 * pairs), "cpu")
        w, v = w[:pairs], w[pairs:]
        with torch.no_grad():
            c_w, c_v = world.truth(w).controls(layout), world.truth(v).controls(layout)
        chosen = [modes[k] for k in rng.integers(0, len(modes), pairs)]
        request = mix_controls(c_w, c_v, chosen, layout)
        control = sum(control_terms(((world.truth(net(w, request)).controls(layout) - request)
                                     / net.control_scale) ** 2, chosen, layout))
        loss = control + w_rec * (net(w, c_w) - w).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1, loss=float(loss.detach()))
    bar.close()
    run.mkdir(parents=True, exist_ok=True)
    save_rignet(net.eval(), path, {"judge": "truth world", "w_rec": str(w_rec)})


# --------------------------------------------------------------------------------------------
# The pipeline, through the CLI

REDONE = ("evaluate-latent", "evaluate-image", "measure")       # by every run, not resumed


def add_time(timings: dict, name: str, t: float, cpu: float) -> None:
    """Record a stage's wall and CPU time since (``t``, ``cpu``). Training stages resume, so
    their times add up over the runs into the folder (one found done adds only its check);
    the evaluations and the measurement are redone and replace theirs."""
    wall, used = time.time() - t, time.process_time() - cpu
    if name in timings and name not in REDONE:
        wall, used = wall + timings[name]["wall_s"], used + timings[name]["cpu_s"]
    timings[name] = {"wall_s": round(wall, 1), "cpu_s": round(used, 1)}


def run_stage(name: str, argv: list[str], timings: dict) -> None:
    print(f"\n$ python -m server.training.stylerig {' '.join(argv)}", flush=True)
    t, cpu = time.time(), time.process_time()
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"stage {name} failed with exit code {code}")
    add_time(timings, name, t, cpu)


def face_options(args) -> list[str]:
    return ["--face-model", args.face_model] + (["--embedding", args.embedding]
                                                if args.embedding else [])


def train_everything(args, timings: dict) -> TruthWorld:
    out = args.out
    world_path = out / "world.safetensors"
    if not world_path.is_file():
        config = WorldConfig(face_model=args.face_model, embedding=args.embedding,
                             img_resolution=2 * args.image_size, num_ws=args.num_ws,
                             w_dim=args.w_dim, z_dim=args.w_dim)
        save_world(TruthWorld(config), world_path)
    world = load_world(world_path)
    corpus = str(out / "corpus")
    with serving_worlds():
        run_stage("corpus", ["corpus", "--generator", str(world_path), "--out", corpus,
                             "--count", str(args.count), "--image-size", str(args.image_size),
                             "--truncation", str(args.corpus_truncation), "--style-mixing",
                             str(args.style_mixing), "--batch-size", "64",
                             "--shard-size", "1000"], timings)
        landmarks_stage(args, out / "corpus", world, timings, "landmarks")
        dfr = out / "dfr" / "dfr.safetensors"
        run_stage("dfr", ["dfr", "--corpus", corpus, "--run", str(out / "dfr"),
                          *face_options(args), "--steps", str(args.dfr_steps),
                          "--batch-size", str(args.dfr_batch), "--lr", str(args.dfr_lr),
                          "--lr-decay", "0.5", "--log-every", "50",
                          "--checkpoint-every", "250", "--preview-every", "1000"], timings)
        for variant, extra in VARIANTS.items():
            if variant not in args.variants:
                continue
            if extra is None:
                t, cpu = time.time(), time.process_time()
                train_steering(args, out / f"rignet_{variant}", world, dfr)
                add_time(timings, variant, t, cpu)
                continue
            run_stage(variant, ["rignet", "--corpus", corpus, "--run",
                                str(out / f"rignet_{variant}"), "--dfr", str(dfr),
                                *face_options(args), "--steps", str(args.rignet_steps),
                                "--batch-size", str(args.rignet_batch), "--lr-decay", "0.5",
                                *extra,
                                "--log-every", "50", "--checkpoint-every", "250",
                                "--preview-every", "1000"], timings)
        if {"refined", "control-only"} & set(args.variants):
            refine(args, world, timings)
        if "truth-judged" in args.variants:
            for label, (run, w_rec) in truth_judged_runs(args).items():
                t, cpu = time.time(), time.process_time()
                train_truth_judged(args, run, world, w_rec, label)
                add_time(timings, label, t, cpu)
        rignet = str(out / "rignet_full" / "rignet.safetensors")
        common = ["evaluate", "--corpus", corpus, "--dfr", str(dfr), "--rignet", rignet,
                  *face_options(args)]
        run_stage("evaluate-latent", common + ["--estimator", "latent", "--edits", "300",
                                               "--out", str(out / "eval_latent")], timings)
        if args.image_edits:
            run_stage("evaluate-image", common + ["--estimator", "image", "--edits",
                                                  str(args.image_edits), "--out",
                                                  str(out / "eval_image")], timings)
    return world


def landmarks_stage(args, corpus: Path, world, timings: dict, name: str) -> None:
    if (corpus / "landmarks.json").is_file():
        return
    if args.landmarks == "dlib":
        upsample = "1" if args.image_size < 100 else "0"
        run_stage(name, ["landmarks", "--corpus", str(corpus), "--upsample", upsample], timings)
    else:
        write_true_landmarks(corpus, world)
        (corpus / "landmarks.json").write_text('{"source": "truth-world"}')


def refine(args, world, timings: dict) -> None:
    """The refinement round (docs/stylerig_training.md): an edit corpus of the full RigNet
    (a third of the corpus' size), F refined on both corpora for a quarter of its steps
    (from a third of its learning rate down to zero), and RigNet trained again with it: as
    the recipe ('refined') and without rendering ('control-only')."""
    out, dfr = args.out, args.out / "dfr" / "dfr.safetensors"
    edits = out / "corpus_edits"
    run_stage("edits", ["corpus", "--generator", str(out / "world.safetensors"), "--out",
                        str(edits), "--count", str(args.count // 3), "--image-size",
                        str(args.image_size), "--truncation", str(args.corpus_truncation),
                        "--style-mixing", str(args.style_mixing), "--batch-size", "64",
                        "--shard-size", "1000", "--rignet",
                        str(out / "rignet_full" / "rignet.safetensors"), "--dfr", str(dfr)],
              timings)
    landmarks_stage(args, edits, world, timings, "edits-landmarks")
    refined_dfr = str(out / "dfr_refined" / "dfr.safetensors")
    run_stage("dfr-refined", ["dfr", "--corpus", str(out / "corpus"), "--also", str(edits),
                              "--init", str(dfr), "--run", str(out / "dfr_refined"),
                              *face_options(args), "--steps", str(args.dfr_steps // 4),
                              "--batch-size", str(args.dfr_batch), "--lr",
                              str(args.dfr_lr / 3), "--lr-decay", "1", "--log-every", "50",
                              "--checkpoint-every", "250", "--preview-every", "1000"], timings)
    if "refined" in args.variants:
        run_stage("refined", ["rignet", "--corpus", str(out / "corpus"), "--run",
                              str(out / "rignet_refined"), "--dfr", refined_dfr,
                              *face_options(args), "--steps", str(args.rignet_steps),
                              "--batch-size", str(args.rignet_batch), "--lr-decay", "0.5",
                              "--log-every", "50", "--checkpoint-every", "250",
                              "--preview-every", "1000"], timings)
    if "control-only" in args.variants:
        steps = args.rignet_steps * CONTROL_ONLY["steps"]
        run_stage("control-only", ["rignet", "--corpus", str(out / "corpus"), "--run",
                                   str(out / "rignet_control-only"), "--dfr", refined_dfr,
                                   *face_options(args), "--w-render", "0", "--steps", str(steps),
                                   "--batch-size", str(args.rignet_batch * CONTROL_ONLY["batch"]),
                                   "--lr-decay", "0.5", "--log-every", "200",
                                   "--checkpoint-every", str(steps // 10),
                                   "--preview-every", str(steps)], timings)


# --------------------------------------------------------------------------------------------
# Measurements against the truth

def load_variant(args, variant: str, world, dfr):
    if variant == "steering":
        data = TrainingData(args.out / "corpus")
        with torch.no_grad():
            controls = dfr(data.w(data.sample(4096), "cpu")).controls(
                dfr.layout.control_layout())
        net = SteeringNet(dfr, dfr.layout.control_layout(), world.num_ws, world.w_dim,
                          controls.std(0).clamp_min(1e-3))
        state = torch.load(args.out / f"rignet_{variant}" / "checkpoint.pt", weights_only=True)
        net.load_state_dict(state["model"])
        return net.eval()
    return load_rignet(args.out / f"rignet_{variant}" / "rignet.safetensors").eval()


@torch.no_grad()
def sweeps(world, net, dfr, w0: torch.Tensor) -> tuple[dict, list[list[np.ndarray]]]:
    """Interactive control on one identity ``w0`` [1, num_ws, w_dim]: yaw -30..30 degrees,
    expression coefficient 0 from -1 to 1, the light turned -50..50 degrees about the
    vertical axis. Returns the curves and the contact-sheet rows (generated, then target)."""
    layout = world.layout.control_layout()
    c0, p0 = dfr(w0).controls(layout), world.truth(w0)
    content, size = world.content(w0), world.img_resolution
    curves, rows = {}, []

    def run(name, values, edit_request, edit_truth, achieved):
        requests = torch.cat([edit_request(c0.clone(), v) for v in values])
        w_hat = net(w0.expand(len(values), -1, -1), requests)
        truth = world.truth(w_hat)
        curves[name] = {"requested": [float(v) for v in values],
                        "achieved": [float(a) for a in achieved(truth)],
                        "degradation": float(world.degradation(w_hat).max())}
        targets = [edit_truth(p0.map(torch.clone), v) for v in values]
        target_images = torch.cat([world.render(t, content, torch.zeros(1), size)
                                   for t in targets])
        rows.append(list(to_pipeline_images(world.synthesis(w_hat), size)))
        rows.append(list(to_pipeline_images(target_images, size)))

    yaws = [-30, -20, -10, 0, 10, 20, 30]

    def set_yaw(x, v):
        if isinstance(x, torch.Tensor):
            x[:, 1] = math.radians(v)
        else:
            x.global_pose[:, 1] = math.radians(v)
        return x
    run("yaw_deg", yaws, set_yaw, set_yaw, lambda t: rig_control.yaw_deg(t))

    smiles = [-1.0, -0.5, 0.0, 0.5, 1.0]
    e0 = layout.slices["expression"].start

    def set_request_expression(c, v):
        c[:, e0] = v
        return c

    def set_truth_expression(p, v):
        p.expression[:, 0] = v
        return p
    run("expression_0", smiles, set_request_expression, set_truth_expression,
        lambda t: t.expression[:, 0])

    turns = [-50, -25, 0, 25, 50]
    sh_slice = layout.slices["sh"]

    def turned(code: torch.Tensor, degrees: float) -> torch.Tensor:
        c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        rotation = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
        return torch.tensor(sh_code.rotate(code.double().numpy(), rotation),
                            dtype=torch.float32)

    def set_request_light(c, v):
        c[:, sh_slice] = turned(c[0, sh_slice].reshape(9, 3), v).reshape(1, 27)
        return c

    def set_truth_light(p, v):
        p.sh[0] = turned(p.sh[0], v)
        return p
    azimuth0 = float(rig_control.light_azimuth_deg(p0.sh)[0])
    run("light_turn_deg", turns, set_request_light, set_truth_light,
        lambda t: rig_control.light_azimuth_deg(t.sh) - azimuth0)
    return curves, rows


@torch.no_grad()
def measure(args, world) -> dict:
    dfr, _ = load_dfr(args.out / "dfr" / "dfr.safetensors")
    dfr.eval()
    w = rig_control.held_out_latents(world, args.eval_pairs, 0, TRUNCATION)
    v = w.roll(1, 0)
    spread = rig_control.natural_spread(world, w)
    # F where the edits land: edits of psi-0.7 faces reach the whitened distance of
    # untruncated samples.
    wide = rig_control.held_out_latents(world, args.eval_pairs, 0, 1.0)
    results = {"dfr": rig_control.dfr_accuracy(world, dfr, w),
               "dfr_untruncated": rig_control.dfr_accuracy(world, dfr, wide), "spread": spread,
               "control": {}, "sweeps": {}}
    sheet, nets = [], {}
    for variant in VARIANTS:
        if variant in args.variants:
            nets[variant] = load_variant(args, variant, world, dfr)
            results["control"][variant] = rig_control.measure_control(world, nets[variant],
                                                                      dfr, w, v, spread)
    if "full" in nets:           # the rig's case: the target's true values, not F's reading
        results["control"]["full, exact"] = rig_control.measure_control(
            world, nets["full"], dfr, w, v, spread, exact_request=True)
    best, best_dfr = ("full", dfr) if "full" in nets else (None, None)
    refined = [name for name in ("refined", "control-only") if name in args.variants]
    if refined:                      # requests as the refined F reads faces
        refined_dfr, _ = load_dfr(args.out / "dfr_refined" / "dfr.safetensors")
        refined_dfr.eval()
        results["dfr_refined"] = rig_control.dfr_accuracy(world, refined_dfr, w)
        results["dfr_refined_untruncated"] = rig_control.dfr_accuracy(world, refined_dfr, wide)
    for name in refined:
        nets[name] = load_rignet(args.out / f"rignet_{name}" / "rignet.safetensors").eval()
        for label, exact in ((name, False), (f"{name}, exact", True)):
            results["control"][label] = rig_control.measure_control(
                world, nets[name], refined_dfr, w, v, spread, exact_request=exact)
        best, best_dfr = name, refined_dfr
    if "truth-judged" in args.variants:  # requests as its judge, the truth, reads faces
        for label, (run, _) in truth_judged_runs(args).items():
            bound = load_rignet(run / "rignet.safetensors").eval()
            results["control"][label] = rig_control.measure_control(world, bound, world.truth,
                                                                    w, v, spread)
    # The light as images show it, against F's reading of the same faces.
    faces, steps = (8, 100) if args.quick else (64, 400)
    prior = json.loads((args.out / "dfr" / "settings.json").read_text())["w_albedo"]
    seen = w[:faces]
    results["light_from_images"] = {
        "faces": faces, "fit": rig_control.light_seen_in_images(world, seen, prior, steps,
                                                              args.image_size),
        "F": rig_control.light_error(world, dfr(seen).sh, seen),
        "baseline": spread["shading_rmse"]}
    if best is not None:
        results["sweeps"], sheet = sweeps(world, nets[best], best_dfr, w[:1])
        results["sweeps_of"] = best
    # One pose edit per variant, for the eye: w, v, then each variant's edit of w towards v.
    layout = world.layout.control_layout()
    pair_w, pair_v = w[1:4], v[1:4]
    request = mix_controls(dfr(pair_w).controls(layout), dfr(pair_v).controls(layout),
                           ["pose"] * 3, layout)
    size = world.img_resolution
    columns = [to_pipeline_images(world.synthesis(pair_w), size),
               to_pipeline_images(world.synthesis(pair_v), size)]
    columns += [to_pipeline_images(world.synthesis(net(pair_w, request)), size)
                for net in nets.values()]
    sheet += [[c[i] for c in columns] for i in range(3)]
    save_grid(sheet, args.out / "contact_sheet.png")
    results["contact_sheet_edit_columns"] = ["w", "v", *nets]
    return results


def report(results: dict, timings: dict, args) -> str:
    def accuracy(d: dict) -> str:
        return (f"pose {d['pose_deg']:.2f} deg, jaw {d['jaw_deg']:.2f} deg, expression r "
                f"{d['expression_r']:.3f} ({d['expression_mm']:.2f} mm), SH relative error "
                f"{d['sh_relative']:.3f}, shading relative error {d['shading_relative']:.3f}")

    f = json.loads((args.out / "dfr" / "settings.json").read_text())
    lines = [f"truth world: {args.face_model}, {args.count} corpus images at {args.image_size} px "
             f"(psi {args.corpus_truncation}), DFR {args.dfr_steps} steps x {args.dfr_batch} "
             f"(landmark term on {f.get('landmark_batch') or args.dfr_batch}, "
             f"{'heads' if f.get('heads') else 'one MLP'}), RigNet {args.rignet_steps} steps x {args.rignet_batch} "
             f"pairs; {args.landmarks} landmarks; {args.eval_pairs} held-out pairs (psi "
             f"{TRUNCATION})",
             "", "DFR accuracy, F(w) against M(w) on held-out latents:",
             f"  psi {TRUNCATION}: {accuracy(results['dfr'])}",
             f"  untruncated (where edits land): {accuracy(results['dfr_untruncated'])}"]
    if "dfr_refined" in results:
        lines += ["  refined F (the 'refined' rows), psi "
                  f"{TRUNCATION}: {accuracy(results['dfr_refined'])}",
                  f"  refined F, untruncated: {accuracy(results['dfr_refined_untruncated'])}"]
    lines += ["", "Control (true parameters of the edit against the target; in brackets the "
              "no-edit baseline; a perfect edit scores 0) and preservation (how far the "
              "untouched quantities moved, relative to the spread between two faces: 0 = "
              "kept). The request carries the variant's F's reading of the target face, "
              "except in the 'exact' rows: its true values, as a rig's user dials them and "
              "the backend passes them (through RigNet's light map):",
              rig_control.format_control_table(list(results["control"].items()))]
    if "light_from_images" in results:
        seen = results["light_from_images"]
        lines.append(f"light as images show it ({seen['faces']} held-out faces): fitted to each "
                     f"image with the true geometry, albedo unknown: shading_rmse "
                     f"{seen['fit']:.3g}; F's reading {seen['F']:.3g} (no-edit baseline "
                     f"{seen['baseline']:.3g})")
    if results["sweeps"]:
        lines.append(f"sweeps of the '{results.get('sweeps_of', 'full')}' RigNet:")
    for name, curve in results["sweeps"].items():
        lines.append(f"sweep {name}: requested {curve['requested']} -> achieved "
                     f"{[round(a, 2) for a in curve['achieved']]} (max degradation "
                     f"{curve['degradation']:.3f})")
    lines.append("")
    lines.append("stage times (training stages summed over every run into this folder):")
    lines += [f"  {stage}: {t['wall_s']} s wall, {t['cpu_s']} s CPU" for stage, t in
              timings.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rignet_control"))
    parser.add_argument("--face-model", default="demo")
    parser.add_argument("--embedding", default=None)
    parser.add_argument("--landmarks", default="truth", choices=("dlib", "truth"),
                        help="'truth': the world's exact landmarks (a perfect detector); "
                             "'dlib': the landmarks stage (about 1.3 px of error at 64 px)")
    parser.add_argument("--count", type=int, default=96000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-ws", type=int, default=10)
    parser.add_argument("--w-dim", type=int, default=64)
    parser.add_argument("--style-mixing", type=float, default=0.9)
    parser.add_argument("--corpus-truncation", type=float, default=1.0,
                        help="the corpus' truncation psi (the edited faces use %s): F must "
                             "judge RigNet's edits, which leave the truncated region" % TRUNCATION)
    parser.add_argument("--dfr-steps", type=int, default=4000)
    parser.add_argument("--dfr-batch", type=int, default=16)
    parser.add_argument("--dfr-lr", type=float, default=1e-3)
    parser.add_argument("--rignet-steps", type=int, default=2000)
    parser.add_argument("--rignet-batch", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=CHOICES, choices=CHOICES,
                        help="'refined' and 'control-only' need 'full'")
    parser.add_argument("--truth-w-rec", type=float, nargs="+", default=[1.0],
                        help="L_rec's weights for 'truth-judged', one row each (the "
                             "recipe's: 1)")
    parser.add_argument("--eval-pairs", type=int, default=256)
    parser.add_argument("--image-edits", type=int, default=30,
                        help="edits for evaluate --estimator image (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="the tests' sphere head, 32 px, a few hundred steps")
    args = parser.parse_args()
    if args.quick:
        face, embedding = write_test_face(args.out.mkdir(parents=True, exist_ok=True) or args.out)
        args.face_model, args.embedding, args.landmarks = str(face), str(embedding), "truth"
        args.count, args.image_size, args.num_ws, args.w_dim = 1024, 32, 6, 32
        args.dfr_steps, args.rignet_steps, args.image_edits = 400, 200, 0
    import numba                  # its thread pool resets torch's count when it starts
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stored = args.out / "results.json"
    timings: dict = json.loads(stored.read_text())["timings"] if stored.is_file() else {}
    world = train_everything(args, timings)
    t, cpu = time.time(), time.process_time()
    results = measure(args, world)
    add_time(timings, "measure", t, cpu)
    text = report(results, timings, args)
    print("\n" + text)
    (args.out / "report.txt").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"results": results, "timings": timings,
                                                       "settings": {k: str(v) for k, v in
                                                                    vars(args).items()}},
                                                      indent=2))


if __name__ == "__main__":
    main()
