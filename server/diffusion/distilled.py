"""Few-step sampling with a distilled DiffusionRig student, and the tag its file carries.

A student (``server.training.diffusionrig.distill``) is trained so that one DDIM step of its
own between two timesteps of its grid lands where several DDIM steps of the teacher land
(progressive distillation, Salimans & Ho 2022, on the teacher's deterministic trajectories).
It keeps the teacher's architecture, conditioning and state-dict names; its safetensors file
adds metadata: ``DISTILLED_KEY`` = the student's timesteps ("950,350"), plus the teacher's
grid and the stages it went through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from server.diffusion.samplers import Denoiser, X0Callback, ddim_sample
from server.diffusion.schedule import NoiseSchedule

DISTILLED_KEY = "portrait_rig.distilled_timesteps"
TEACHER_GRID = "ddim20"


def student_grid(teacher_grid: Sequence[int], steps: int) -> list[int]:
    """``steps`` of the teacher's (descending) timesteps, the first one included, spread
    evenly by index: each student step stands for a run of about len / steps teacher steps
    (the last one ending at clean data). Halving (``steps = len / 2``) keeps every other."""
    teacher_grid = list(teacher_grid)
    if not 1 <= steps <= len(teacher_grid):
        raise ValueError(f"steps must be in 1..{len(teacher_grid)}, got {steps}")
    picks = np.rint(np.linspace(0, len(teacher_grid), steps + 1)[:-1]).astype(int)
    return [teacher_grid[i] for i in picks]


def default_grid(schedule: NoiseSchedule, steps: int) -> list[int]:
    """The student grid of ``steps`` on the official DDIM-20 grid (950, 900, ..., 0)."""
    return student_grid(schedule.respaced(20), steps)


@torch.no_grad()
def distilled_sample(denoise: Denoiser, noise: torch.Tensor, schedule: NoiseSchedule,
                     timesteps: Sequence[int] | None = None, steps: int = 2,
                     callback: X0Callback | None = None) -> torch.Tensor:
    """DDIM (eta = 0) on the student's grid, x0 clipped to [-1, 1] as the teacher's DDIM does.
    Clipping loses nothing: a run of DDIM steps from a to b equals one step whose x0 is a
    convex combination of the run's (clipped) x0 predictions, with weights proportional to
    the growth of alpha / sigma over each step, so every target the student was trained on
    lies in [-1, 1]. ``timesteps`` default to ``default_grid(schedule, steps)``; otherwise as
    ``ddim_sample``."""
    grid = default_grid(schedule, steps) if timesteps is None else timesteps
    return ddim_sample(denoise, noise, schedule, grid, clip_x0=True, callback=callback)


def distilled_metadata(timesteps: Sequence[int], teacher_grid: Sequence[int],
                       stages: Sequence[int], teacher: str) -> dict[str, str]:
    """safetensors metadata that marks a student checkpoint."""
    return {DISTILLED_KEY: ",".join(str(int(t)) for t in timesteps),
            "portrait_rig.distilled_from": json.dumps(
                {"teacher": teacher, "teacher_grid": [int(t) for t in teacher_grid],
                 "stages": [int(s) for s in stages]})}


def read_distilled_timesteps(path: str | Path) -> list[int] | None:
    """The student grid of a distilled ``.safetensors`` checkpoint; None for any other
    checkpoint (a teacher, a ``.pt`` file)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        tag = (f.metadata() or {}).get(DISTILLED_KEY)
    return None if tag is None else [int(t) for t in tag.split(",")]
