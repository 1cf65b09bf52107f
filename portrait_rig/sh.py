"""Second-order spherical-harmonics lighting in DECA's convention (numpy; Blender and server).

DECA (decalib/utils/renderer.py, ``add_SHlight``) shades a unit normal n = (x, y, z) with

    shading(n) = sum_k L[k] * C[k] * B_k(n),   B = [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1]

where L is the [9, 3] light code and C the constants below: the orthonormal real SH
normalisation times Ramamoorthi & Hanrahan's clamped-cosine factors A_1 = 2pi/3, A_2 = pi/4,
except that band 0 carries 1 instead of A_0 = pi.

``project_radiance`` turns an environment's radiance into a light code such that ``shade``
returns the radiance leaving a white Lambertian surface (irradiance / pi). Writing L_lm for the
plain SH projection of the radiance, that code is L_00 for band 0 and L_lm / pi for bands 1 and 2
(the factor pi that DECA's band 0 lacks). So a uniform environment of radiance c gives
L[0] = c * sqrt(4 pi) and shading c everywhere.
"""

from __future__ import annotations

import math

import numpy as np

SH_CONSTANTS = np.array([
    1.0 / math.sqrt(4 * math.pi),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * (3 / 2) * math.sqrt(5 / (12 * math.pi)),
    (math.pi / 4) * (1 / 2) * math.sqrt(5 / (4 * math.pi)),
], dtype=np.float64)

# Orthonormal real SH for the same nine basis polynomials (B_k * ORTHONORMAL[k] = Y_lm).
ORTHONORMAL = np.array([
    1.0 / math.sqrt(4 * math.pi),
    math.sqrt(3 / (4 * math.pi)), math.sqrt(3 / (4 * math.pi)), math.sqrt(3 / (4 * math.pi)),
    3 * math.sqrt(5 / (12 * math.pi)), 3 * math.sqrt(5 / (12 * math.pi)),
    3 * math.sqrt(5 / (12 * math.pi)),
    (3 / 2) * math.sqrt(5 / (12 * math.pi)),
    (1 / 2) * math.sqrt(5 / (4 * math.pi)),
], dtype=np.float64)

# From a plain SH projection to DECA's light code (see module docstring).
_PROJECTION_TO_CODE = np.array([1.0] + [1.0 / math.pi] * 8, dtype=np.float64)


def basis(normals: np.ndarray) -> np.ndarray:
    """[..., 3] unit normals -> [..., 9] polynomials B_k(n) (without constants)."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    one = np.ones_like(x)
    return np.stack([one, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], axis=-1)


def shade(normals: np.ndarray, sh: np.ndarray) -> np.ndarray:
    """[..., 3] normals, [9, 3] light code -> [..., 3] shading (DECA's add_SHlight)."""
    return (basis(normals) * SH_CONSTANTS) @ np.asarray(sh, dtype=np.float64)


def project_radiance(directions: np.ndarray, radiance: np.ndarray,
                     solid_angles: np.ndarray) -> np.ndarray:
    """Light code [9, 3] of an environment sampled as unit ``directions`` [N, 3] (model frame)
    with RGB ``radiance`` [N, 3] over ``solid_angles`` [N] (steradians, summing to 4pi)."""
    y = basis(directions) * ORTHONORMAL                       # [N, 9] orthonormal SH
    coeffs = (y * solid_angles[:, None]).T @ radiance          # [9, 3] plain projection
    return coeffs * _PROJECTION_TO_CODE[:, None]


def uniform(rgb) -> np.ndarray:
    """Light code of a uniform environment of radiance ``rgb``."""
    code = np.zeros((9, 3))
    code[0] = np.asarray(rgb, dtype=np.float64) * math.sqrt(4 * math.pi)
    return code


def equirect_directions(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Directions and solid angles of the pixel centres of an equirectangular image in
    Blender's world frame (Z up), with Cycles' mapping u = 0.5 - atan2(y, x) / (2pi),
    v = 1 - acos(z) / pi (v = 0 is the bottom row, as Blender stores pixels)."""
    v = (np.arange(height) + 0.5) / height
    u = (np.arange(width) + 0.5) / width
    theta = (1.0 - v) * math.pi                               # polar angle from +Z
    phi = (0.5 - u) * 2 * math.pi                             # atan2(y, x)
    theta, phi = np.meshgrid(theta, phi, indexing="ij")
    sin_t = np.sin(theta)
    dirs = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), np.cos(theta)], axis=-1)
    # Exact solid angle of each row's band, split evenly over its pixels.
    edges = (1.0 - np.arange(height + 1) / height) * math.pi
    band = (np.cos(edges[1:]) - np.cos(edges[:-1])) * 2 * math.pi / width
    solid = np.broadcast_to(np.abs(band)[:, None], (height, width))
    return dirs.reshape(-1, 3), solid.reshape(-1).copy()


def _fit_directions(n: int = 64) -> np.ndarray:
    """``n`` well-spread unit vectors (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    rho = np.sqrt(1 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


_FIT_DIRECTIONS = _fit_directions()
_FIT = np.linalg.pinv(basis(_FIT_DIRECTIONS) * SH_CONSTANTS)                 # [9, 64]


def rotate(code: np.ndarray, rotation) -> np.ndarray:
    """Light code [9, 3] of the same lighting in a frame where direction d becomes
    ``rotation @ d``: shade(rotation @ n; result) = shade(n; code) for every unit n.

    Shading is a polynomial of degree <= 2 in n, a space closed under rotation, so a
    least-squares fit on 64 directions recovers the rotated code exactly (to rounding)."""
    original = _FIT_DIRECTIONS @ np.asarray(rotation, dtype=np.float64)      # rows R^T m
    return _FIT @ ((basis(original) * SH_CONSTANTS) @ np.asarray(code, dtype=np.float64))


def downsample_equirect(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Box-filter an equirectangular image [h, w, C] (bottom row first) to at most
    [height, width, C], weighting source rows by their solid angle (sin of the polar angle)
    so that each texel holds the mean radiance over its patch of sphere."""
    h, w = pixels.shape[:2]
    height, width = min(height, h), min(width, w)
    row_weight = np.sin((1.0 - (np.arange(h) + 0.5) / h) * math.pi)
    row_start = np.searchsorted((np.arange(h) * height) // h, np.arange(height))
    col_start = np.searchsorted((np.arange(w) * width) // w, np.arange(width))
    weighted = np.add.reduceat(pixels * row_weight[:, None, None], row_start, axis=0)
    summed = np.add.reduceat(weighted, col_start, axis=1)
    col_count = np.diff(np.append(col_start, w))
    weight = np.add.reduceat(row_weight, row_start)[:, None] * col_count[None, :]
    return summed / weight[..., None]
