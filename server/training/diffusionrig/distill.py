"""Progressive distillation of a DiffusionRig model into a few-step student.

Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models" (ICLR 2022),
on the deterministic DDIM trajectories of the teacher, with the teacher's own conditioning:

* Conditions: random rig parameters (head turn, jaw, expression, SH light around the rig's
  defaults) rendered to DECA buffers as the backend renders them, and global latents drawn
  around those of the photos the teacher was personalised on (random convex mixtures of
  them plus a little noise), or N(0, I) without photos. No photo is needed.
* Each stage halves the number of steps (20 -> 10 -> 5 -> 2 by default): the current
  teacher runs its DDIM grid from fixed noise and every state x_t along the way is kept;
  the student, initialised from the teacher, learns to make one DDIM step from x_a (time a
  of its grid) to the teacher's state x_b at its next grid time b (clean data after the
  last). DDIM maps a prediction x0 to x_b = (alpha_b - sigma_b alpha_a / sigma_a) x0 +
  (sigma_b / sigma_a) x_a, so the target is x0* = (x_b - (sigma_b / sigma_a) x_a) /
  (alpha_b - sigma_b alpha_a / sigma_a). The loss is the error of the student's landing
  point, i.e. its x0 error times (alpha_b - sigma_b alpha_a / sigma_a), measured after
  clipping x0 to [-1, 1] as the sampler does (the teacher clips, so every target is a convex
  mix of clipped predictions and lies there) with a straight-through gradient: an
  eps-predicting network's x0 error is its eps error times sigma_a / alpha_a, about 12 at
  the first step, which would otherwise swamp the loss (the paper switches to v-prediction
  for that reason). Adam, gradients clipped to norm 1.
* The student keeps the teacher's architecture and state-dict names; its ``.safetensors``
  file carries the student grid (``server.diffusion.distilled``), which
  ``diffusionrig.sampler=distilled`` reads. The file is written atomically.

    python -m server.training.diffusionrig.distill TEACHER.pt OUT.safetensors [--steps 2]

Full size on one GPU (256 px, 132M-parameter UNet, about 0.56 TFLOP per image and UNet pass;
float32): with the defaults (1024 conditions; stages 20 -> 10 -> 5 -> 2, each 2000 iterations
of batch 8, a training pass costing about 3 forward passes) about 80 PFLOP of training and
20 PFLOP of teacher trajectories: roughly 15 minutes to an hour on an H100, depending on
whether float32 matrix products run as TF32 (an estimate from the FLOP count, not measured).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from portrait_rig.params import RigParams
from server.diffusion import NoiseSchedule, ddim_sample
from server.diffusion.distilled import distilled_metadata, student_grid
from server.models.diffusionrig import DiffusionRig


@dataclass
class DistillConfig:
    """Hyper-parameters. ``stages``: the student step counts, each a subset of the previous
    grid (the first stage starts from the teacher's ``teacher_steps`` DDIM grid)."""
    teacher_steps: int = 20
    stages: tuple[int, ...] = (10, 5, 2)
    conditions: int = 1024
    iterations: int = 2000
    batch_size: int = 8
    lr: float = 1e-5
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


def ddim_target(x_a, x_b, abar_a: float, abar_b: float) -> torch.Tensor:
    """The x0 whose DDIM step from x_a at abar_a lands on x_b at abar_b."""
    alpha_a, sigma_a = math.sqrt(abar_a), math.sqrt(1 - abar_a)
    alpha_b, sigma_b = math.sqrt(abar_b), math.sqrt(1 - abar_b)
    return (x_b - (sigma_b / sigma_a) * x_a) / (alpha_b - sigma_b * alpha_a / sigma_a)


def distil_stage(teacher: DiffusionRig, teacher_grid: list[int], steps: int, noise, buffers,
                 z, schedule: NoiseSchedule, config: DistillConfig, log=print
                 ) -> tuple[DiffusionRig, list[int]]:
    """One halving: a student (a copy of ``teacher``) for ``student_grid(teacher_grid,
    steps)``, trained on the teacher's trajectories from ``noise`` under (buffers, z);
    returns it (eval mode) and its grid."""
    grid = student_grid(teacher_grid, steps)
    with torch.no_grad():
        states = trajectories(teacher.eval(), noise, buffers, z, schedule, teacher_grid)
    where = [teacher_grid.index(t) for t in grid] + [len(teacher_grid)]  # state index per step
    abar = [schedule.alpha_bar(t) for t in grid] + [1.0]
    student = copy.deepcopy(teacher).train()
    for module in student.modules():  # deterministic student: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    student.requires_grad_(False).denoisingUNet.requires_grad_(True)  # the encoder stays
    params = list(student.denoisingUNet.parameters())
    optimiser = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + steps)
    device = noise.device
    started = time.perf_counter()
    for iteration in range(config.iterations):
        rows = torch.randint(len(noise), [config.batch_size], generator=generator).to(device)
        step = torch.randint(len(grid), [config.batch_size], generator=generator)
        x_a = torch.stack([states[where[s], r] for s, r in zip(step.tolist(), rows.tolist())])
        x_b = torch.stack([states[where[s + 1], r] for s, r in zip(step.tolist(),
                                                                     rows.tolist())])
        target = torch.stack([ddim_target(x_a[i], x_b[i], abar[s], abar[s + 1])
                              for i, s in enumerate(step.tolist())])
        a = torch.tensor([abar[s] for s in step.tolist()], device=device)[:, None, None, None]
        b = torch.tensor([abar[s + 1] for s in step.tolist()], device=device)[:, None, None, None]
        t = torch.tensor([grid[s] for s in step.tolist()], device=device)
        eps = student(x_a, t, buffers[rows], z[rows])
        x0 = (x_a - (1 - a).sqrt() * eps) / a.sqrt()
        # The sampler clips x0 to [-1, 1] (every target lies there): measure the error after
        # clipping, with the gradient of the unclipped value (straight through), so that
        # far-off pixels of the noisiest step neither dominate the loss nor stop learning.
        x0 = x0 + (x0.clamp(-1, 1) - x0).detach()
        # Error where the step lands: the x0 error times DDIM's coefficient of x0.
        reach = b.sqrt() - (1 - b).sqrt() * a.sqrt() / (1 - a).sqrt()
        loss = (reach * (x0 - target)).square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimiser.step()
        if log and config.log_every and (iteration + 1) % config.log_every == 0:
            log(f"stage {len(teacher_grid)} -> {steps}: iteration {iteration + 1}, "
                f"loss {loss.item():.5f}, {time.perf_counter() - started:.0f} s")
    return student.eval(), grid


