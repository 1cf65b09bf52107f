"""Noise schedule, respacing and the DDIM / DPM-Solver++ samplers: official spacing, official
outputs on the tiny fixture model, exact answers on a Gaussian toy problem, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.support.diffusionrig_fixtures import DDIM_X0_STEPS, DPM_TIMESTEPS, TINY, load_fixture
from server.diffusion import (NoiseSchedule, ddim_sample, dpm_solver_pp_sample, initial_noise,
                              linear_betas, space_timesteps)
from server.models.diffusionrig_unet import DiffusionRigUNet

SCHEDULE = NoiseSchedule.linear()
# Rounding differences (the official sampler keeps float32 coefficients, ours float64; the
# convolution algorithm depends on the thread count) of ~1e-7 in eps are amplified by the
# steps of a random network to ~1e-5 in the sample, and by 1 / sqrt(abar) (125 at t = 950)
# in early x0 previews. A wrong timestep, grid, order or clipping moves the sample by ~1.
SAMPLE_ATOL = 5e-5
PREVIEW_ATOL = 2e-4

pytestmark = pytest.mark.usefixtures("single_thread")


def log_snr_uniform(schedule, count: int) -> list[int]:
    """``count`` timesteps from T-1 down to 0, evenly spaced in
    lambda = log(sqrt(abar) / sqrt(1 - abar)) and rounded to the nearest trained step
    (DPM-Solver's 'logSNR'), kept strictly decreasing: the grid the samplers are checked on."""
    lam = 0.5 * np.log(schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod))
    targets = np.linspace(lam[-1], lam[0], count)
    grid = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    for i in range(count - 2, -1, -1):
        grid[i] = max(grid[i], grid[i + 1] + 1)
    grid[0] = min(grid[0], schedule.num_steps - 1)
    for i in range(1, count):
        grid[i] = min(grid[i], grid[i - 1] - 1)
    return [int(t) for t in grid]


