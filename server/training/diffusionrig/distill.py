"""Progressive distillation of a DiffusionRig model into a few-step student.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR 2022),
on the deterministic DDIM trajectories of the teacher, with the teacher's own conditioning:

* Conditions: random rig parameters (head turn, jaw, expression, SH light around the rig's
  defaults) rendered to DECA buffers as the backend renders them, and global latents drawn
  around those of the photos the teacher was personalised on (random convex mixtures of
  them plus a little noise), or N(0, I) without photos. No photo is needed, so data is
  free: every trajectory gets new rigs, latents and noise (``ConditionSource``), and the
  student never sees the same condition twice for long (a pool of trajectories, refreshed
  in batches as training goes).
* A stage maps the teacher's DDIM grid to ``steps`` of its times (one stage 20 -> 2 by
  default; ``stages`` such as (10, 5, 2) halve progressively, each stage's teacher the
  previous student). The student starts as a copy of its teacher and learns to make one
  DDIM step from x_a (time a of its grid) to the teacher's state x_b at its next grid time
  b (the teacher's sample after the last): DDIM maps a prediction x0 to x_b = (alpha_b -
  sigma_b alpha_a / sigma_a) x0 + (sigma_b / sigma_a) x_a, so the target is the paper's
  x0* = (x_b - (sigma_b / sigma_a) x_a) / (alpha_b - sigma_b alpha_a / sigma_a).
* Loss: the x0 error with the paper's truncated-SNR weight max(alpha^2 / sigma^2, 1)
  (eq. 9), measured after clipping x0 to [-1, 1] as the sampler does, with a
  straight-through gradient. Every target lies in [-1, 1] (a run of DDIM steps equals one
  step whose x0 is a convex mix of the run's clipped x0s), and an eps-predicting network's
  x0 error is its eps error times sigma / alpha, about 95 at t = 950: clipping keeps those
  pixels from swamping the loss without stopping their gradient (the student keeps the
  teacher's eps output, so its checkpoint and sampler stay the teacher's). Adam, gradients
  clipped to norm 1; the student returned is the moving average of its weights.
* The student keeps the teacher's architecture and state-dict names; its ``.safetensors``
  file carries the student grid (``server.diffusion.distilled``), which
  ``diffusionrig.sampler=distilled`` reads. The file is written atomically. At the end the
  command samples ``--check`` held-out conditions and prints the RMS difference to the
  teacher's DDIM-20 samples of the student, of the teacher's DDIM on the student's grid,
  and on twice as many steps.

    python -m server.training.diffusionrig.distill TEACHER.pt OUT.safetensors [--steps 2]

At tiny scale on the CPU (``bench/bench_distill.py``, docs/performance.md) the 2-step student
lands within about the error of the teacher's own DDIM-4 on held-out conditions, well under
that of its DDIM-2. Full size on one GPU (256 px, 132M-parameter UNet, about 0.56 TFLOP per
image and UNet pass): the defaults draw 1024 + 250 x 64 = 17k teacher trajectories of 20
steps (about 0.19 EFLOP) and train 4000 iterations of batch 16 at about 3 passes each (0.11
EFLOP): about 0.3 EFLOP, 25-50 minutes on an H100 at an effective 100-200 TFLOP/s (TF32 on;
an estimate from the FLOP count, not measured).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from portrait_rig.files import atomic_path
from portrait_rig.params import RigParams
from server.diffusion import NoiseSchedule, ddim_sample, distilled_sample
from server.diffusion.distilled import distilled_metadata, student_grid
from server.models.diffusionrig import DiffusionRig


@dataclass
class DistillConfig:
    """Hyper-parameters. ``stages``: the student step counts, each a subset of the previous
    grid (the first stage starts from the teacher's ``teacher_steps`` DDIM grid).

    Per stage: ``pool`` trajectories of the stage's teacher on fresh random conditions and
    noise are drawn first; every ``refresh_every`` iterations the ``fresh`` oldest are
    replaced by new ones (in one batch: the teacher runs far faster batched), and every
    iteration trains on ``batch_size`` (trajectory, student step) pairs drawn from the pool.
    The
    student returned is the exponential moving average (``ema`` per iteration) of the
    weights trained."""
    teacher_steps: int = 20
    stages: tuple[int, ...] = (2,)
    iterations: int = 4000
    batch_size: int = 16
    pool: int = 1024
    fresh: int = 64
    refresh_every: int = 16
    lr: float = 1e-4
    ema: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100


# ---------------------------------------------------------------------------- conditions

def random_rig(generator: np.random.Generator, n_expression: int) -> RigParams:
    """Rig parameters around the neutral rig: head turns up to ~30 degrees, jaw, expression
    coefficients ~ N(0, 1), the default SH light scaled and tinted a little."""
    params = RigParams()
    params.pose.global_ = list(generator.normal(0, [0.15, 0.3, 0.05]))
    params.pose.jaw = [float(abs(generator.normal(0, 0.1))), 0.0, 0.0]
    params.expression = list(generator.normal(0, 1.0, size=min(n_expression, 10)))
    gain = generator.uniform(0.7, 1.3) * generator.uniform(0.9, 1.1, size=3)
    params.lighting.sh = [[v * g for v, g in zip(row, gain)] for row in params.lighting.sh]
    return params


def random_latents(count: int, dim: int, generator: torch.Generator,
                   bank: torch.Tensor | None = None, spread: float = 0.05) -> torch.Tensor:
    """[count, dim] global latents: convex mixtures of the rows of ``bank`` (the latents of
    the teacher's own photos) plus N(0, spread^2) noise, or N(0, I) without a bank."""
    if bank is None or len(bank) == 0:
        return torch.randn(count, dim, generator=generator)
    # Flat Dirichlet weights: normalised exponential draws.
    weights = -torch.rand(count, len(bank), generator=generator).clamp_min(1e-12).log()
    weights = weights / weights.sum(dim=1, keepdim=True)
    return weights @ bank.float() + spread * torch.randn(count, dim, generator=generator)


def render_conditions(buffer_renderer, rigs: list[RigParams], size: int) -> torch.Tensor:
    """DECA conditioning buffers [N, 9, size, size] of ``rigs``, as the backend renders them
    (``server.renderer.deca.DecaBufferRenderer``)."""
    codes = buffer_renderer.codes(rigs, size, size)
    return buffer_renderer.conditioning(buffer_renderer.render(codes, size))


# ----------------------------------------------------------------------------- training

def trajectories(model: DiffusionRig, noise, buffers, z, schedule, grid,
                 chunk: int = 16) -> torch.Tensor:
    """The teacher's DDIM states [len(grid) + 1, N, 3, S, S]: x at each grid time, then its
    final x0 (deterministic: noise, buffers and z fix them)."""
    states = []
    for start in range(0, len(noise), chunk):
        part = slice(start, start + chunk)
        inputs = []

        def denoise(x, t, part=part, inputs=inputs):
            inputs.append(x)  # ddim_sample calls the model once per grid time, in order
            return model(x, t, buffers[part], z[part])
        x0 = ddim_sample(denoise, noise[part], schedule, grid)
        states.append(torch.stack(inputs + [x0]))
    return torch.cat(states, dim=1)


def ddim_target(x_a, x_b, abar_a, abar_b) -> torch.Tensor:
    """The x0 whose DDIM step from x_a at abar_a lands on x_b at abar_b (abar_b = 1: clean
    data, the target is x_b). abar: floats, or tensors broadcasting against x."""
    abar_a, abar_b = torch.as_tensor(abar_a, dtype=x_a.dtype), torch.as_tensor(abar_b,
                                                                              dtype=x_a.dtype)
    alpha_a, sigma_a = abar_a.sqrt(), (1 - abar_a).sqrt()
    alpha_b, sigma_b = abar_b.sqrt(), (1 - abar_b).sqrt()
    return (x_b - (sigma_b / sigma_a) * x_a) / (alpha_b - sigma_b * alpha_a / sigma_a)


def x0_weight(abar) -> torch.Tensor:
    """Truncated-SNR weighting of an x0 error (Salimans & Ho, eq. 9): max(SNR, 1), i.e. the
    x0 error where the signal dominates, the eps error at alpha / sigma times it elsewhere,
    never below the x0 error itself."""
    abar = torch.as_tensor(abar)
    return (abar / (1 - abar)).clamp_min(1.0)


class ConditionSource:
    """Fresh random conditions: ``draw(n)`` renders ``n`` new random rigs (``random_rig``)
    to DECA buffers at ``size`` px and draws ``n`` global latents (``random_latents``, around
    ``bank`` when given). Deterministic from ``seed``."""

    def __init__(self, buffer_renderer, size: int, latent_dim: int, seed: int = 0,
                 bank: torch.Tensor | None = None, device: str | torch.device = "cpu",
                 chunk: int = 32):
        self.renderer, self.size, self.latent_dim = buffer_renderer, size, latent_dim
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.bank, self.device, self.chunk = bank, torch.device(device), chunk
        self.n_expression = buffer_renderer.model.n_expression

    def rigs(self, count: int) -> list[RigParams]:
        return [random_rig(self.rng, self.n_expression) for _ in range(count)]

    @torch.no_grad()
    def render(self, rigs: list[RigParams]) -> torch.Tensor:
        return torch.cat([render_conditions(self.renderer, rigs[i:i + self.chunk], self.size)
                          for i in range(0, len(rigs), self.chunk)]).to(self.device)

    def latents(self, count: int) -> torch.Tensor:
        return random_latents(count, self.latent_dim, self.generator, self.bank).to(self.device)

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.render(self.rigs(count)), self.latents(count)


class _Pool:
    """A FIFO of teacher trajectories: states at the student's grid times [P, steps + 1, ...]
    (the last: the teacher's sample), with their buffers and latents."""

    def __init__(self, states, buffers, z):
        self.states, self.buffers, self.z = states, buffers, z
        self.next = 0

    def replace(self, states, buffers, z) -> None:
        rows = (self.next + torch.arange(len(states))) % len(self.states)
        self.states[rows], self.buffers[rows], self.z[rows] = states, buffers, z
        self.next = int(rows[-1] + 1) % len(self.states)


def distil_stage(teacher: DiffusionRig, teacher_grid: list[int], steps: int,
                 source: ConditionSource, schedule: NoiseSchedule, config: DistillConfig,
                 log=print, monitor=None) -> tuple[DiffusionRig, list[int]]:
    """One stage: a student (initialised from ``teacher``) whose DDIM step between two
    times of ``student_grid(teacher_grid, steps)`` lands where the teacher's DDIM steps in
    between land, on the teacher's trajectories from fresh conditions (``source``) and
    noise. Returns the student's moving average (eval mode) and its grid. ``monitor(model,
    grid)``, when given, is called at every log line and its string appended."""
    grid = student_grid(teacher_grid, steps)
    where = [teacher_grid.index(t) for t in grid] + [len(teacher_grid)]  # state per grid time
    size = teacher.config.image_size
    generator = torch.Generator().manual_seed(config.seed + 1000 * steps)
    teacher = teacher.eval()

    @torch.no_grad()
    def new_trajectories(count: int):
        buffers, z = source.draw(count)
        noise = torch.randn(count, 3, size, size, generator=generator).to(buffers.device)
        states = trajectories(teacher, noise, buffers, z, schedule, teacher_grid)
        return states[where].transpose(0, 1).contiguous(), buffers, z

    pool = _Pool(*new_trajectories(config.pool))
    device = pool.states.device
    abar = torch.tensor([schedule.alpha_bar(t) for t in grid] + [1.0], device=device)
    times = torch.tensor(grid, device=device)

    student = copy.deepcopy(teacher).train()
    for module in student.modules():  # deterministic student: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    student.requires_grad_(False).denoisingUNet.requires_grad_(True)  # the encoder stays
    params = list(student.denoisingUNet.parameters())
    average = copy.deepcopy(student).eval()
    averaged = list(average.denoisingUNet.parameters())
    optimiser = torch.optim.Adam(params, lr=config.lr)
    started = time.perf_counter()
    for iteration in range(config.iterations):
        if config.fresh and iteration and iteration % config.refresh_every == 0:
            pool.replace(*new_trajectories(config.fresh))
        rows = torch.randint(len(pool.states), [config.batch_size], generator=generator)
        step = torch.randint(steps, [config.batch_size], generator=generator)
        rows, step = rows.to(device), step.to(device)
        x_a, x_b = pool.states[rows, step], pool.states[rows, step + 1]
        a, b = abar[step].view(-1, 1, 1, 1), abar[step + 1].view(-1, 1, 1, 1)
        target = ddim_target(x_a, x_b, a, b)
        eps = student(x_a, times[step], pool.buffers[rows], pool.z[rows])
        x0 = (x_a - (1 - a).sqrt() * eps) / a.sqrt()
        # The sampler clips x0 to [-1, 1] and every target lies there (a run of DDIM steps
        # equals one step whose x0 is a convex mix of the run's clipped x0s): measure the
        # error after clipping, with the unclipped value's gradient (straight through), so
        # that far-off pixels at low SNR neither dominate the loss nor stop learning.
        x0 = x0 + (x0.clamp(-1, 1) - x0).detach()
        loss = (x0_weight(a) * (x0 - target).square()).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimiser.step()
        with torch.no_grad():
            decay = min(config.ema, (1 + iteration) / (10 + iteration))
            torch._foreach_lerp_(averaged, params, 1 - decay)
        if log and config.log_every and (iteration + 1) % config.log_every == 0:
            note = f", {monitor(average, grid)}" if monitor else ""
            log(f"stage {len(teacher_grid)} -> {steps}: iteration {iteration + 1}, "
                f"loss {loss.item():.5f}, {time.perf_counter() - started:.0f} s{note}")
    return average.eval(), grid


@torch.no_grad()
def held_out_errors(teacher: DiffusionRig, student: DiffusionRig, grid: list[int],
                    schedule: NoiseSchedule, buffers, z, noise, chunk: int = 16
                    ) -> dict[str, float]:
    """RMS differences (images in [-1, 1]) to the teacher's DDIM-20 samples of the student
    on ``grid``, of the teacher's DDIM on ``grid`` and on twice as many steps, under the
    given conditions and initial noise."""
    reference_grid = schedule.respaced(20)
    runs = {"reference": (teacher, reference_grid, ddim_sample),
            f"student, {len(grid)} steps": (student, grid, distilled_sample),
            f"teacher DDIM-{len(grid)}": (teacher, grid, ddim_sample),
            f"teacher DDIM-{2 * len(grid)}": (teacher, student_grid(reference_grid,
                                                                     2 * len(grid)),
                                              ddim_sample)}
    out = {}
    for name, (model, timesteps, sampler) in runs.items():
        out[name] = torch.cat([
            sampler(lambda x, t, p=part: model(x, t, buffers[p], z[p]), noise[part],
                    schedule, timesteps)
            for part in (slice(i, i + chunk) for i in range(0, len(noise), chunk))])
    reference = out.pop("reference")
    return {name: (x - reference).square().mean().sqrt().item() for name, x in out.items()}


def distil(teacher: DiffusionRig, source: ConditionSource, schedule: NoiseSchedule,
           config: DistillConfig, log=print, monitor=None) -> tuple[DiffusionRig, list[int]]:
    """The student of the last stage and its grid; every stage's teacher is the previous
    stage's student (the first: ``teacher`` on its DDIM grid of ``config.teacher_steps``)."""
    grid = schedule.respaced(config.teacher_steps)
    model = teacher
    for steps in config.stages:
        model, grid = distil_stage(model, grid, steps, source, schedule, config, log, monitor)
    return model, grid


def save_student(student: DiffusionRig, grid: list[int], path: str | Path, teacher_grid,
                 stages, teacher: str) -> Path:
    """Write the student's state dict (float32, official names) with its tag, atomically:
    a half-written file is never left where the backend would pick it up."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a distilled student is written as .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()
               if v.is_floating_point()}
    tensors.update({k: v.cpu().contiguous() for k, v in student.state_dict().items()
                    if not v.is_floating_point()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=distilled_metadata(grid, teacher_grid, stages, teacher))
    return path


# ---------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    from server.checkpoints.diffusionrig import load_diffusionrig
    from server.renderer.deca import DecaBufferRenderer
    from server.renderer.face_model import FaceModel
    from server.renderer.texture import choose_texture
    from portrait_rig.face_source import load_face_data

    defaults = DistillConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", help="stage-1 or personal checkpoint (model.pt)")
    ap.add_argument("out", help="student file to write (.safetensors)")
    ap.add_argument("--steps", type=int, default=defaults.stages[-1],
                    help="student steps")
    ap.add_argument("--halve", action="store_true",
                    help="progressive stages halving the teacher's 20 steps down to --steps "
                         "(20 -> 10 -> 5 -> 2) instead of one stage")
    ap.add_argument("--latents", default=None,
                    help="a .pt/.npy [K, 64] of the teacher's photo latents (default N(0, I))")
    ap.add_argument("--model", default="demo", help="face model source (demo or a file)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=defaults.iterations,
                    help="iterations per stage")
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--pool", type=int, default=defaults.pool,
                    help="teacher trajectories kept per stage")
    ap.add_argument("--fresh", type=int, default=defaults.fresh,
                    help="new trajectories (fresh rigs, latents, noise) per refresh")
    ap.add_argument("--refresh-every", type=int, default=defaults.refresh_every,
                    help="iterations between refreshes of the pool")
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--ema", type=float, default=defaults.ema)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--check", type=int, default=32,
                    help="held-out conditions sampled at the end to print the errors (0: none)")
    args = ap.parse_args(argv)

    stages, n = [], defaults.teacher_steps
    while args.halve and n // 2 > args.steps:
        n //= 2
        stages.append(n)
    config = DistillConfig(stages=(*stages, args.steps),
                           iterations=args.iterations, batch_size=args.batch_size,
                           pool=args.pool, fresh=args.fresh, refresh_every=args.refresh_every,
                           lr=args.lr, ema=args.ema, seed=args.seed)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    teacher = load_diffusionrig(args.teacher, None, device, args.resolution)
    face_model = FaceModel(load_face_data(args.model), device)
    renderer = DecaBufferRenderer(face_model, choose_texture("auto", face_model.triangles.shape[0],
                                                             device))
    bank = None
    if args.latents:
        bank = (torch.from_numpy(np.load(args.latents)) if args.latents.endswith(".npy")
                else torch.load(args.latents, weights_only=True)).reshape(-1, 64)
    source = ConditionSource(renderer, args.resolution, teacher.config.latent_dim, args.seed,
                             bank, device)
    student, grid = distil(teacher, source, NoiseSchedule.linear(), config)
    teacher_grid = NoiseSchedule.linear().respaced(config.teacher_steps)
    save_student(student, grid, args.out, teacher_grid, config.stages, str(args.teacher))
    print(f"wrote {args.out}: {len(grid)}-step student, timesteps {grid}")
    if args.check:
        held_out = ConditionSource(renderer, args.resolution, teacher.config.latent_dim,
                                   args.seed + 1_000_003, bank, device)
        buffers, z = held_out.draw(args.check)
        noise = torch.randn(args.check, 3, args.resolution, args.resolution,
                            generator=torch.Generator().manual_seed(args.seed + 1_000_003))
        errors = held_out_errors(teacher, student, grid, NoiseSchedule.linear(), buffers, z,
                                 noise.to(device))
        print(f"{args.check} held-out conditions, RMS difference to the teacher's DDIM-20: "
              + ", ".join(f"{name} {value:.4f}" for name, value in errors.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
