"""DiffusionRig's buffers in DECA's conventions: the rig -> DECA code mapping, the buffers'
layout and ranges, and FLAME texture-space albedo (fixtures in the official file format)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from portrait_rig import sh
from portrait_rig.face_source import load_face_data
from portrait_rig.params import RigParams
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from portrait_rig.sh import rotate
from server.renderer.deca import DecaBufferRenderer
from server.renderer.face_model import FaceModel
from server.renderer import CameraBatch, project
from server.renderer.texture import FlameTexture, TextureError

SIZE = 64


@pytest.fixture(scope="module")
def demo():
    return load_face_data("demo")


@pytest.fixture(scope="module")
def deca(demo):
    return DecaBufferRenderer(FaceModel(demo))


def params(**fields) -> RigParams:
    return RigParams.from_dict(fields)


ORTHO = {"type": "orthographic", "scale": 8.0}


# ---------------------------------------------------------------------------- buffers

def test_buffers_layout_ranges_and_orientation(deca):
    turned = params(camera=ORTHO, pose={"global": [0.0, 0.4, 0.0], "jaw": [0.2, 0, 0]},
                    expression=[1.0])
    buffers = deca.render(deca.codes([turned], SIZE, SIZE), SIZE)
    mask = buffers.mask[0, ..., 0] > 0
    assert 0.2 < mask.float().mean() < 0.8
    for name in ("normal", "albedo", "shading", "rendered"):
        assert (getattr(buffers, name)[0][~mask] == 0).all(), f"{name} outside the mask"
    normal, albedo = buffers.normal[0][mask], buffers.albedo[0][mask]
    assert normal.abs().max() <= 1.0 + 1e-5 and normal.norm(dim=-1).median() > 0.98
    assert albedo.min() >= 0 and albedo.max() <= 1
    torch.testing.assert_close(buffers.rendered, buffers.albedo * buffers.shading)
    # Visible surfaces face the viewer (+Z in DECA's camera-frame world).
    assert (normal[:, 2] > 0).float().mean() > 0.95
    # Rows run top to bottom: the crown (normals up) is at the top, and the subject's left
    # (+X, normals pointing right) is on the image's right.
    rows, cols = torch.nonzero(mask, as_tuple=True)
    top = rows < rows.min() + 0.1 * (rows.max() - rows.min())
    right = cols > cols.max() - 0.1 * (cols.max() - cols.min())
    assert normal[top, 1].mean() > 0.5
    assert normal[right, 0].mean() > 0.5
    # The UNet's condition: rendered, normal, albedo, NCHW.
    condition = deca.conditioning(buffers)
    assert condition.shape == (1, 9, SIZE, SIZE)
    torch.testing.assert_close(condition[0, 3:6].permute(1, 2, 0), buffers.normal[0])
    torch.testing.assert_close(condition[0, 6:9].permute(1, 2, 0), buffers.albedo[0])


def test_vertex_albedo_is_display_encoded(deca, demo):
    # DECA's albedo comes from texture images (code values / 255): linear albedo is encoded.
    buffers = deca.render(deca.codes([params(camera=ORTHO)], SIZE, SIZE), SIZE)
    mask = buffers.mask[0, ..., 0] > 0
    skin = torch.tensor(demo.vertex_albedo).median(dim=0).values
    encoded = torch.where(skin <= 0.0031308, skin * 12.92, 1.055 * skin ** (1 / 2.4) - 0.055)
    torch.testing.assert_close(buffers.albedo[0][mask].median(dim=0).values, encoded,
                               atol=0.02, rtol=0)


# ---------------------------------------------------------------------------- code mapping

def projected(deca, demo, rig: RigParams, width=SIZE, height=SIZE):
    """(rig's own NDC, DECA's NDC) of every vertex, both in the covering square's units."""
    vertices, _ = FaceModel(demo).pose_params([rig])
    ndc_rig, _ = project(vertices, CameraBatch.from_params([rig.camera]), width, height)
    side = max(width, height)
    ndc_rig = ndc_rig[0] * torch.tensor([width / side, height / side])
    codes = deca.codes([rig], width, height)
    ndc_deca, _ = project(deca.vertices(codes), deca.cameras(codes), side, side)
    return ndc_rig, ndc_deca[0], codes


