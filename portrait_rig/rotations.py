"""Rotations in float64 numpy (the add-on and the server share them; no bpy, no torch).

Blender hands out single-precision ``mathutils`` matrices; converting a rotation to an
axis-angle vector through ``acos(w)`` in single precision loses about 1e-3 rad near identity,
which moves a head vertex by 0.1 mm. These helpers work in float64 and use ``atan2``, which
keeps full precision at every angle.

Conventions: quaternions are (w, x, y, z); axis-angle vectors are FLAME/SMPL-X style
(direction = axis, norm = angle in radians); matrices act on column vectors.
"""

from __future__ import annotations

import math

import numpy as np


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) with w >= 0 of a rotation matrix [3, 3] (Shepperd's
    method: divides by the largest of the four candidates, so it is stable everywhere)."""
    r = np.asarray(rotation, dtype=np.float64)
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    candidates = (trace, r[0, 0], r[1, 1], r[2, 2])
    k = candidates.index(max(candidates))
    if k == 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = np.array([0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s,
                      (r[1, 0] - r[0, 1]) / s])
    elif k == 1:
        s = 2.0 * math.sqrt(max(1.0 + r[0, 0] - r[1, 1] - r[2, 2], 0.0))
        q = np.array([(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s,
                      (r[0, 2] + r[2, 0]) / s])
    elif k == 2:
        s = 2.0 * math.sqrt(max(1.0 - r[0, 0] + r[1, 1] - r[2, 2], 0.0))
        q = np.array([(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s,
                      (r[1, 2] + r[2, 1]) / s])
    else:
        s = 2.0 * math.sqrt(max(1.0 - r[0, 0] - r[1, 1] + r[2, 2], 0.0))
        q = np.array([(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s,
                      (r[1, 2] + r[2, 1]) / s, 0.25 * s])
    q /= math.sqrt(q @ q)
    return -q if q[0] < 0 else q


def quaternion_to_axis_angle(quaternion) -> np.ndarray:
    """Axis-angle vector [3] of a quaternion (w, x, y, z), any norm; the angle is in [0, pi]."""
    q = np.asarray(quaternion, dtype=np.float64)
    w, v = (q[0], q[1:]) if q[0] >= 0 else (-q[0], -q[1:])
    s = math.sqrt(v @ v)
    if s < 1e-12:
        return 2.0 * v / max(w, 1e-300)         # first order: angle ~ 2 s / w
    return v * (2.0 * math.atan2(s, w) / s)


def matrix_to_axis_angle(rotation: np.ndarray) -> np.ndarray:
    """Axis-angle vector [3] of a rotation matrix [3, 3]; the angle is in [0, pi]."""
    return quaternion_to_axis_angle(matrix_to_quaternion(rotation))


def axis_angle_to_quaternion(rotvec) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of an axis-angle vector [3]."""
    v = np.asarray(rotvec, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([1.0, *(0.5 * v)])
    return np.array([np.cos(angle / 2), *(v * (np.sin(angle / 2) / angle))])


def axis_angle_to_matrix(rotvec) -> np.ndarray:
    """Rotation matrix [3, 3] of an axis-angle vector [3] (Rodrigues)."""
    return quaternion_to_matrix(axis_angle_to_quaternion(rotvec))


def quaternion_to_matrix(quaternion) -> np.ndarray:
    """Rotation matrix [3, 3] of a quaternion (w, x, y, z); normalised first, as Blender does
    for pose bones."""
    w, x, y, z = np.asarray(quaternion, dtype=np.float64) / np.linalg.norm(quaternion)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def split_roll(rotation: np.ndarray) -> tuple[np.ndarray, float]:
    """(swing axis-angle [3], roll radians) of a camera-frame rotation, roll about z first
    applied last: rotation = R_z(roll) @ R(swing)."""
    # Swing-twist split about z: the twist angle is 2 atan2(q_z, q_w) of the rotation's
    # quaternion, which is this atan2 of matrix entries.
    roll = math.atan2(rotation[1, 0] - rotation[0, 1], rotation[0, 0] + rotation[1, 1])
    return matrix_to_axis_angle(roll_matrix(-roll) @ rotation), roll


def roll_matrix(angle: float) -> np.ndarray:
    """[3, 3] rotation by ``angle`` radians about z (counter-clockwise seen from +z)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
