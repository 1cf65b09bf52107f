"""Spherical-harmonics lighting: DECA's constants and the radiance projection."""

import math

import numpy as np

from portrait_rig import sh


def fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = i * math.pi * (3 - math.sqrt(5))
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def test_constants_match_deca():
    pi = math.pi
    expected = [1 / np.sqrt(4 * pi), ((2 * pi) / 3) * (np.sqrt(3 / (4 * pi))),
                ((2 * pi) / 3) * (np.sqrt(3 / (4 * pi))), ((2 * pi) / 3) * (np.sqrt(3 / (4 * pi))),
                (pi / 4) * 3 * (np.sqrt(5 / (12 * pi))), (pi / 4) * 3 * (np.sqrt(5 / (12 * pi))),
                (pi / 4) * 3 * (np.sqrt(5 / (12 * pi))), (pi / 4) * (3 / 2) * (np.sqrt(5 / (12 * pi))),
                (pi / 4) * (1 / 2) * (np.sqrt(5 / (4 * pi)))]
    np.testing.assert_allclose(sh.SH_CONSTANTS, expected, rtol=1e-12)


def test_orthonormal_basis_integrates_to_identity():
    dirs, solid = sh.equirect_directions(256, 512)
    assert math.isclose(solid.sum(), 4 * math.pi, rel_tol=1e-9)
    y = sh.basis(dirs) * sh.ORTHONORMAL
    gram = (y * solid[:, None]).T @ y
    np.testing.assert_allclose(gram, np.eye(9), atol=2e-3)


def test_uniform_environment_shades_to_its_radiance():
    dirs, solid = sh.equirect_directions(64, 128)
    rgb = np.array([0.2, 0.5, 1.5])
    code = sh.project_radiance(dirs, np.tile(rgb, (len(dirs), 1)), solid)
    # Band 0 is exact; the higher bands integrate to zero up to the grid's quadrature error.
    np.testing.assert_allclose(code[0], rgb * math.sqrt(4 * math.pi), rtol=1e-12)
    np.testing.assert_allclose(code, sh.uniform(rgb), atol=1e-3)
    normals = fibonacci_sphere(50)
    np.testing.assert_allclose(sh.shade(normals, code), np.tile(rgb, (50, 1)), atol=1e-3)


def test_projection_reproduces_lambertian_irradiance():
    """A smooth sky (radiance = 1 + z, Z up) has exact irradiance E(n) = pi (1 + n_z * 2/3);
    the projected code must shade to E / pi (radiance leaving a white Lambertian surface)."""
    dirs, solid = sh.equirect_directions(128, 256)
    radiance = np.repeat((1.0 + dirs[:, 2])[:, None], 3, axis=1)
    code = sh.project_radiance(dirs, radiance, solid)
    normals = fibonacci_sphere(200)
    expected = 1.0 + normals[:, 2] * 2.0 / 3.0
    np.testing.assert_allclose(sh.shade(normals, code)[:, 0], expected, atol=2e-3)


def test_light_from_plus_x_brightens_plus_x_normals():
    dirs, solid = sh.equirect_directions(64, 128)
    spot = (dirs @ np.array([1.0, 0.0, 0.0])) > 0.95
    radiance = np.where(spot[:, None], 50.0, 0.1) * np.ones((1, 3))
    code = sh.project_radiance(dirs, radiance, solid)
    assert (code[1] > 0).all() and abs(code[2, 0]) < 1e-6 * abs(code[1, 0]) + 1e-9
    bright, dark = sh.shade(np.array([[1.0, 0, 0], [-1.0, 0, 0]]), code)
    assert (bright > dark).all()


def test_equirect_mapping_follows_cycles():
    """Cycles: u = 0.5 - atan2(y, x) / 2pi, v = 1 - acos(z) / pi (v = 0 bottom row)."""
    dirs, _ = sh.equirect_directions(8, 16)
    grid = dirs.reshape(8, 16, 3)
    # Centre column (u = 0.5) looks down +X; bottom row (v small) points down (-Z).
    centre = grid[:, 8] + grid[:, 7]
    assert (centre[:, 0] > 0).all() and np.allclose(centre[:, 1], 0, atol=1e-12)
    assert grid[0, :, 2].max() < -0.9 and grid[-1, :, 2].min() > 0.9
    # u = 0.25 looks down +Y.
    assert grid[4, 4, 1] > 0.9 or grid[4, 3, 1] > 0.9
