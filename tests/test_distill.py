"""Progressive distillation of DiffusionRig: the student's file, the backend's distilled
sampler, and a tiny-scale proof that a 2-step student follows its 20-step teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.diffusionrig_fixtures import (BACKEND_TINY, TINY, random_checkpoint_state,
                                                 write_checkpoint)
from server.diffusion import NoiseSchedule, ddim_sample
from server.diffusion.distilled import default_grid, read_distilled_timesteps, student_grid
from server.models.diffusionrig import DiffusionRig
from server.training.diffusionrig.distill import DistillConfig, ddim_target, distil, save_student


def test_student_grids_and_targets():
    grid = NoiseSchedule.linear().respaced(20)
    assert student_grid(grid, 10) == grid[::2]
    assert student_grid(grid, 2) == [950, 450] == default_grid(NoiseSchedule.linear(), 2)
    assert student_grid(grid, 20) == grid
    with pytest.raises(ValueError, match="steps must be in 1..20"):
        student_grid(grid, 21)
    # The target x0 is the one whose DDIM step lands on the teacher's state...
    schedule = NoiseSchedule.linear()
    x_a, x0 = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4) * 2 - 1
    eps = (x_a - schedule.alpha_bar(950) ** 0.5 * x0) / (1 - schedule.alpha_bar(950)) ** 0.5
    a, b = schedule.alpha_bar(950), schedule.alpha_bar(450)
    x_b = b ** 0.5 * x0 + (1 - b) ** 0.5 * eps
    torch.testing.assert_close(ddim_target(x_a, x_b, a, b), x0, atol=1e-4, rtol=0)
    # ... and after several teacher steps it is a convex mix of their clipped x0s: in [-1, 1].
    teacher_x0 = [torch.rand(1, 3, 4, 4) * 6 - 3 for _ in range(4)]  # clipped by DDIM
    calls = iter(teacher_x0)

    def teacher(x, t):
        abar = schedule.alpha_bar(int(t[0]))
        return (x - abar ** 0.5 * next(calls)) / (1 - abar) ** 0.5
    states = []
    ddim_sample(lambda x, t: (states.append(x), teacher(x, t))[1], x_a[:1], schedule,
                [950, 900, 850, 800])
    target = ddim_target(states[0], states[3], a, schedule.alpha_bar(800))
    assert target.abs().max() <= 1 + 1e-4


@pytest.fixture(scope="module")
def small_face():
    from server.renderer.face_model import FaceModel
    from tests.support.synthetic_face import synthetic_face

    return FaceModel(synthetic_face())


@pytest.mark.usefixtures("single_thread")
def test_backend_samples_a_student_on_its_own_grid(tmp_path, small_face, monkeypatch):
    from portrait_rig.params import RigParams
    from server.backends import RenderRequest, create_backend

    model = DiffusionRig(BACKEND_TINY)
    model.load_state_dict(random_checkpoint_state())
    student = save_student(model, [950, 450], tmp_path / "student.safetensors",
                           NoiseSchedule.linear().respaced(20), [2], "teacher.pt")
    assert read_distilled_timesteps(student) == [950, 450]
    teacher = write_checkpoint(tmp_path / "teacher.safetensors")
    assert read_distilled_timesteps(teacher) is None

    backend = create_backend("diffusionrig", small_face, sampler="distilled", resolution="16",
                             checkpoint=str(student), personal_dir=str(tmp_path),
                             framing="rig")
    assert backend.timesteps == [950, 450] and backend.steps == 2
    seen = []
    params = RigParams()
    monkeypatch.setenv("PORTRAIT_RIG_HOME", str(tmp_path))
    (tmp_path / "latents").mkdir()
    np.save(tmp_path / "latents" / "latent.npy",
            np.random.default_rng(0).normal(size=64).astype(np.float32))
    params.appearance.latent_file = "latent.npy"      # a name in the data folder's latents/
    result = backend.render([RenderRequest(params, 16, 16, on_preview=lambda *a: seen.append(a))])
    assert [(step, steps) for step, steps, _ in seen] == [(1, 2)]
    assert result[0].image.shape == (16, 16, 4) and result[0].image[..., :3].std() > 0

    with pytest.raises(ValueError, match="not a distilled student"):
        create_backend("diffusionrig", small_face, sampler="distilled", checkpoint=str(teacher),
                       framing="rig")
    params.appearance.personal_model = "alice"
    with pytest.raises(ValueError, match="distil the personal model"):
        backend.render([RenderRequest(params, 16, 16)])
    (tmp_path / "half.safetensors.tmp").write_bytes(b"")  # a killed run's leftover is ignored
    assert read_distilled_timesteps(tmp_path / "half.safetensors") is None


def test_a_student_file_keeps_the_layout_and_carries_its_grid(tmp_path):
    from safetensors.torch import load_file

    model = DiffusionRig(TINY)
    schedule = NoiseSchedule.linear()
    path = save_student(model, [950, 450], tmp_path / "student.safetensors",
                        schedule.respaced(20), (2,), "fixture")
    assert read_distilled_timesteps(path) == [950, 450]
    assert not list(tmp_path.glob("*.tmp"))
    reloaded = DiffusionRig(TINY)
    reloaded.load_state_dict(load_file(str(path)))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                 model.state_dict().values()))
    with pytest.raises(ValueError, match="written as .safetensors"):
        save_student(model, [950, 450], tmp_path / "student.pt", schedule.respaced(20), (2,),
                     "fixture")


@pytest.mark.training
@pytest.mark.usefixtures("single_thread")
def test_a_distilled_student_beats_the_teachers_own_two_steps_on_held_out_rigs():
    """Tiny scale, CPU: the fixture's 16 px teacher distilled 20 -> 2 steps on fresh random
    rigs, latents and noise. On rigs, latents and noise it never saw, the student's 2-step
    samples are closer to the teacher's 20-step samples than the teacher's own DDIM on the
    same 2 steps, and turning the head moves its image the way it moves the teacher's at
    least as well. (The bench's longer run: bench/bench_distill.py, docs/performance.md.)"""
    from bench.bench_distill import condition_source, evaluate, held_out, tiny_teacher

    torch.manual_seed(0)
    teacher = tiny_teacher()
    schedule = NoiseSchedule.linear()
    config = DistillConfig(stages=(2,), iterations=24, batch_size=16, pool=48, fresh=0,
                           lr=2e-4, ema=0.9, log_every=0)
    student, grid = distil(teacher, condition_source(seed=1), schedule, config, log=None)
    assert grid == [950, 450]
    data = held_out(16, seed=7)
    del data["light"]
    result = evaluate(teacher, student, grid, schedule, data)
    mine, ddim = result["student, 2 steps"], result["teacher DDIM-2"]
    assert mine["error"] < 0.93 * ddim["error"], result
    assert mine["pose relative error"] < ddim["pose relative error"], result


@pytest.mark.training
@pytest.mark.usefixtures("single_thread")
def test_the_command_writes_a_student_the_backend_reads(tmp_path, capsys):
    from server.training.diffusionrig.distill import main

    teacher = write_checkpoint(tmp_path / "teacher.safetensors")
    out = tmp_path / "student.safetensors"
    assert main([str(teacher), str(out), "--device", "cpu", "--resolution", "32",
                 "--iterations", "2", "--batch-size", "2", "--pool", "2", "--fresh", "0",
                 "--check", "2"]) == 0
    assert read_distilled_timesteps(out) == [950, 450]
    printed = capsys.readouterr().out
    assert "2 held-out conditions" in printed and "teacher DDIM-4" in printed, printed