def test_codes_slice_identity_expression_and_jaw(deca):
    rig = params(shape=[0.5] * 14, expression=[0.3] * 14, pose={"jaw": [0.2, 0.01, 0.0]})
    codes = deca.codes([rig], SIZE, SIZE)
    assert codes.shape.shape == (1, 100) and codes.exp.shape == (1, 50)
    assert codes.pose.shape == (1, 6) and codes.cam.shape == (1, 3)
    assert codes.light.shape == (1, 9, 3)
    assert torch.equal(codes.shape[0, :14], torch.full((14,), 0.5))
    assert (codes.shape[0, 14:] == 0).all()
    torch.testing.assert_close(codes.pose[0, 3:], torch.tensor([0.2, 0.01, 0.0]))


def test_neck_rotation_is_folded_into_the_global_rotation(deca, demo):
    neck = [0.25, -0.35, 0.1]
    rig = params(camera={**ORTHO, "tx": 0.01, "ty": -0.02}, pose={"neck": neck},
                 translation=[0.01, 0.02, 0.03])
    ndc_rig, ndc_deca, codes = projected(deca, demo, rig)
    torch.testing.assert_close(codes.pose[0, :3], torch.tensor(neck), atol=1e-6, rtol=0)
    # The head (skinned to the neck and its children only) lands where the rig puts it; what
    # is left is FLAME's neck correctives, which DECA does not have.
    head = torch.from_numpy(demo.weights[:, 1:].sum(axis=1) > 0.999)
    error = (ndc_rig - ndc_deca).norm(dim=-1)
    assert error[head].mean() < 2e-3 and error[head].max() < 0.03
    # Without the pivot correction the head would be off by much more.
    assert (codes.cam[0, 1:] - torch.tensor([0.01, -0.02])).abs().max() > 0.005


def test_global_and_neck_compose(deca):
    g, n = [0.1, 0.5, -0.2], [0.3, -0.1, 0.2]
    codes = deca.codes([params(pose={"global": g, "neck": n}, camera=ORTHO)], SIZE, SIZE)
    want = axis_angle_to_matrix(g) @ axis_angle_to_matrix(n)
    np.testing.assert_allclose(axis_angle_to_matrix(codes.pose[0, :3].double().numpy()), want,
                               atol=1e-6)


def test_eye_rotations_are_ignored(deca):
    still = deca.codes([params()], SIZE, SIZE)
    looking = deca.codes([params(pose={"eye_left": [0.2, 0.3, 0], "eye_right": [0.1, 0, 0]})],
                         SIZE, SIZE)
    for field in ("shape", "exp", "pose", "cam", "light"):
        assert torch.equal(getattr(still, field), getattr(looking, field)), field


@pytest.mark.parametrize("camera, width, height", [
    ({}, SIZE, SIZE),                                                  # default perspective
    ({"location": [1.2 * math.sin(0.5), 0.1, 1.2 * math.cos(0.5)], "rotation": [0, 0.5, 0]},
     80, 50),                                                          # orbiting, landscape
    ({"location": [0.0, 0.0, 6.0], "fov_y": 2.8}, 40, 64),             # long lens, portrait
])
def test_perspective_camera_becomes_weak_perspective(deca, demo, camera, width, height):
    rig = params(camera=camera, pose={"global": [0.1, -0.3, 0.0]}, translation=[0.02, 0, 0])
    ndc_rig, ndc_deca, _ = projected(deca, demo, rig, width, height)
    error = (ndc_rig - ndc_deca).norm(dim=-1)
    depth_ratio = 0.12 / (1.2 if camera.get("fov_y") is None else 6.0)   # head depth / distance
    extent = ndc_rig.abs().max()
    assert error.mean() < 0.3 * depth_ratio * extent
    assert error.max() < 1.5 * depth_ratio * extent


