"""'Fit Rig to Photo' in real Blender against the real render server: the rig takes the
server's answer, and reading the scene back gives the fitted parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from tests.support.blender_env import (blender, bpy, draw, extension,  # noqa: E402,F401
                                       extension_repository, render_server)

pytestmark = pytest.mark.blender


def stage_rig(extension, server):
    """A camera 1.2 m in front of the rig, turned 10 degrees about Blender's Z, and a rig
    fetched from ``server``."""
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = server.host, server.port
    prefs.face_source = 'SERVER'
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    turn = math.radians(10)
    cam.location = (1.2 * math.sin(turn), -1.2 * math.cos(turn), 0.0)
    cam.rotation_euler = (math.pi / 2, 0.0, turn)
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.scene.camera = cam
    assert bpy.ops.portrait_rig.add_rig() == {'FINISHED'}
    return bpy.context.scene.portrait_rig.rig


def test_fit_rig_to_photo_sets_the_rig_to_the_servers_fit(extension, render_server, tmp_path):
    from portrait_rig.client import Client

    rig = stage_rig(extension, render_server)
    scene_reader = extension.module("blender_rig.scene_reader")
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    with Client(render_server.host, render_server.port, timeout=60.0) as client:
        expected = client.fit(photo.read_bytes())["params"]       # the fit is deterministic

    assert bpy.ops.portrait_rig.fit_to_photo(filepath=str(photo)) == {'FINISHED'}
    bpy.context.view_layer.update()
    params = scene_reader.read_params(rig, bpy.context.scene)
    np.testing.assert_allclose(params.shape, expected["shape"], atol=1e-5)
    np.testing.assert_allclose(params.expression, expected["expression"], atol=1e-5)
    # the head turns in the camera's view as in the photo, although the camera is turned
    np.testing.assert_allclose(params.pose.global_, expected["pose"]["global"], atol=1e-4)
    np.testing.assert_allclose(params.pose.jaw, expected["pose"]["jaw"], atol=1e-5)
    np.testing.assert_allclose(params.pose.neck, 0, atol=1e-6)
    # the World radiates the fitted light, seen from the camera
    sh = np.array(expected["lighting"]["sh"])
    np.testing.assert_allclose(params.lighting.sh, sh, atol=0.03 * sh[0].mean())
    assert bpy.context.scene.portrait_rig.lighting == 'WORLD'
    assert rig.portrait_rig.reference_photo == str(photo)

    panel = extension.module("blender_rig.panel")
    bpy.context.view_layer.objects.active = rig
    assert "Fit Rig to Photo" in draw(panel.VIEW3D_PT_portrait_rig)


def test_a_photo_without_a_face_changes_nothing(extension, render_server, tmp_path):
    rig = stage_rig(extension, render_server)
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((96, 128, 3), 200, np.uint8)).save(blank)
    before = [tuple(b.rotation_quaternion) for b in rig.pose.bones]
    with pytest.raises(RuntimeError, match="no_face: no face found"):
        bpy.ops.portrait_rig.fit_to_photo(filepath=str(blank))
    assert [tuple(b.rotation_quaternion) for b in rig.pose.bones] == before
    assert rig.portrait_rig.reference_photo == ""
    with pytest.raises(RuntimeError, match="Fit Rig to Photo: .*missing.jpg"):
        bpy.ops.portrait_rig.fit_to_photo(filepath=str(tmp_path / "missing.jpg"))
