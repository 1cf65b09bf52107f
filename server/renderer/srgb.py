"""Linear -> 8-bit sRGB, exact and cheap: count the code values whose threshold lies below.

Code value k (1..255) starts at the linear value whose sRGB encoding is (k - 0.5) / 255, so
the count of thresholds at or below x is round(255 * srgb(x)) with no power function per pixel
(IEC 61966-2-1 transfer function; inputs are clamped to [0, 1], NaN encodes as 0). The torch
encoder here and the numba one in ``shade_cpu`` give identical codes.
"""

from __future__ import annotations

import numpy as np
import torch

from portrait_rig.colour import srgb_to_linear


# THRESHOLDS[k - 1]: the smallest linear value (float32) that encodes to code value k.
THRESHOLDS = srgb_to_linear((np.arange(1, 256) - 0.5) / 255).astype(np.float32)

# A coarse table for the numba encoder: LUT[i] = code value of the linear value i / LUT_SIZE
# (i = 0 .. LUT_SIZE). The steepest part of the curve (12.92 * 255 codes per unit) puts fewer
# than one threshold in each cell, so the cell's code plus one comparison is exact.
LUT_SIZE = 4096
LUT = np.searchsorted(THRESHOLDS, np.arange(LUT_SIZE + 1, dtype=np.float32) / LUT_SIZE,
                      side="right").astype(np.uint8)
assert 12.92 * 255 < LUT_SIZE


def encode_torch(linear: torch.Tensor) -> torch.Tensor:
    """Linear values (any shape, any device) -> uint8 sRGB code values (NaN -> 0)."""
    thresholds = torch.as_tensor(THRESHOLDS, device=linear.device)
    linear = torch.nan_to_num(linear.float(), nan=0.0).clamp(0.0, 1.0)
    return torch.bucketize(linear, thresholds, right=True).to(torch.uint8)
