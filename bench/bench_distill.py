"""Tiny-scale proof of the distilled DiffusionRig sampler, on the CPU.

Teacher: the tiny DiffusionRig of the test fixtures (``tests/diffusionrig_fixtures.py``:
official layout, 16 px, random weights). Conditions: random rig parameters rendered to DECA
buffers with the demo head, latents N(0, I). The teacher is distilled into a student of
``--steps`` DDIM steps (``server.training.diffusionrig.distill``); then, on held-out
conditions and noise, it prints the RMS difference (images in [-1, 1]) to the teacher's
20-step DDIM samples of

* the student on its grid,
* the teacher itself on the student's grid (what the student replaces),

and how each follows the buffers: the change of the sample when every condition gets another
condition's buffers, against the teacher's change (cosine similarity and RMS difference).

    python bench/bench_distill.py [--conditions 64] [--iterations 150] [--stages 2] [--lr 3e-4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from server.diffusion import NoiseSchedule, ddim_sample, distilled_sample  # noqa: E402
from server.training.diffusionrig.distill import (DistillConfig, distil,  # noqa: E402
                                                  random_latents, random_rig,
                                                  render_conditions)


def tiny_teacher():
    """The fixture's tiny DiffusionRig (UNet weights shipped in tests/data)."""
    from diffusionrig_fixtures import TINY, load_fixture
    from server.models.diffusionrig import DiffusionRig
    model = DiffusionRig(TINY)
    weights, _ = load_fixture()
    state = model.state_dict()
    state.update(weights)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def conditions(count: int, size: int, latent_dim: int, seed: int):
    """(buffers [count, 9, size, size], z [count, latent_dim]) from random rigs."""
    from portrait_rig.demo_head import demo_head
    from server.renderer.deca import DecaBufferRenderer
    from server.renderer.face_model import FaceModel
    face = FaceModel(demo_head())
    rng = np.random.default_rng(seed)
    rigs = [random_rig(rng, face.n_expression) for _ in range(count)]
    with torch.no_grad():
        buffers = render_conditions(DecaBufferRenderer(face), rigs, size)
    return buffers, random_latents(count, latent_dim, torch.Generator().manual_seed(seed))


def evaluate(teacher, student, grid, schedule, buffers, z, seed: int = 99) -> dict:
    """Held-out errors against the teacher's DDIM-20 (see the module notes)."""
    size = teacher.config.image_size
    noise = torch.randn(len(z), 3, size, size, generator=torch.Generator().manual_seed(seed))
    rms = lambda a: a.square().mean().sqrt().item()  # noqa: E731
    with torch.no_grad():
        def run(model, b, sampler):
            return sampler(lambda x, t: model(x, t, b, z), noise)
        ddim20 = lambda b: lambda d, x: ddim_sample(d, x, schedule)  # noqa: E731
        reference = run(teacher, buffers, ddim20(buffers))
        student_out = run(student, buffers,
                          lambda d, x: distilled_sample(d, x, schedule, grid))
        short = run(teacher, buffers, lambda d, x: ddim_sample(d, x, schedule, grid))
        swapped = buffers.roll(1, 0)
        moved_ref = run(teacher, swapped, ddim20(swapped)) - reference
        moved_student = run(student, swapped,
                            lambda d, x: distilled_sample(d, x, schedule, grid)) - student_out
    cosine = torch.nn.functional.cosine_similarity(moved_ref.flatten(), moved_student.flatten(),
                                                   dim=0).item()
    return dict(reference_rms=rms(reference), student_error=rms(student_out - reference),
                teacher_short_error=rms(short - reference), buffer_change=rms(moved_ref),
                student_change_error=rms(moved_student - moved_ref), change_cosine=cosine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conditions", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--stages", default="2", help="student step counts, e.g. 10,5,2")
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    teacher = tiny_teacher()
    size, dim = teacher.config.image_size, teacher.config.latent_dim
    buffers, z = conditions(args.conditions + args.held_out, size, dim, seed=0)
    config = DistillConfig(stages=tuple(int(s) for s in args.stages.split(",")),
                           iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                           log_every=max(1, args.iterations // 5))
    schedule = NoiseSchedule.linear()
    train = (buffers[:args.conditions], z[:args.conditions])
    student, grid = distil(teacher, train, schedule, config)
    print(f"student grid {grid}; trained in {time.perf_counter() - start:.0f} s")
    result = evaluate(teacher, student, grid, schedule, buffers[args.conditions:],
                      z[args.conditions:])
    for key, value in result.items():
        print(f"  {key:<22} {value:.4f}")


if __name__ == "__main__":
    main()