def distil(teacher: DiffusionRig, conditions: tuple[torch.Tensor, torch.Tensor],
           schedule: NoiseSchedule, config: DistillConfig, log=print
           ) -> tuple[DiffusionRig, list[int]]:
    """The student of the last stage and its grid. conditions: (buffers [N, 9, S, S],
    z [N, latent_dim]); the initial noise of each condition is fixed from ``config.seed``."""
    buffers, z = conditions
    size = teacher.config.image_size
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(len(buffers), 3, size, size, generator=generator).to(buffers.device)
    grid = schedule.respaced(config.teacher_steps)
    model = teacher
    for steps in config.stages:
        model, grid = distil_stage(model, grid, steps, noise, buffers, z, schedule, config, log)
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=distilled_metadata(grid, teacher_grid, stages, teacher))
    os.replace(tmp, path)
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
                    help="student steps (stages halve from 20 down to this)")
    ap.add_argument("--latents", default=None,
                    help="a .pt/.npy [K, 64] of the teacher's photo latents (default N(0, I))")
    ap.add_argument("--model", default="demo", help="face model source (demo or a file)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--conditions", type=int, default=defaults.conditions)
    ap.add_argument("--iterations", type=int, default=defaults.iterations)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    args = ap.parse_args(argv)

    stages, n = [], defaults.teacher_steps
    while n // 2 > args.steps:
        n //= 2
        stages.append(n)
    stages.append(args.steps)
    config = DistillConfig(stages=tuple(stages), conditions=args.conditions,
                           iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed)
    device = torch.device(args.device)
    teacher = load_diffusionrig(args.teacher, None, device, args.resolution)
    face_model = FaceModel(load_face_data(args.model), device)
    renderer = DecaBufferRenderer(face_model, choose_texture("auto", face_model.faces.shape[0],
                                                             device))
    rng = np.random.default_rng(args.seed)
    rigs = [random_rig(rng, face_model.n_expression) for _ in range(config.conditions)]
    with torch.no_grad():
        buffers = torch.cat([render_conditions(renderer, rigs[i:i + 32], args.resolution)
                             for i in range(0, len(rigs), 32)])
    bank = None
    if args.latents:
        bank = (torch.from_numpy(np.load(args.latents)) if args.latents.endswith(".npy")
                else torch.load(args.latents, weights_only=True)).reshape(-1, 64)
    z = random_latents(config.conditions, teacher.config.latent_dim,
                       torch.Generator().manual_seed(args.seed), bank).to(device)
    student, grid = distil(teacher, (buffers, z), NoiseSchedule.linear(), config)
    teacher_grid = NoiseSchedule.linear().respaced(config.teacher_steps)
    save_student(student, grid, args.out, teacher_grid, config.stages, str(args.teacher))
    print(f"wrote {args.out}: {len(grid)}-step student, timesteps {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
