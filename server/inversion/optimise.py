"""Latent optimisation: the W or W+ code whose image best reconstructs the photo.

The schedule is NVIDIA's projector (stylegan2-ada-pytorch ``projector.py``) with PTI's
settings (danielroich/PTI ``w_projector.py``): Adam (betas 0.9, 0.999), learning rate
``learning_rate`` ramped up over the first 5 % of the steps and down with a half cosine over
the last 25 %, and Gaussian noise added to the code with a scale of ``noise_factor`` times
the spread of W, falling quadratically to zero by 75 % of the steps. The start is the
encoder's code or ``w_avg``; space 'w' optimises one w shared by every layer (PTI's pivot),
'w+' one per layer. The noise is drawn from a generator seeded with ``seed``, so a run is
reproducible. The generator's weights are not touched; its noise inputs are the stored
constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SPACES = ("auto", "w", "w+")
W_SPREAD_SAMPLES = 2000


class InversionCancelled(Exception):
    """The caller asked the optimisation to stop."""


@dataclass
class OptimiseSettings:
    steps: int = 300
    space: str = "auto"                 # auto: 'w+' from an encoder's code, 'w' from w_avg
    learning_rate: float = 0.01
    rampdown: float = 0.25
    rampup: float = 0.05
    noise_factor: float = 0.05
    noise_ramp: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"space: expected one of {', '.join(SPACES)}, got {self.space!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps: expected a non-negative integer, got {self.steps!r}")


def learning_rate(settings: OptimiseSettings, step: int) -> float:
    t = step / max(settings.steps, 1)
    ramp = min(1.0, (1.0 - t) / settings.rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return settings.learning_rate * ramp * min(1.0, t / settings.rampup)


@torch.no_grad()
def w_spread(G, seed: int = 0, samples: int = W_SPREAD_SAMPLES) -> float:
    """RMS distance of mapped latents from their mean (NVIDIA's ``w_std``)."""
    z = torch.randn([samples, G.z_dim], generator=torch.Generator().manual_seed(seed))
    w = G.mapping(z.to(G.mapping.w_avg.device))[:, 0]
    return float((w - w.mean(0)).square().sum(1).mean().sqrt())


def optimise_latent(G, losses, start: torch.Tensor | None, settings: OptimiseSettings,
                    render, on_step=None, should_stop=None) -> torch.Tensor:
    """W+ [num_ws, w_dim] reconstructing the photo of ``losses`` (a
    ``ReconstructionLosses``). ``start``: W+ [num_ws, w_dim] or None (``w_avg``).
    ``render(ws [1, num_ws, w_dim]) -> image`` synthesises with gradients.
    ``on_step(step, values, image)`` after every step (``values`` the loss terms and ``lr``);
    ``should_stop()`` is polled between steps (``InversionCancelled``)."""
    device = G.mapping.w_avg.device
    from_average = start is None
    if from_average:
        start = G.mapping.w_avg[None].expand(G.num_ws, -1)
    start = start.detach().to(device, torch.float32)
    space = settings.space if settings.space != "auto" else ("w" if from_average else "w+")
    if space == "w":
        code = start.mean(dim=0, keepdim=True).clone().requires_grad_(True)
    else:
        code = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([code], betas=(0.9, 0.999), lr=settings.learning_rate)
    spread = w_spread(G, settings.seed) if settings.noise_factor > 0 else 0.0
    noise_rng = torch.Generator(device=device).manual_seed(settings.seed)
    for step in range(settings.steps):
        if should_stop is not None and should_stop():
            raise InversionCancelled("inversion cancelled")
        t = step / settings.steps
        lr = learning_rate(settings, step)
        for group in optimiser.param_groups:
            group["lr"] = lr
        strength = spread * settings.noise_factor * max(0.0, 1.0 - t / settings.noise_ramp) ** 2
        noise = torch.randn(code.shape, generator=noise_rng, device=device) * strength
        ws = (code + noise).expand(G.num_ws, -1)[None]
        image = render(ws)
        total, values = losses(image, step)
        optimiser.zero_grad(set_to_none=True)
        total.backward()
        optimiser.step()
        values["lr"] = lr
        if on_step is not None:
            on_step(step, values, image.detach())
    return code.detach().expand(G.num_ws, -1).clone()