def test_light_follows_a_rotated_camera(deca):
    rotation = [0.2, 0.7, -0.1]
    light = np.random.default_rng(0).normal(size=(9, 3))
    rig = params(camera={"rotation": rotation}, lighting={"sh": light.tolist()})
    codes = deca.codes([rig], SIZE, SIZE)
    normals = np.random.default_rng(1).normal(size=(50, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    world = normals @ axis_angle_to_matrix(rotation).T           # camera-frame normals in the world
    np.testing.assert_allclose(sh.shade(normals, codes.light[0].double().numpy()),
                               sh.shade(world, light), atol=1e-5)
    ortho = deca.codes([params(camera={**ORTHO, "rotation": rotation},
                               lighting={"sh": light.tolist()})], SIZE, SIZE)
    np.testing.assert_allclose(ortho.light[0].numpy(), light, atol=1e-6)   # no camera rotation


def test_rotate_sh_and_axis_angle_round_trips():
    light = np.random.default_rng(2).normal(size=(9, 3))
    np.testing.assert_allclose(rotate(light, np.eye(3)), light, atol=1e-12)
    r = axis_angle_to_matrix([0.3, -1.0, 0.4])
    np.testing.assert_allclose(rotate(rotate(light, r), r.T), light, atol=1e-10)
    for vector in ([0.0, 0.0, 0.0], [1e-9, 0, 0], [0.3, -1.0, 0.4], [0.0, math.pi - 1e-7, 0.0],
                   [math.pi / math.sqrt(2), 0.0, -math.pi / math.sqrt(2)]):
        back = axis_angle_to_matrix(matrix_to_axis_angle(axis_angle_to_matrix(vector)))
        np.testing.assert_allclose(back, axis_angle_to_matrix(vector), atol=1e-9)


# ---------------------------------------------------------------------------- texture space

TEX = 64          # texels per side of the fixture (the official file has 512)
# Quadrant colours as RGB; the file stores them BGR.
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = (255, 0, 0), (0, 255, 0), (0, 0, 255), \
    (255, 255, 255)


def write_flame_texture(path, groups: np.ndarray, seed: int = 0) -> None:
    """A FLAME_texture.npz look-alike: the official keys and layouts (mean [H, W, 3] and
    tex_dir [H, W, 3, 200] BGR code values, vt [T, 2], ft [F, 3]) at TEX x TEX texels. The mean
    has four coloured quadrants; every corner of a face in group 0 sits in the top-left
    quadrant's middle (u, v) = (0.25, 0.75), group 1 in the bottom-right one's."""
    rng = np.random.default_rng(seed)
    mean = np.zeros((TEX, TEX, 3))
    half = TEX // 2
    for rows, cols, rgb in ((slice(0, half), slice(0, half), TOP_LEFT),
                            (slice(0, half), slice(half, None), TOP_RIGHT),
                            (slice(half, None), slice(0, half), BOTTOM_LEFT),
                            (slice(half, None), slice(half, None), BOTTOM_RIGHT)):
        mean[rows, cols] = rgb[::-1]
    vt = np.concatenate([rng.uniform(0, 1, (40, 2)), [[0.25, 0.75], [0.75, 0.25]]])
    ft = np.where(groups[:, None] == 0, len(vt) - 2, len(vt) - 1).repeat(3, axis=1)
    np.savez(path, mean=mean, tex_dir=rng.normal(0, 10, (TEX, TEX, 3, 200)), vt=vt,
             ft=ft.astype(np.uint32))


@pytest.fixture(scope="module")
def flame_model(tmp_path_factory):
    from tests.support.flame_fixture import write_flame_fixture

    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    write_flame_fixture(path)
    return FaceModel(load_face_data(str(path)))


def test_flame_texture_albedo_is_sampled_per_pixel(flame_model, tmp_path):
    triangles = flame_model.data.triangles
    centroid_x = flame_model.data.v_template[triangles].mean(axis=1)[:, 0]
    groups = (centroid_x < 0).astype(int)               # group 0: the subject's left (+X)
    path = tmp_path / "FLAME_texture.npz"
    write_flame_texture(path, groups)
    texture = FlameTexture(path)
    deca = DecaBufferRenderer(flame_model, texture)
    buffers = deca.render(deca.codes([params(camera=ORTHO)], SIZE, SIZE), SIZE)
    triangle = buffers.triangle[0]
    covered = triangle >= 0
    group = torch.from_numpy(groups)[triangle[covered].long()]
    albedo = buffers.albedo[0][covered]
    assert (group == 0).sum() > 50 and (group == 1).sum() > 50
    # Exact texel colours: BGR swapped to RGB, v = 1 at the top row, u = 0 at the left.
    torch.testing.assert_close(albedo[group == 0], torch.tensor(TOP_LEFT).float().expand(
        int((group == 0).sum()), 3) / 255)
    torch.testing.assert_close(albedo[group == 1], torch.tensor(BOTTOM_RIGHT).float().expand(
        int((group == 1).sum()), 3) / 255)
    assert (buffers.albedo[0][~covered] == 0).all()
    torch.testing.assert_close(buffers.rendered, buffers.albedo * buffers.shading)
    # The subject's left (+X) is on the image's right.
    cols = torch.nonzero(covered, as_tuple=True)[1]
    assert cols[group == 0].float().mean() > cols[group == 1].float().mean() + 5


@pytest.mark.parametrize("save, size", [(np.savez, 2 * TEX), (np.savez_compressed, 48)])
def test_flame_texture_codes_follow_the_texture_space(tmp_path, save, size):
    rng = np.random.default_rng(3)
    path = tmp_path / "FLAME_texture.npz"
    mean, tex_dir = rng.uniform(0, 255, (TEX, TEX, 3)), rng.normal(0, 10, (TEX, TEX, 3, 60))
    save(path, mean=mean, tex_dir=tex_dir, vt=rng.uniform(0, 1, (10, 2)),
         ft=rng.integers(0, 10, (7, 3)))
    texture = FlameTexture(path, size=size)
    assert texture.n_components == 60
    code = rng.normal(size=(2, 50))
    maps = texture.albedo_map(torch.from_numpy(code)).numpy()
    # DECA: the map at the code, BGR -> RGB, resized with nearest-neighbour sampling.
    expected = (mean[None] + np.einsum("hwck,bk->bhwc", tex_dir[..., :50], code)) / 255
    expected = torch.from_numpy(expected[..., ::-1].transpose(0, 3, 1, 2).copy())
    expected = torch.nn.functional.interpolate(expected, size=(size, size), mode="nearest")
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-5)
    mean_map = texture.albedo_map()
    np.testing.assert_allclose(mean_map, texture.albedo_map(torch.zeros(1, 50)))
    np.testing.assert_allclose(mean_map[0].numpy(), torch.nn.functional.interpolate(
        torch.from_numpy(mean[None, ..., ::-1].transpose(0, 3, 1, 2) / 255), size=(size, size),
        mode="nearest")[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="appearance.texture: 61 values, .* 60 components"):
        texture.albedo_map(torch.ones(1, 61))
    with pytest.raises(TextureError, match="7 triangles"):
        texture.check_triangles(9976)


def test_flame_texture_rejects_malformed_files(tmp_path):
    with pytest.raises(TextureError, match="not found"):
        FlameTexture(tmp_path / "missing.npz")
    path = tmp_path / "partial.npz"
    np.savez(path, mean=np.zeros((4, 4, 3)), vt=np.zeros((3, 2)))
    with pytest.raises(TextureError, match="lacks tex_dir, ft"):
        FlameTexture(path)
    np.savez(path, mean=np.zeros((4, 4, 3)), tex_dir=np.zeros((4, 4, 3, 2)),
             vt=np.zeros((3, 2)), ft=np.full((2, 3), 5))
    with pytest.raises(TextureError, match="indices into vt"):
        FlameTexture(path)
    np.savez(path, mean=np.zeros((4, 4, 3)), tex_dir=np.zeros((4, 5, 3, 2)),
             vt=np.zeros((3, 2)), ft=np.zeros((2, 3)))
    with pytest.raises(TextureError, match=r"tex_dir has shape \(4, 5, 3, 2\), expected \[4, 4, 3, K\]"):
        FlameTexture(path)