class GaussianData:
    """Toy data x0 ~ N(mu, s^2) per pixel: the exact eps predictor and the exact
    probability-flow ODE solution are closed-form. Along the ODE
    (x_t - a_t mu) / sqrt(a_t^2 s^2 + sigma_t^2) is invariant (a = sqrt(abar), sigma^2 = 1 - abar).
    """

    def __init__(self, mu: float = 0.3, s: float = 0.5):
        self.mu, self.s = mu, s
        self.calls: list[int] = []

    def _moments(self, abar: float) -> tuple[float, float]:
        return math.sqrt(abar) * self.mu, math.sqrt(abar * self.s ** 2 + 1 - abar)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        abar = SCHEDULE.alpha_bar(int(t[0]))
        mean, std = self._moments(abar)
        return math.sqrt(1 - abar) * (x - mean) / std ** 2

    def transport(self, x: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
        """Exact ODE map from timestep t_from to t_to (-1: clean data)."""
        mean_a, std_a = self._moments(SCHEDULE.alpha_bar(t_from))
        mean_b, std_b = self._moments(SCHEDULE.alpha_bar(t_to))
        return mean_b + std_b * (x - mean_a) / std_a


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    unet = DiffusionRigUNet(TINY).eval()
    for p in unet.parameters():                      # the default init zeroes output convs
        p.data.normal_(0, 0.2)
    buffers = torch.rand(1, 9, 16, 16)
    z = torch.randn(1, TINY.latent_dim)
    return lambda x, t: unet(x, t, buffers.expand(len(x), -1, -1, -1), z.expand(len(x), -1))


def test_linear_schedule_matches_ddpm():
    betas = linear_betas()
    assert betas.shape == (1000,) and betas[0] == 1e-4 and betas[-1] == 0.02
    np.testing.assert_allclose(SCHEDULE.alphas_cumprod, np.cumprod(1 - betas))
    assert SCHEDULE.alpha_bar(-1) == 1.0
    assert 4e-5 < SCHEDULE.alpha_bar(999) < 4.1e-5      # ~ exp(-sum betas): pure noise
    with pytest.raises(ValueError, match="timestep 1000"):
        SCHEDULE.alpha_bar(1000)


def test_respacing_follows_improved_diffusion():
    assert SCHEDULE.respaced(20) == list(range(950, -1, -50))
    assert space_timesteps(1000, "ddim8") == list(range(0, 1000, 125))
    assert space_timesteps(1000, "10") == [round(i * 111) for i in range(10)]
    # Two sections of 5 steps: 2 steps span 0..4, 3 steps span 5..9.
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert space_timesteps(11, [1, 2]) == [0, 6, 10]
    with pytest.raises(ValueError, match="exactly 7"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="cannot take 6"):
        space_timesteps(10, "6,1")


def test_ddim_uses_the_official_20_respaced_steps():
    toy = GaussianData()
    ddim_sample(toy.eps, torch.randn(1, 3, 4, 4), SCHEDULE)
    assert toy.calls == list(range(950, -1, -50))


def test_ddim_equals_a_plain_reference_loop():
    toy = GaussianData(mu=0.5, s=0.6)           # x0 predictions leave [-1, 1]: clipping matters
    noise = initial_noise(3, (2, 3, 8, 8))
    ours = ddim_sample(toy.eps, noise, SCHEDULE)

    x = noise.double()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    steps = list(range(950, -1, -50))
    for i, t in enumerate(steps):
        a = abar[t]
        a_next = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
        eps = toy.eps(x, torch.tensor([t]))
        x0 = ((x - np.sqrt(1 - a) * eps) / np.sqrt(a)).clamp(-1, 1)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
    assert (x.abs() == 1).any()                 # clipping was exercised
    torch.testing.assert_close(ours.double(), x, rtol=0, atol=1e-5)


def test_ddim_and_previews_equal_official_on_tiny_model():
    weights, a = load_fixture()
    unet = DiffusionRigUNet(TINY).eval()
    unet.load_state_dict({k.removeprefix("denoisingUNet."): v for k, v in weights.items()})
    previews = {}
    sample = ddim_sample(lambda x, t: unet(x, t, a["buffers"], a["z"]), a["noise"], SCHEDULE,
                         callback=lambda i, x0: previews.__setitem__(i, x0))
    torch.testing.assert_close(sample, a["ddim"], rtol=0, atol=SAMPLE_ATOL)
    for j, step in enumerate(DDIM_X0_STEPS):
        torch.testing.assert_close(previews[step], a["ddim_x0"][j], rtol=0, atol=PREVIEW_ATOL)


def test_dpm_solver_equals_official_dpm_solver_on_tiny_model():
    weights, a = load_fixture()
    unet = DiffusionRigUNet(TINY).eval()
    unet.load_state_dict({k.removeprefix("denoisingUNet."): v for k, v in weights.items()})
    assert SCHEDULE.time_uniform(10) == list(DPM_TIMESTEPS)
    sample = dpm_solver_pp_sample(lambda x, t: unet(x, t, a["buffers"], a["z"]), a["noise"],
                                  SCHEDULE, steps=10)
    torch.testing.assert_close(sample, a["dpm"], rtol=0, atol=SAMPLE_ATOL)


@pytest.mark.parametrize("steps", [8, 10])
def test_toy_gaussian_dpm_solver_beats_ddim_at_equal_steps(steps):
    """Same grid (uniform in log-SNR, where this toy's single transition is resolved), same
    number of model calls, both ending on clean data: the exact answer is known."""
    toy = GaussianData()
    noise = initial_noise(0, (4, 1, 16, 16))
    grid = log_snr_uniform(SCHEDULE, steps)
    exact = toy.transport(noise, grid[0], -1)
    ddim = ddim_sample(toy.eps, noise, SCHEDULE, timesteps=grid, clip_x0=False)
    toy.calls.clear()
    dpm = dpm_solver_pp_sample(toy.eps, noise, SCHEDULE, timesteps=grid, clip_x0=False)
    assert toy.calls == grid
    ddim_err, dpm_err = ((s - exact).abs().max().item() for s in (ddim, dpm))
    assert dpm_err < 0.1 < ddim_err
    assert dpm_err < 0.2 * ddim_err


@pytest.mark.parametrize("sampler", [ddim_sample, dpm_solver_pp_sample])
def test_toy_gaussian_both_converge_to_the_exact_sample(sampler):
    toy = GaussianData()
    noise = initial_noise(1, (4, 1, 16, 16))
    exact = toy.transport(noise, 999, -1)
    errors = [(sampler(toy.eps, noise, SCHEDULE, timesteps=log_snr_uniform(SCHEDULE, n),
                       clip_x0=False) - exact).abs().max().item() for n in (25, 100, 400)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_dpm_solver_default_grid_is_time_uniform_with_steps_calls():
    toy = GaussianData()
    dpm_solver_pp_sample(toy.eps, torch.randn(1, 1, 4, 4), SCHEDULE, steps=8)
    assert toy.calls == [999, 856, 714, 571, 428, 285, 143, 0]


@pytest.mark.parametrize("sampler", [ddim_sample, dpm_solver_pp_sample])
def test_fixed_noise_fixes_the_sample(tiny_unet, sampler):
    grid = SCHEDULE.time_uniform(6)
    noise = initial_noise(7, (1, 3, 16, 16))
    first = sampler(tiny_unet, noise, SCHEDULE, timesteps=grid)
    again = sampler(tiny_unet, initial_noise(7, (1, 3, 16, 16)), SCHEDULE, timesteps=grid)
    other = sampler(tiny_unet, initial_noise(8, (1, 3, 16, 16)), SCHEDULE, timesteps=grid)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_initial_noise_is_seeded_and_standard():
    a, b = initial_noise(1, (2, 3, 64, 64)), initial_noise(1, (2, 3, 64, 64))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, initial_noise(2, (2, 3, 64, 64)))
    assert abs(a.mean().item()) < 0.03 and abs(a.std().item() - 1) < 0.03


@pytest.mark.parametrize("sampler, steps", [(ddim_sample, 20), (dpm_solver_pp_sample, 10)])
def test_callback_sees_each_step_x0_once(tiny_unet, sampler, steps):
    seen = []
    noise = initial_noise(0, (2, 3, 16, 16))
    out = sampler(tiny_unet, noise, SCHEDULE, callback=lambda i, x0: seen.append((i, x0)))
    assert [i for i, _ in seen] == list(range(steps))
    assert all(x0.shape == noise.shape and x0.abs().max() <= 1 for _, x0 in seen)
    assert torch.equal(out, seen[-1][1])         # the sample is the last step's x0


def test_bad_arguments_are_named():
    toy = GaussianData()
    noise = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim_sample(toy.eps, noise, SCHEDULE, timesteps=[10, 10, 0])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        dpm_solver_pp_sample(toy.eps, noise, SCHEDULE, timesteps=[1200, 0])
    with pytest.raises(ValueError, match="denoiser returned"):
        ddim_sample(lambda x, t: x[:, :0], noise, SCHEDULE)
    with pytest.raises(ValueError, match="step count must be in"):
        dpm_solver_pp_sample(toy.eps, noise, SCHEDULE, steps=1)
