"""Deterministic samplers for eps-prediction diffusion models: DDIM (eta = 0) and
DPM-Solver++(2M).

Both integrate the probability-flow ODE from a caller-supplied initial noise tensor, so one
fixed noise per shot gives the same image for the same conditions and a smoothly changing
image as the conditions change. Both call the model once per timestep, report that step's x0
prediction (clipped to [-1, 1] like the official sampler) through ``callback(step, x0)`` for
streaming previews, and return the last step's x0. A callback may raise to abandon a sample
that is no longer wanted.

``denoise(x_t, t)`` takes x_t [N, C, H, W] and t [N] int64 original timesteps and returns
eps of x_t's shape; bind the conditions (buffers, latent) with a closure.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from server.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
X0Callback = Callable[[int, torch.Tensor], None]


def initial_noise(seed: int, shape: Sequence[int], device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed``, so a seed names the same tensor
    on every device, then moved to ``device``."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


def _check_timesteps(timesteps: Sequence[int], schedule: NoiseSchedule) -> list[int]:
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {timesteps}")
    if timesteps[0] >= schedule.num_steps or timesteps[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps - 1}], "
                         f"got {timesteps[0]}..{timesteps[-1]}")
    return timesteps


def _eval_x0(denoise: Denoiser, x: torch.Tensor, t: int, abar: float,
             clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Model x0 prediction at timestep t, and the eps consistent with it (after clipping)."""
    recip, recipm1 = math.sqrt(1.0 / abar), math.sqrt(1.0 / abar - 1.0)
    eps = denoise(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    if eps.shape != x.shape:
        raise ValueError(f"denoiser returned {tuple(eps.shape)} for x_t {tuple(x.shape)}")
    x0 = recip * x - recipm1 * eps
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (recip * x - x0) / recipm1
    return x0, eps


@torch.no_grad()
def ddim_sample(denoise: Denoiser, noise: torch.Tensor, schedule: NoiseSchedule,
                timesteps: Sequence[int] | None = None, clip_x0: bool = True,
                callback: X0Callback | None = None) -> torch.Tensor:
    """DDIM with eta = 0 (Song et al. 2021, eq. 12), as improved-diffusion's
    ``ddim_sample_loop`` on a respaced schedule.

    noise:     x at ``timesteps[0]`` [N, C, H, W]; the official sampler starts from pure
               noise at the first respaced step.
    timesteps: strictly decreasing original timesteps, one model call each; default the
               official 20 respaced steps 950, 900, ..., 0. The last step goes to clean data.
    Each step: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), clipped to [-1, 1] if ``clip_x0``,
    eps re-derived from the clipped x0, then x <- sqrt(abar') x0 + sqrt(1 - abar') eps with
    abar' that of the next kept step (1 after the last). Returns x0 of the last step.
    This is DPM-Solver-1 on the same grid.
    """
    timesteps = _check_timesteps(schedule.respaced(20) if timesteps is None else timesteps,
                                 schedule)
    x = noise
    for i, t in enumerate(timesteps):
        x0, eps = _eval_x0(denoise, x, t, schedule.alpha_bar(t), clip_x0)
        if callback is not None:
            callback(i, x0)
        abar_next = schedule.alpha_bar(timesteps[i + 1] if i + 1 < len(timesteps) else -1)
        x = math.sqrt(abar_next) * x0 + math.sqrt(1.0 - abar_next) * eps
    return x


@torch.no_grad()
def dpm_solver_pp_sample(denoise: Denoiser, noise: torch.Tensor, schedule: NoiseSchedule,
                         steps: int = 10, timesteps: Sequence[int] | None = None,
                         clip_x0: bool = True, lower_order_final: bool = True,
                         callback: X0Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): multistep, second order,
    in data prediction.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t),
    the model is called once at each timestep t_0 > t_1 > ... > t_{n-1}, giving x0_i
    (clipped to [-1, 1] if ``clip_x0``: static thresholding), and between calls

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} expm1(-h_i) D_i,
        D_i = x0_i + (x0_i - x0_{i-1}) / (2 r_i),  h_i = lambda_{i+1} - lambda_i,
        r_i = h_{i-1} / h_i,

    with D_i = x0_i (first order, which is DDIM) on the first update and, if
    ``lower_order_final`` and fewer than 10 updates, on the last one too (the official
    dpm-solver's rule: the 2M extrapolation is unstable over the long last steps of a short
    grid). The result is x0 at t_{n-1}, as the official DDIM and dpm-solver's
    ``denoise_to_zero`` give.

    noise:     x at ``timesteps[0]`` [N, C, H, W].
    steps:     model calls on the default grid ``schedule.time_uniform(steps)``
               (999, 888, ..., 0 for 10).
    timesteps: strictly decreasing original timesteps, one model call each, replacing the
               default grid.
    """
    timesteps = _check_timesteps(schedule.time_uniform(steps) if timesteps is None
                                 else timesteps, schedule)
    abar = [schedule.alpha_bar(t) for t in timesteps]
    alpha = [math.sqrt(a) for a in abar]
    sigma = [math.sqrt(1.0 - a) for a in abar]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]
    updates = len(timesteps) - 1

    x, x0_prev, h_prev = noise, None, None
    for i, t in enumerate(timesteps):
        x0, _ = _eval_x0(denoise, x, t, abar[i], clip_x0)
        if callback is not None:
            callback(i, x0)
        if i == updates:
            return x0
        h = lam[i + 1] - lam[i]
        first_order = x0_prev is None or (lower_order_final and updates < 10 and i == updates - 1)
        d = x0 if first_order else x0 + (x0 - x0_prev) * (h / (2.0 * h_prev))
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
