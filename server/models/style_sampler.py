"""DualStyleGAN's extrinsic style sampler N: unit Gaussian noise -> an exemplar-like z+ code.

Two MLPs (the official ``_netT`` of ``model/sampler/icp.py``, trained by implicit maximum
likelihood on a style's exemplar codes), named as in ``sampler.pt``:

* ``structure``: noise [B, noise_dim] -> the codes of the structure layers [B, n_s * dim]
* ``color``:     noise [B, noise_dim] -> the codes of the colour layers [B, n_c * dim]

each ``lin1 -> bn1 -> ReLU -> lin2 -> bn2 -> ReLU -> lin_out`` (linear layers without bias,
batch norm on its running statistics). The z+ code is structure then colour along the layer
axis, [B, n_s + n_c, dim], mapped to W+ like any exemplar code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class StyleSamplerConfig:
    """``noise_dim`` inputs, ``hidden`` units, ``structure_layers`` + ``colour_layers`` codes
    of ``code_dim`` (official: 128, 128, 7, 11, 512)."""
    noise_dim: int = 128
    hidden: int = 128
    structure_layers: int = 7
    colour_layers: int = 11
    code_dim: int = 512


class SamplerMLP(nn.Module):
    def __init__(self, noise_dim: int, hidden: int, out_features: int):
        super().__init__()
        self.lin1 = nn.Linear(noise_dim, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.lin2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden)
        self.lin_out = nn.Linear(hidden, out_features, bias=False)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.lin1(noise)))
        return self.lin_out(torch.relu(self.bn2(self.lin2(x))))


class StyleSampler(nn.Module):
    """noise [B, 2, noise_dim] (row 0 for the structure, row 1 for the colour) -> z+
    [B, structure_layers + colour_layers, code_dim]. Use in eval mode."""

    def __init__(self, config: StyleSamplerConfig = StyleSamplerConfig()):
        super().__init__()
        self.config = c = config
        self.color = SamplerMLP(c.noise_dim, c.hidden, c.colour_layers * c.code_dim)
        self.structure = SamplerMLP(c.noise_dim, c.hidden, c.structure_layers * c.code_dim)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        c = self.config
        if noise.ndim != 3 or noise.shape[1:] != (2, c.noise_dim):
            raise ValueError(f"noise must be [batch, 2, {c.noise_dim}], got {list(noise.shape)}")
        structure = self.structure(noise[:, 0]).reshape(-1, c.structure_layers, c.code_dim)
        colour = self.color(noise[:, 1]).reshape(-1, c.colour_layers, c.code_dim)
        return torch.cat([structure, colour], dim=1)

    def noise(self, seed: int) -> torch.Tensor:
        """The noise [1, 2, noise_dim] float32 of ``seed``: np.random.RandomState(seed) normal
        draws (device-independent), structure row first."""
        draws = np.random.RandomState(seed).randn(2, self.config.noise_dim)
        return torch.from_numpy(draws).float()[None]
