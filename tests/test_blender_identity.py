"""'Identity from Photo' in real Blender against a real stylerig server: the astronaut's photo
becomes the rig's identity, its roll and position become the rig's, the edit sliders are
keyframeable, and the frame the scene asks for is the inverted identity in the photo's
framing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from tests.support.blender_env import (bpy, blender, draw, extension,  # noqa: E402,F401
                                       extension_repository, pump)
from tests.support.stylegan_fixtures import write_stylerig_home  # noqa: E402

pytestmark = pytest.mark.blender
SIZE = 16


@pytest.fixture(scope="module")
def stylerig_server(tmp_path_factory):
    from tests.support.server_process import ServerProcess

    home = tmp_path_factory.mktemp("home")
    G, direction = write_stylerig_home(home, direction_seed=1)
    with ServerProcess("--backend", "stylerig", "--model", "demo", "--quiet",
                       env={"PORTRAIT_RIG_HOME": str(home)}) as server:
        yield server, home, G, direction


def stage(extension, server):
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = server.host, server.port
    prefs.face_source = 'SERVER'
    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = 512
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    turn = math.radians(10)
    cam.location = (1.2 * math.sin(turn), -1.2 * math.cos(turn), 0.05)
    cam.rotation_euler = (math.pi / 2, 0.0, turn)
    scene.collection.objects.link(cam)
    scene.camera = cam
    assert bpy.ops.portrait_rig.add_rig() == {'FINISHED'}
    return scene.portrait_rig.rig


def test_identity_from_photo_drives_the_rig_and_the_frame(extension, stylerig_server, tmp_path):
    from portrait_rig.client import Client
    from server.models.stylegan3 import set_transform
    from server.renderer.head_view import head_views

    server, home, G, direction = stylerig_server
    identity = extension.module("blender_rig.identity")
    scene_reader = extension.module("blender_rig.scene_reader")
    rig = stage(extension, server)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)

    assert bpy.ops.portrait_rig.identity_from_photo(filepath=str(photo), method='optimisation',
                                                    steps=4) == {'FINISHED'}
    assert identity.is_running()                        # the operator returned at once
    pump(identity.drain, lambda: not identity.is_running(), timeout=600)
    assert identity.status()["state"] == "done", identity.status()
    assert rig.portrait_rig.identity == "astronaut"
    assert bpy.context.scene.portrait_rig.backend == "stylerig"
    assert tuple(bpy.data.images[identity.PREVIEW_IMAGE].size) == (256, 256)

    record = json.loads((home / "identities" / "astronaut" / "identity.json").read_text())
    bpy.context.view_layer.update()
    params = scene_reader.read_params(rig, bpy.context.scene, appearance=rig.portrait_rig.to_dict())
    view = head_views([params], SIZE, SIZE)[0]
    assert view.roll == pytest.approx(record["roll"], abs=1e-4)
    assert view.shift == pytest.approx(tuple(record["shift"]), abs=1e-4)
    assert abs(record["roll"]) > 0.01 and abs(record["shift"][1]) > 0.1
    assert any(abs(v) > 1e-3 for v in params.shape)      # the fit reached the rig

    assert bpy.ops.portrait_rig.refresh_edits() == {'FINISHED'}
    pump(identity.drain, lambda: not identity.is_running(), timeout=60)
    edits = rig.portrait_rig.edits
    assert [e.name for e in edits] == ["age"]
    edits[0].value = 2.0
    assert edits[0].keyframe_insert("value", frame=1)
    bpy.context.view_layer.objects.active = rig
    panel_text = draw(identity.VIEW3D_PT_portrait_rig_identity)
    assert "Identity from Photo" in panel_text and "age" in panel_text

    params = scene_reader.read_params(rig, bpy.context.scene, appearance=rig.portrait_rig.to_dict())
    assert params.appearance.edits == {"age": 2.0}
    with Client(server.host, server.port, timeout=60.0) as client:
        frame = client.render(params, SIZE, SIZE, format="rgb8")
    pixels = np.frombuffer(frame.pixels, np.uint8).reshape(SIZE, SIZE, 3).astype(int)
    ws = torch.from_numpy(np.load(home / "identities" / "astronaut" / "latent.npz")["w"])
    with torch.no_grad():
        set_transform(G, record["roll"], *record["shift"])
        expected = G.synthesis((ws + 2.0 * direction)[None], noise_mode="const")
        set_transform(G, -record["roll"], *record["shift"])
        mirrored = G.synthesis((ws + 2.0 * direction)[None], noise_mode="const")
    expected, mirrored = ((e[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
                          .numpy().astype(int) for e in (expected, mirrored))
    assert np.abs(pixels - expected).max() <= 3              # Blender's float32 pose
    assert np.abs(pixels - mirrored).max() > 3 * np.abs(pixels - expected).max()
