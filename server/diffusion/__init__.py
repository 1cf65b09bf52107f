"""Discrete-time diffusion: the DDPM noise schedule with DiffusionRig's respacing, and
deterministic samplers (DDIM, DPM-Solver++(2M), a distilled student's few steps) with fixed
initial noise and x0 previews."""

from server.diffusion.distilled import distilled_sample, read_distilled_timesteps
from server.diffusion.samplers import Denoiser, X0Callback, ddim_sample, dpm_solver_pp_sample, initial_noise
from server.diffusion.schedule import NUM_TRAIN_STEPS, NoiseSchedule, linear_betas, space_timesteps

__all__ = ["Denoiser", "X0Callback", "ddim_sample", "distilled_sample", "dpm_solver_pp_sample",
           "initial_noise", "read_distilled_timesteps",
           "NUM_TRAIN_STEPS", "NoiseSchedule", "linear_betas", "space_timesteps"]
