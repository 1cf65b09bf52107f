"""Noise schedule of a discrete-time (DDPM) diffusion model and its respacing.

The forward process is q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) for t = 0..T-1, with
abar_t = prod_{s<=t} (1 - beta_s). DiffusionRig trains T = 1000 steps of linear betas
1e-4..0.02 and samples a subset of them ("respacing", improved-diffusion's
``space_timesteps``/``SpacedDiffusion``): the kept steps keep their original abar and the
network is always given the original timestep index. Schedules are float64 numpy.
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_STEPS = 1000


def linear_betas(num_steps: int = NUM_TRAIN_STEPS, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s linear betas [num_steps] float64; the ends scale by 1000 / num_steps so
    that other step counts describe the same continuous process."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts: str | list[int]) -> list[int]:
    """Original timesteps kept by a respaced sampler, ascending.

    ``"ddimN"``: the integer stride k for which range(0, num_steps, k) has exactly N entries
    (DDIM's spacing; "ddim20" of 1000 gives 0, 50, ..., 950). Otherwise a list (or comma
    string) of counts: the steps are cut into that many equal sections (the first
    ``num_steps % len`` one step longer) and each section is strided evenly by its count,
    from its first step to its last, rounding to the nearest step.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == count:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"no integer stride gives exactly {count} of {num_steps} steps")
        section_counts = [int(c) for c in section_counts.split(",")]
    size, extra = divmod(num_steps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        section = size + (i < extra)
        if not 1 <= count <= section:
            raise ValueError(f"cannot take {count} steps from a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):      # accumulated, not j * stride: the same roundings
            kept.append(start + round(position))
            position += stride
        start += section
    return sorted(set(kept))


class NoiseSchedule:
    """abar_t of a discrete VP diffusion; ``alpha_bar(-1) = 1`` stands for clean data."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)

    @classmethod
    def linear(cls, num_steps: int = NUM_TRAIN_STEPS) -> "NoiseSchedule":
        """DiffusionRig's schedule: 1000 linear betas 1e-4..0.02."""
        return cls(linear_betas(num_steps))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: int) -> float:
        """abar_t for t in [0, T-1]; 1.0 for t = -1."""
        if not -1 <= t < self.num_steps:
            raise ValueError(f"timestep {t} outside [-1, {self.num_steps - 1}]")
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def respaced(self, count: int = 20) -> list[int]:
        """The official DDIM sampling timesteps, descending ("ddim20": 950, 900, ..., 0)."""
        return space_timesteps(self.num_steps, f"ddim{count}")[::-1]

    def time_uniform(self, count: int) -> list[int]:
        """``count`` timesteps from T-1 down to 0, evenly spaced in t and rounded to the
        trained integer steps (DPM-Solver's 'time_uniform', its advice for pixel-space
        models at high resolution)."""
        self._check_count(count)
        return [int(t) for t in np.rint(np.linspace(self.num_steps - 1, 0, count))]

    def _check_count(self, count: int) -> None:
        if not 2 <= count <= self.num_steps:
            raise ValueError(f"step count must be in [2, {self.num_steps}], got {count}")
