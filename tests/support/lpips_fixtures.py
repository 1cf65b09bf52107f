"""LPIPS weight files in the official layouts with seeded random values.

``write_lpips_files`` writes a torchvision backbone file (``features.<i>.weight/bias`` plus a
classifier tensor, as torchvision's ImageNet checkpoints hold) and an lpips calibration file
(``lin<k>.model.1.weight`` [1, C, 1, 1]). tests/data/lpips_*.npz hold the distances the lpips
package computed with the same weights."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from server.models.lpips import LPIPS

DATA = Path(__file__).resolve().parents[1] / "data"


def random_lpips_state(net: str, seed: int = 0) -> tuple[dict, dict]:
    """(backbone state dict, calibration state dict) for LPIPS-``net``."""
    g = torch.Generator().manual_seed(seed)
    backbone = {}
    for name, t in LPIPS(net).features.state_dict().items():
        fan_in = math.prod(t.shape[1:]) if t.ndim > 1 else 1
        backbone[f"features.{name}"] = (torch.randn(t.shape, generator=g) *
                                        (math.sqrt(2 / fan_in) if t.ndim > 1 else 0.1))
    backbone["classifier.0.weight"] = torch.randn(4, 4, generator=g)
    widths = [v.numel() for k, v in LPIPS(net).state_dict().items() if k.startswith("lin")]
    calibration = {f"lin{k}.model.1.weight": torch.rand(1, w, 1, 1, generator=g) * 0.2
                   for k, w in enumerate(widths)}
    return backbone, calibration


def write_lpips_files(folder: Path, net: str, seed: int = 0) -> tuple[Path, Path]:
    backbone, calibration = random_lpips_state(net, seed)
    paths = folder / f"{net}_backbone.pth", folder / f"{net}_lpips.pth"
    torch.save(backbone, paths[0])
    torch.save(calibration, paths[1])
    return paths
