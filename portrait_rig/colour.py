"""The sRGB transfer functions (IEC 61966-2-1), numpy only: one definition for the add-on
(world colours, frames into float images) and the server (albedo, frame encoding)."""

from __future__ import annotations

import numpy as np


def srgb_to_linear(v) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (float64)."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(v) -> np.ndarray:
    """Linear values -> sRGB encoding in [0, 1] (float64; clamps)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)
