"""Tiny-scale proof of the distilled DiffusionRig sampler, on the CPU.

Teacher: the tiny DiffusionRig of the test fixtures (``tests/support/diffusionrig_fixtures.py``:
official layout, 16 px, random weights) sampled with DDIM-20. It is distilled into a student
of ``--stages`` (``server.training.diffusionrig.distill``: random rigs rendered to DECA
buffers with the demo head and latents N(0, I), fresh ones every iteration). Then, on
held-out conditions (rigs, latents and noise from other seeds than training's), it prints
the RMS difference (images in [-1, 1]) to the teacher's DDIM-20 samples of

* the student on its grid,
* the teacher's own DDIM on the student's grid (what the student replaces), and on twice
  as many steps,

and how each follows the buffers: every held-out rig is edited (head turned by 0.3 rad; the
key light moved to the other side) and the change of each sampler's image is compared with
the change of the teacher's DDIM-20 image (same latent and noise): cosine similarity and
RMS error relative to the teacher's change.

    python bench/bench_distill.py [--iterations 300] [--stages 2] [--lr 1e-4] [--held-out 64]

About 10 minutes on one loaded core of the development VM (docs/performance.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from server.diffusion import NoiseSchedule, ddim_sample, distilled_sample  # noqa: E402
from server.diffusion.distilled import student_grid  # noqa: E402
from server.training.diffusionrig.distill import (ConditionSource, DistillConfig,  # noqa: E402
                                                  distil, save_student)

TRAIN_SEED, HELD_OUT_SEED = 1, 1_000_003


def tiny_teacher():
    """The fixture's tiny DiffusionRig (UNet weights shipped in tests/data)."""
    from tests.support.diffusionrig_fixtures import TINY, load_fixture
    from server.models.diffusionrig import DiffusionRig
    model = DiffusionRig(TINY)
    weights, _ = load_fixture()
    state = model.state_dict()
    state.update(weights)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def condition_source(seed: int, size: int = 16, latent_dim: int = 8) -> ConditionSource:
    """Random rigs of the demo head rendered to DECA buffers, latents N(0, I)."""
    from portrait_rig.demo_head import demo_head
    from server.renderer.deca import DecaBufferRenderer
    from server.renderer.face_model import FaceModel
    return ConditionSource(DecaBufferRenderer(FaceModel(demo_head())), size, latent_dim, seed)


def held_out(count: int, size: int = 16, latent_dim: int = 8, seed: int = HELD_OUT_SEED
             ) -> dict[str, torch.Tensor]:
    """Held-out conditions: buffers of ``count`` random rigs, the same rigs with the head
    turned (``pose``) and with the key light on the other side (``light``), latents z and
    initial noise."""
    source = condition_source(seed, size, latent_dim)
    rigs = source.rigs(count)
    turned, relit = copy.deepcopy(rigs), copy.deepcopy(rigs)
    for rig in turned:
        rig.pose.global_[1] += 0.3
    for rig in relit:
        rig.lighting.sh[1] = [-2.5 * v for v in rig.lighting.sh[1]]
    noise = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return dict(buffers=source.render(rigs), pose=source.render(turned),
                light=source.render(relit), z=source.latents(count), noise=noise)


def rms(a: torch.Tensor) -> float:
    return a.square().mean().sqrt().item()


@torch.no_grad()
def sample(model, buffers, z, noise, schedule, timesteps, sampler=ddim_sample):
    return sampler(lambda x, t: model(x, t, buffers, z), noise, schedule, timesteps)


