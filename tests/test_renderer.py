"""Buffer renderer: projection conventions, visibility kernels, buffers, shading, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numba import njit

from portrait_rig.params import Camera, default_sh
from portrait_rig.sh import SH_CONSTANTS
from server.renderer import BufferRenderer, CameraBatch, project, screen_space
from server.renderer.buffers import vertex_normals
from server.renderer.raster_cpu import NumbaRasterizer
from server.renderer.raster_torch import rasterize_torch
from server.renderer import shade_cpu
from server.renderer.shade_cpu import vertex_normals_numba
from server.renderer.srgb import LUT, THRESHOLDS, encode_torch
from portrait_rig.colour import linear_to_srgb
from tests.support.synthetic_face import synthetic_face, uv_sphere

FRONT = Camera()                                     # perspective, z = 1.2 m, fov_y 14 deg
ORTHO = Camera(type="orthographic", scale=6.0)


def _sphere(radius=0.1, n_lat=48, n_lon=64, centre=(0.0, 0.0, 0.0)):
    verts, triangles = uv_sphere(radius, n_lat, n_lon, centre)
    return torch.tensor(verts, dtype=torch.float32)[None], torch.tensor(triangles)


def _render(verts, triangles, cameras, width, height, sh=None, albedo=None, rasterizer="numba"):
    batch, n_verts = verts.shape[:2]
    sh = torch.tensor(default_sh(), dtype=torch.float32) if sh is None else sh
    albedo = torch.full((n_verts, 3), 0.5) if albedo is None else albedo
    renderer = BufferRenderer(triangles, "cpu", rasterizer=rasterizer)
    return renderer.render(verts, albedo, sh, cameras, width, height)


def _sh(**rows):
    """Light code with band 0 = 1 and the given {index: value} rows (grey)."""
    sh = torch.zeros(9, 3)
    sh[0] = 1.0
    for key, value in rows.items():
        sh[int(key[1:])] = value
    return sh


# ---------------------------------------------------------------------------- shading
def test_band0_light_shades_the_mask_uniformly():
    verts, triangles = _sphere()
    sh = torch.zeros(9, 3)
    sh[0] = torch.tensor([1.0, 2.0, 3.0])
    b = _render(verts, triangles, [FRONT], 64, 64, sh=sh)
    inside = b.mask[0, ..., 0] > 0
    expected = sh[0] * SH_CONSTANTS[0]
    assert inside.sum() > 500
    torch.testing.assert_close(b.shading[0][inside], expected.expand(int(inside.sum()), 3))
    assert torch.all(b.shading[0][~inside] == 0)


@pytest.mark.parametrize("camera", [FRONT, ORTHO], ids=["perspective", "orthographic"])
def test_light_along_plus_x_brightens_the_image_right(camera):
    """+X (the subject's left) appears on the image's right for the front camera."""
    verts, triangles = _sphere()
    for sign in (1.0, -1.0):
        b = _render(verts, triangles, [camera], 64, 64, sh=_sh(s1=sign * 0.8))
        lum = b.rendered[0].mean(-1)
        right, left = lum[:, 40:].sum(), lum[:, :24].sum()
        assert (right > 1.5 * left) if sign > 0 else (left > 1.5 * right)


def test_shading_matches_the_deca_formula_on_the_interpolated_normal():
    verts, triangles = _sphere()
    sh = torch.tensor(default_sh(), dtype=torch.float32) + torch.linspace(0, 0.3, 27).view(9, 3)
    b = _render(verts, triangles, [FRONT], 48, 48, sh=sh)
    inside = b.mask[0, ..., 0] > 0
    n = b.normal[0][inside].double().numpy()
    x, y, z = n.T
    basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                      3 * z * z - 1], 1) * SH_CONSTANTS
    np.testing.assert_allclose(b.shading[0][inside].numpy(), basis @ sh.double().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_rendered_is_albedo_times_shading_exactly():
    face = synthetic_face()
    verts = torch.tensor(face.v_template)[None]
    b = _render(verts, face.triangles, [FRONT], 64, 48, albedo=torch.tensor(face.vertex_albedo))
    assert torch.equal(b.rendered, b.albedo * b.shading)
    assert b.albedo.amax() > b.albedo[b.mask[..., 0] > 0].amin()      # albedo really varies


def test_normals_are_interpolated_unit_vertex_normals_without_renormalising():
    verts, triangles = _sphere(n_lat=12, n_lon=16)                  # coarse: chords shorten normals
    b = _render(verts, triangles, [FRONT], 96, 96)
    inside = b.mask[0, ..., 0] > 0
    length = b.normal[0][inside].norm(dim=-1)
    assert length.max() <= 1.0 + 1e-5 and length.min() < 0.995     # not renormalised
    assert torch.all(b.normal[0][~inside] == 0) and torch.all(b.depth[0][~inside] == 0)
    # On a sphere the vertex normals point outwards, (nearly) radially.
    n = vertex_normals(verts, triangles)
    radial = verts / verts.norm(dim=-1, keepdim=True)
    assert (n - radial).norm(dim=-1).max() < 0.06
    assert torch.allclose(n.norm(dim=-1), torch.ones(1))


def test_vertex_normals_are_area_weighted():
    # Vertex 0 is shared by a big triangle facing +Z (area 2) and a small one facing +X (0.5).
    verts = torch.tensor([[[0.0, 0, 0], [2, 0, 0], [0, 2, 0], [0, 1, 0], [0, 0, 1]]])
    triangles = torch.tensor([[0, 1, 2], [0, 3, 4]])
    n = vertex_normals(verts, triangles)[0, 0]
    expected = torch.tensor([0.5, 0.0, 2.0])
    torch.testing.assert_close(n, expected / expected.norm())


def test_depth_is_view_depth():
    verts, triangles = _sphere(radius=0.1)
    b = _render(verts, triangles, [FRONT], 64, 64)
    # Nearest point of the sphere triangles the camera at 1.2 - 0.1 m.
    assert b.depth[0, 31:33, 31:33].min() == pytest.approx(1.1, abs=2e-3)
    ortho = _render(verts, triangles, [ORTHO], 64, 64)
    assert ortho.depth[0, 31:33, 31:33].min() == pytest.approx(-0.1, abs=2e-3)


def test_interpolation_is_perspective_correct():
    """A floor receding from the camera (two long triangles): the interpolated view depth
    must equal the ray's depth where it meets the plane Y = -0.1, row by row."""
    floor_y = -0.1
    verts = torch.tensor([[[-0.3, floor_y, 0.6], [0.3, floor_y, 0.6], [0.3, floor_y, -8.0],
                           [-0.3, floor_y, -8.0]]])
    triangles = torch.tensor([[0, 1, 2], [0, 2, 3]])
    height = 64
    b = _render(verts, triangles, [FRONT], 48, height)
    rows, cols = torch.nonzero(b.mask[0, ..., 0], as_tuple=True)
    assert rows.numel() > 200
    ndc_y = 1 - (rows.double() + 0.5) / height * 2
    focal = 1 / math.tan(math.radians(FRONT.fov_y) / 2)
    expected = (0.0 - floor_y) * focal / -ndc_y                      # camera at Y = 0
    torch.testing.assert_close(b.depth[0, rows, cols, 0].double(), expected, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- geometry
def _pixel_area(verts, triangles, camera, width, height):
    b = _render(verts, triangles, [camera], width, height, sh=_sh())
    return float(b.mask.sum())


@pytest.mark.parametrize("width,height", [(128, 128), (160, 96)])
def test_mask_area_of_a_sphere_matches_its_projection(width, height):
    radius, distance = 0.1, 1.2
    verts, triangles = _sphere(radius, n_lat=64, n_lon=96)
    focal = 1 / math.tan(math.radians(FRONT.fov_y) / 2)
    ndc_radius = focal * radius / math.sqrt(distance ** 2 - radius ** 2)   # silhouette cone
    expected = math.pi * (ndc_radius * height / 2) ** 2
    assert _pixel_area(verts, triangles, FRONT, width, height) == pytest.approx(expected, rel=0.02)
    expected = math.pi * (ORTHO.scale * radius * height / 2) ** 2
    assert _pixel_area(verts, triangles, ORTHO, width, height) == pytest.approx(expected, rel=0.02)


def test_mask_area_of_a_square_facing_the_camera():
    side, distance = 0.2, 1.2
    h = side / 2
    verts = torch.tensor([[[-h, -h, 0.0], [h, -h, 0.0], [h, h, 0.0], [-h, h, 0.0]]])
    triangles = torch.tensor([[0, 1, 2], [0, 2, 3]])
    focal = 1 / math.tan(math.radians(FRONT.fov_y) / 2)
    width, height = 200, 120
    expected = (focal * side / distance * height / 2) ** 2
    assert _pixel_area(verts, triangles, FRONT, width, height) == pytest.approx(expected, rel=0.03)


def test_rotated_camera_looking_at_the_origin_centres_the_sphere():
    verts, triangles = _sphere()
    angle, distance, height = 0.6, 1.2, 0.04
    # Blender axes: rotating the camera about +Y by `angle` turns its view (-Z) towards -X.
    cam = Camera(location=[distance * math.sin(angle), height, distance * math.cos(angle)],
                 rotation=[0.0, angle, 0.0])
    mask = _render(verts, triangles, [cam], 64, 64).mask[0, ..., 0]
    rows, cols = torch.nonzero(mask, as_tuple=True)
    focal = 1 / math.tan(math.radians(cam.fov_y) / 2)
    assert cols.float().mean() == pytest.approx(31.5, abs=0.5)
    # The camera sits `height` above the centre, so the sphere appears below the middle.
    assert rows.float().mean() == pytest.approx(31.5 + focal * height / distance * 32, abs=1.0)


def test_orientation_plus_y_is_up_and_plus_x_is_right():
    # Two small triangles: one at +Y (above the centre), one at +X (right of it).
    tri = np.array([[-0.01, -0.01, 0.0], [0.01, -0.01, 0.0], [0.0, 0.01, 0.0]])
    verts = torch.tensor(np.concatenate([tri + [0, 0.06, 0], tri + [0.06, 0, 0]]),
                         dtype=torch.float32)[None]
    triangles = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for camera in (FRONT, ORTHO):
        triangle = _render(verts, triangles, [camera], 64, 64).triangle[0]
        centres = [torch.nonzero(triangle == face).float().mean(0) for face in (0, 1)]
        (up_row, up_col), (right_row, right_col) = centres
        assert up_row < 24 and abs(up_col - 31.5) < 2, camera.type        # top, centred
        assert right_col > 40 and abs(right_row - 31.5) < 2, camera.type  # right, middle


def test_triangles_outside_the_depth_range_are_not_drawn():
    verts, triangles = _sphere()
    behind = Camera(location=[0.0, 0.0, -1.2])                  # looks down -Z, away from it
    inside = Camera(location=[0.0, 0.0, 0.0])                   # within the sphere: near-clip
    far = Camera(far=0.5)
    for camera in (behind, far):
        assert _render(verts, triangles, [camera], 32, 32).mask.sum() == 0
    # From inside, the back half (depth in [near, far]) is seen; nothing crosses the camera.
    assert _render(verts, triangles, [inside], 32, 32).mask.mean() > 0.9


# ---------------------------------------------------------------------------- visibility
def _screen(verts, camera, width, height):
    cams = CameraBatch.from_params([camera] * verts.shape[0])
    ndc, depth = project(verts, cams, width, height)
    pixel_xy, z_key, _ = screen_space(ndc, depth, cams, width, height)
    return pixel_xy, z_key


@pytest.mark.parametrize("camera,width,height", [(FRONT, 96, 96), (ORTHO, 80, 56),
                                                 (Camera(rotation=[0.03, 0.02, 0.1]), 64, 100)])
def test_numba_visibility_matches_torch(camera, width, height):
    face = synthetic_face()
    verts = torch.tensor(face.v_template, dtype=torch.float32)[None]
    pixel_xy, z_key = _screen(verts, camera, width, height)
    reference = rasterize_torch(pixel_xy, z_key, torch.tensor(face.triangles), width, height)
    fast = NumbaRasterizer(face.triangles)(pixel_xy, z_key, width, height)
    assert (reference.numpy() >= 0).mean() > 0.1
    assert (reference.numpy() == fast).mean() > 0.999


def test_torch_visibility_chunking_does_not_change_the_result():
    face = synthetic_face()
    verts = torch.tensor(face.v_template, dtype=torch.float32)[None]
    pixel_xy, z_key = _screen(verts, FRONT, 64, 64)
    triangles = torch.tensor(face.triangles)
    whole = rasterize_torch(pixel_xy, z_key, triangles, 64, 64)
    chunked = rasterize_torch(pixel_xy, z_key, triangles, 64, 64, max_fragments=100)
    assert torch.equal(whole, chunked)


def _grid_mesh(points: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Pixel-space grid [n, n, 2] -> (pixel_xy [1, n*n, 2], two triangles per cell)."""
    n = points.shape[0]
    idx = np.arange(n * n).reshape(n, n)
    quads = np.stack([idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]], -1).reshape(-1, 4)
    triangles = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    return torch.tensor(points.reshape(1, -1, 2), dtype=torch.float32), triangles


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_no_cracks_between_adjacent_triangles(jitter):
    """A grid of tiny triangles larger than the frame covers every pixel: with vertices on
    pixel centres (every edge runs through centres) and with jittered vertices."""
    n = 36
    xs, ys = np.meshgrid(np.arange(n) * 2.0 - 3.5, np.arange(n) * 1.9 - 2.5)
    points = np.stack([xs, ys], -1)
    points += np.random.default_rng(0).uniform(-jitter, jitter, points.shape)
    pixel_xy, triangles = _grid_mesh(points)
    z_key = torch.zeros(1, n * n)
    for tri in (rasterize_torch(pixel_xy, z_key, torch.tensor(triangles), 64, 64).numpy(),
                NumbaRasterizer(triangles)(pixel_xy, z_key, 64, 64)):
        assert (tri >= 0).all()


def test_triangles_far_larger_than_the_frame_are_clipped_to_it():
    pixel_xy = torch.tensor([[[-3e6, -1e6], [3e6, -1e6], [0.0, 4e6]]])
    z_key = torch.zeros(1, 3)
    triangles = np.array([[0, 1, 2]])
    for tri in (rasterize_torch(pixel_xy, z_key, torch.tensor(triangles), 40, 30).numpy(),
                NumbaRasterizer(triangles)(pixel_xy, z_key, 40, 30)):
        assert (tri == 0).all()


def test_nearest_triangle_wins():
    verts, triangles = _sphere()
    front_only = _render(verts, triangles, [FRONT], 48, 48)
    inside = front_only.mask[0, ..., 0] > 0
    # Every visible normal triangles the camera (z > 0): the far half never shows through.
    assert front_only.normal[0][inside][:, 2].min() > 0


# ---------------------------------------------------------------------------- buffers
def test_batch_of_three_cameras_equals_three_single_renders():
    face = synthetic_face()
    verts = torch.tensor(face.v_template, dtype=torch.float32)[None].repeat(3, 1, 1)
    verts[1] += torch.tensor([0.02, 0.0, 0.0])
    cameras = [FRONT, ORTHO, Camera(location=[0.3, 0.1, 1.1], rotation=[0.0, 0.27, 0.0])]
    sh = torch.tensor(default_sh(), dtype=torch.float32)[None].repeat(3, 1, 1)
    sh[2, 1] = -0.5
    albedo = torch.tensor(face.vertex_albedo)
    renderer = BufferRenderer(face.triangles)
    batch = renderer.render(verts, albedo, sh, cameras, 48, 40)
    for i in range(3):
        single = renderer.render(verts[i:i + 1], albedo, sh[i], cameras[i:i + 1], 48, 40)
        assert torch.equal(batch.triangle[i], single.triangle[0])
        torch.testing.assert_close(batch.packed[i], single.packed[0], rtol=0, atol=1e-6)


def test_torch_and_numba_rasterizers_give_the_same_buffers():
    face = synthetic_face()
    verts = torch.tensor(face.v_template, dtype=torch.float32)[None]
    args = (verts, torch.tensor(face.vertex_albedo), torch.tensor(default_sh()).float(),
            [FRONT], 64, 64)
    a = BufferRenderer(face.triangles, rasterizer="numba").render(*args)
    b = BufferRenderer(face.triangles, rasterizer="torch").render(*args)
    assert torch.equal(a.triangle, b.triangle)
    assert torch.equal(a.packed, b.packed)


def test_reused_output_matches_a_fresh_render():
    verts, triangles = _sphere()
    renderer = BufferRenderer(triangles)
    args = (torch.full((verts.shape[1], 3), 0.5), torch.tensor(default_sh()).float())
    with torch.no_grad():
        first = renderer.render(verts, *args, [FRONT], 40, 40)
        moved = renderer.render(verts + 0.03, *args, [FRONT], 40, 40)
        again = renderer.render(verts, *args, [FRONT], 40, 40, out=moved)
    assert again.packed.data_ptr() == moved.packed.data_ptr()
    assert torch.equal(again.packed, first.packed)


def test_gradients_reach_vertices_albedo_and_light():
    face = synthetic_face()
    verts = torch.tensor(face.v_template, dtype=torch.float32)[None].requires_grad_()
    albedo = torch.tensor(face.vertex_albedo).requires_grad_()
    sh = torch.tensor(default_sh(), dtype=torch.float32).requires_grad_()
    b = BufferRenderer(face.triangles).render(verts, albedo, sh, [FRONT], 48, 48)
    b.rendered.sum().backward()
    for grad in (verts.grad, albedo.grad, sh.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # d(sum rendered) / d sh[k, c] = sum over covered pixels of albedo_c * C_k * B_k(n).
    inside = b.mask[0, ..., 0] > 0
    n = b.normal[0][inside].detach().double()
    x, y, z = n.unbind(-1)
    basis = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                         3 * z * z - 1], 1) * torch.tensor(SH_CONSTANTS)
    expected = basis.T @ b.albedo[0][inside].detach().double()
    torch.testing.assert_close(sh.grad.double(), expected, rtol=1e-4, atol=1e-4)


def test_bad_inputs_name_the_problem():
    verts, triangles = _sphere(n_lat=6, n_lon=8)
    renderer = BufferRenderer(triangles)
    albedo, sh = torch.zeros(verts.shape[1], 3), torch.zeros(9, 3)
    with pytest.raises(ValueError, match="vertices"):
        renderer.render(verts[0], albedo, sh, [FRONT], 8, 8)
    with pytest.raises(ValueError, match="vertex_albedo"):
        renderer.render(verts, albedo[:-1], sh, [FRONT], 8, 8)
    with pytest.raises(ValueError, match="sh"):
        renderer.render(verts, albedo, sh[:4], [FRONT], 8, 8)
    with pytest.raises(ValueError, match="cameras"):
        renderer.render(verts, albedo, sh, [FRONT, FRONT], 8, 8)
    with pytest.raises(ValueError, match="frame size"):
        renderer.render(verts, albedo, sh, [FRONT], 0, 8)
    with pytest.raises(ValueError, match="rasterizer"):
        BufferRenderer(triangles, rasterizer="opengl")


def test_numba_vertex_normals_match_torch():
    face = synthetic_face()
    rng = np.random.default_rng(1)
    verts = (face.v_template + rng.normal(0, 0.003, face.v_template.shape)).astype(np.float32)
    fast = vertex_normals_numba(verts[None], face.triangles)
    reference = vertex_normals(torch.tensor(verts)[None], torch.tensor(face.triangles).long())
    np.testing.assert_allclose(fast, reference.numpy(), atol=1e-5)


@njit
def _encode_all(linear, lut, thresholds, out):
    for i in range(linear.size):
        out[i] = shade_cpu._encode(linear[i], lut, thresholds)


def encode_numba(linear: np.ndarray) -> np.ndarray:
    """The CPU preview's per-pixel sRGB encoder on a float32 array (any shape) -> uint8 codes."""
    flat = np.ascontiguousarray(linear, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    _encode_all(flat, LUT, shade_cpu._THRESHOLDS_PADDED, out)
    return out.reshape(np.shape(linear))


def test_srgb_encoders_round_the_transfer_function_and_agree():
    x = np.concatenate([np.linspace(-0.1, 1.1, 400_001, dtype=np.float32), THRESHOLDS,
                        np.nextafter(THRESHOLDS, np.float32(0)), [np.nan, np.inf, -np.inf]])
    fast = encode_numba(x)
    np.testing.assert_array_equal(fast, encode_torch(torch.tensor(x)).numpy())
    np.testing.assert_array_equal(fast, np.searchsorted(THRESHOLDS, np.nan_to_num(x).clip(0, 1),
                                                        side="right"))
    # Up to float32 rounding of the half-code thresholds, that is round(255 * srgb(x)).
    grid = slice(0, 400_001)
    exact = np.round(linear_to_srgb(x[grid].astype(np.float64)) * 255)
    assert np.abs(fast[grid] - exact).max() <= 1 and (fast[grid] != exact).mean() < 1e-4
    assert fast[-3:].tolist() == [0, 255, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    face = synthetic_face()
    verts = torch.tensor(face.v_template, dtype=torch.float32)[None]
    args = [verts, torch.tensor(face.vertex_albedo), torch.tensor(default_sh()).float()]
    cpu = BufferRenderer(face.triangles, "cpu").render(*args, [FRONT], 96, 80)
    gpu = BufferRenderer(face.triangles, "cuda").render(*(a.cuda() for a in args), [FRONT], 96, 80)
    same = (cpu.triangle == gpu.triangle.cpu()).float().mean()
    assert same > 0.999
    both = (cpu.triangle >= 0) & (cpu.triangle == gpu.triangle.cpu())
    torch.testing.assert_close(cpu.packed[both], gpu.packed.cpu()[both], rtol=1e-4, atol=1e-4)
