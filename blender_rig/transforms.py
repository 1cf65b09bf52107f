"""Blender matrices as float64 numpy, and the shared rotation conversions
(``portrait_rig.rotations``) the rig reader and writer use."""

from __future__ import annotations

import numpy as np

from ..portrait_rig.rotations import (axis_angle_to_matrix, axis_angle_to_quaternion,  # noqa: F401
                                      matrix_to_axis_angle, matrix_to_quaternion,
                                      quaternion_to_axis_angle, quaternion_to_matrix)


def as_matrix(matrix) -> np.ndarray:
    """A ``mathutils.Matrix`` (or nested sequence) as a float64 array."""
    return np.array(matrix, dtype=np.float64)


def rotation_part(matrix) -> np.ndarray:
    """The rotation [3, 3] of a 3x3 or 4x4 rotation-scale(-translation) matrix: its columns
    normalised, so object or bone scale is dropped (shear is not expected)."""
    m = as_matrix(matrix)[:3, :3]
    return m / np.sqrt((m * m).sum(axis=0))
