"""One camera-relative head for every backend (``server.renderer.head_view``): a neck turn and
a global turn, or a camera orbit with the light carried along, condition every backend alike."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from portrait_rig import sh
from portrait_rig.face_source import load_face_data
from portrait_rig.params import RigParams
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from server.backends import RenderRequest, create_backend
from server.renderer.deca import DecaBufferRenderer
from server.renderer.face_model import FaceModel
from server.renderer.head_view import head_views

TURN = [0.15, 0.45, 0.1]                      # a head turn with some roll


@pytest.fixture(scope="module")
def face_model():
    return FaceModel(load_face_data("demo"), "cpu")


def lit(params: RigParams) -> RigParams:
    """A directional light, so a light in the wrong frame shows."""
    params.lighting.sh[1] = [0.5, 0.4, 0.3]
    params.lighting.sh[3] = [0.2, 0.2, 0.2]
    return params


def global_turn() -> RigParams:
    params = lit(RigParams())
    params.pose.global_ = list(TURN)
    return params


def neck_turn() -> RigParams:
    params = lit(RigParams())
    params.pose.neck = list(TURN)
    return params


def orbit(params: RigParams, root=np.zeros(3), turn=(0.05, 0.6, -0.2)) -> RigParams:
    """The same head seen by a camera rotated by ``turn`` about the model origin, the head
    (about its ``root`` joint) and the light turned with it: nothing changes relative to the
    camera."""
    moved = copy.deepcopy(params)
    r = axis_angle_to_matrix(list(turn))
    moved.camera.rotation = list(turn)
    moved.camera.location = (r @ np.asarray(params.camera.location)).tolist()
    moved.pose.global_ = matrix_to_axis_angle(r @ axis_angle_to_matrix(params.pose.global_)).tolist()
    moved.translation = (r @ (root + params.translation) - root).tolist()
    moved.lighting.sh = sh.rotate(np.asarray(params.lighting.sh), r).tolist()
    return moved


def test_neck_and_global_turns_give_one_view():
    a, b = head_views([global_turn(), neck_turn()], 64, 64)
    np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-12)
    np.testing.assert_allclose(a.swing, b.swing, atol=1e-12)
    assert a.roll == pytest.approx(b.roll, abs=1e-12) and abs(a.roll) > 0.05
    np.testing.assert_allclose(a.light, b.light, atol=1e-12)


def test_camera_orbit_with_the_light_leaves_the_view():
    base = global_turn()
    a, b = head_views([base, orbit(base)], 64, 48)
    np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-9)
    np.testing.assert_allclose(a.light, b.light, atol=1e-9)
    assert a.shift == pytest.approx(b.shift, abs=1e-9)
    # A light that stays in the world while the camera orbits is seen from another side.
    fixed_light = orbit(base)
    fixed_light.lighting.sh = base.lighting.sh
    c, = head_views([fixed_light], 64, 48)
    assert np.abs(c.light - a.light).max() > 0.05


def test_diffusionrig_codes_fold_the_neck_and_follow_the_camera(face_model):
    deca = DecaBufferRenderer(face_model)
    root = face_model.data.J_regressor[0] @ face_model.data.v_template
    codes = deca.codes([global_turn(), neck_turn(), orbit(global_turn(), root)], 64, 64)
    torch.testing.assert_close(codes.pose[1, :3], codes.pose[0, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(codes.pose[2], codes.pose[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(codes.light[1], codes.light[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(codes.light[2], codes.light[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(codes.cam[2], codes.cam[0], atol=1e-6, rtol=0)


def test_preview_frame_follows_a_camera_orbit(face_model):
    backend = create_backend("preview", face_model, "cpu")
    base = global_turn()
    root = face_model.data.J_regressor[0] @ face_model.data.v_template
    a, b = backend.render([RenderRequest(base, 96, 96), RenderRequest(orbit(base, root), 96, 96)])
    differs = np.abs(a.image.astype(int) - b.image.astype(int)).max(axis=-1) > 2
    assert differs.mean() < 0.002                 # rasterisation ties on a few edge pixels
    assert (a.image[..., 3] > 0).mean() > 0.1