def evaluate(teacher, student, grid, schedule, data, follow: bool = True) -> dict:
    """Errors to the teacher's DDIM-20 on ``data`` (``held_out``) of the student on ``grid``,
    the teacher's DDIM on ``grid`` and on twice its steps; with ``follow``, how each one's
    change under the pose and light edits compares with the teacher's."""
    reference_grid = schedule.respaced(20)
    samplers = {f"student, {len(grid)} steps": (student, grid, distilled_sample),
                f"teacher DDIM-{len(grid)}": (teacher, grid, ddim_sample),
                f"teacher DDIM-{2 * len(grid)}": (teacher, student_grid(reference_grid,
                                                                         2 * len(grid)),
                                                  ddim_sample)}
    edits = [edit for edit in ("pose", "light") if follow and edit in data]
    runs = {}
    for key in ("buffers", *edits):
        runs[key, "reference"] = sample(teacher, data[key], data["z"], data["noise"], schedule,
                                        reference_grid)
        for name, (model, timesteps, sampler) in samplers.items():
            runs[key, name] = sample(model, data[key], data["z"], data["noise"], schedule,
                                     timesteps, sampler)
    reference = runs["buffers", "reference"]
    result = {"reference": {"rms": rms(reference)}}
    for name in samplers:
        row = {"error": rms(runs["buffers", name] - reference)}
        for edit in edits:
            moved = runs[edit, "reference"] - reference
            change = runs[edit, name] - runs["buffers", name]
            row[f"{edit} change"] = rms(moved)
            row[f"{edit} cosine"] = torch.nn.functional.cosine_similarity(
                moved.flatten(), change.flatten(), dim=0).item()
            row[f"{edit} relative error"] = rms(change - moved) / rms(moved)
        result[name] = row
    return result


def print_table(result: dict) -> None:
    print(f"teacher DDIM-20 samples: RMS {result['reference']['rms']:.3f}")
    rows = {k: v for k, v in result.items() if k != "reference"}
    edits = [k.split()[0] for k in next(iter(rows.values())) if k.endswith("cosine")]
    head = "| sampler | RMS error to DDIM-20 |" + "".join(
        f" {e}: cosine | {e}: relative error |" for e in edits)
    print(head)
    print("|" + "---|" * (2 + 2 * len(edits)))
    for name, row in rows.items():
        print(f"| {name} | {row['error']:.3f} |" + "".join(
            f" {row[f'{e} cosine']:.2f} | {row[f'{e} relative error']:.2f} |" for e in edits))
    for e in edits:
        print(f"{e} edit: the teacher's DDIM-20 image changes by RMS "
              f"{next(iter(rows.values()))[f'{e} change']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="2", help="student step counts, e.g. 10,5,2")
    ap.add_argument("--iterations", type=int, default=300, help="per stage")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pool", type=int, default=128)
    ap.add_argument("--fresh", type=int, default=64)
    ap.add_argument("--refresh-every", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=0)
    ap.add_argument("--save", default=None, help="write the student here (.safetensors)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    teacher = tiny_teacher()
    size, dim = teacher.config.image_size, teacher.config.latent_dim
    schedule = NoiseSchedule.linear()
    data = held_out(args.held_out, size, dim)
    monitor_data = {k: v[:32] for k, v in data.items()}
    reference = sample(teacher, monitor_data["buffers"], monitor_data["z"],
                       monitor_data["noise"], schedule, schedule.respaced(20))

    def monitor(model, grid):
        out = sample(model, monitor_data["buffers"], monitor_data["z"], monitor_data["noise"],
                     schedule, grid, distilled_sample)
        return f"held-out error {rms(out - reference):.3f}"

    config = DistillConfig(stages=tuple(int(s) for s in args.stages.split(",")),
                           iterations=args.iterations, batch_size=args.batch_size,
                           pool=args.pool, fresh=args.fresh, refresh_every=args.refresh_every,
                           lr=args.lr, ema=args.ema,
                           log_every=args.log_every or max(1, args.iterations // 10))
    student, grid = distil(teacher, condition_source(TRAIN_SEED, size, dim), schedule, config,
                           monitor=monitor)
    trained = time.perf_counter() - start
    print(f"student grid {grid}; trained in {trained:.0f} s "
          f"({args.threads} thread{'s' if args.threads > 1 else ''})")
    if args.save:
        save_student(student, grid, args.save, schedule.respaced(20), config.stages,
                     "tests/data/diffusionrig/tiny_unet.safetensors")
    print(f"held-out conditions: {args.held_out} rigs, latents and noises")
    print_table(evaluate(teacher, student, grid, schedule, data))


if __name__ == "__main__":
    main()
