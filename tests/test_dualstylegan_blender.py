"""Exemplar styles in Blender against a real server on the dualstylegan backend (narrow
random networks in the official layouts): the style settings, the thumbnail gallery, the live
link and an animation render whose pose follows the rig."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.support.blender_env import (blender, bpy, draw, extension,  # noqa: F401
                                       extension_repository, pump)
from tests.support.dualstylegan_fixtures import CARTOON, TINY, write_style_home
from portrait_rig.client import Client
from portrait_rig.face_source import load_face_data
from portrait_rig.params import RigParams
from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.blender

SIZE = 32


@pytest.fixture(scope="module")
def face():
    return load_face_data("demo")


@pytest.fixture(scope="module")
def style_server(tmp_path_factory, face):
    """A server (demo head) whose default backend is dualstylegan, with RigNet."""
    files = write_style_home(tmp_path_factory.mktemp("home"), face.n_expression)
    with ServerProcess("--model", "demo", "--backend", "dualstylegan", "--quiet",
                       "--option", f"dualstylegan.folder={files['root']}",
                       "--option", f"dualstylegan.rignet={files['rignet']}") as server:
        yield server


def connect(extension, server):
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = server.host, server.port


def demo_rig(extension, face, server, out, frames=4):
    connect(extension, server)
    rig = extension.module("blender_rig.demo_scene").build_demo_scene(
        bpy.context, face, frames=frames, size=SIZE, output=str(out / "frame_"))
    bpy.context.scene.portrait_rig.backend = "dualstylegan"
    bpy.context.view_layer.objects.active = rig
    return rig


def read(extension, rig) -> RigParams:
    scene_reader = extension.module("blender_rig.scene_reader")
    return scene_reader.read_params(rig, bpy.context.scene, appearance=rig.portrait_rig.to_dict())


def server_pixels(server, params, size=SIZE) -> np.ndarray:
    with Client(server.host, server.port, timeout=60) as client:
        frame = client.render(params, size, size, backend="dualstylegan", format="rgb8")
    return np.frombuffer(frame.pixels, np.uint8).reshape(size, size, 3).astype(int)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_style_settings_are_keyframed_into_the_appearance(extension, face, style_server,
                                                          tmp_path):
    rig = demo_rig(extension, face, style_server, tmp_path, frames=10)
    style = rig.portrait_rig_style
    style.family, style.exemplar = "cartoon", 2
    style.structure = 0.0
    style.keyframe_insert("structure", frame=1)
    style.structure = 1.0
    style.keyframe_insert("structure", frame=9)
    style.keyframe_insert("exemplar", frame=1)
    style.exemplar = 3
    style.keyframe_insert("exemplar", frame=9)
    bpy.context.scene.frame_set(5)
    appearance = read(extension, rig).appearance
    assert appearance.style_family == "cartoon" and appearance.style_structure == pytest.approx(0.5)
    assert appearance.style_exemplar in (2, 3) and appearance.style_colour == 1.0
    assert appearance.style_seed is None and appearance.style_weights is None
    assert bpy.ops.portrait_rig.random_style() == {'FINISHED'}
    style.use_weights = True
    appearance = read(extension, rig).appearance
    assert appearance.style_seed == style.seed
    assert appearance.style_weights == pytest.approx([0.75] * 7 + [1.0] * 11)


def test_panel_says_what_to_download_until_the_gallery_loads(extension, face, tmp_path):
    style_panel = extension.module("blender_rig.style_panel")
    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet",
                       env={"PORTRAIT_RIG_HOME": str(tmp_path / "empty")}) as server:
        connect(extension, server)
        rig = extension.module("blender_rig.demo_scene").build_demo_scene(
            bpy.context, face, frames=2, size=SIZE, output=str(tmp_path / "frame_"))
        bpy.context.view_layer.objects.active = rig
        shown = " ".join(draw(style_panel.VIEW3D_PT_portrait_rig_style))
        assert "Render with DualStyleGAN" in shown and "williamyang1991/DualStyleGAN" in shown
        assert bpy.ops.portrait_rig.style_gallery() == {'FINISHED'}
        pump(style_panel.drain_gallery, lambda: style_panel.gallery().loader is None, timeout=60)
    error = style_panel.gallery().error
    assert "DualStyleGAN style generator (cartoon) not found" in error
    assert "williamyang1991/DualStyleGAN" in error                 # where to get it
    shown = " ".join(draw(style_panel.VIEW3D_PT_portrait_rig_style))
    assert "DualStyleGAN style generator (cartoon) not found" in shown


def test_gallery_shows_each_exemplars_reconstruction(extension, face, style_server, tmp_path):
    style_panel = extension.module("blender_rig.style_panel")
    rig = demo_rig(extension, face, style_server, tmp_path)
    assert bpy.ops.portrait_rig.style_gallery() == {'FINISHED'}
    gallery = style_panel.gallery()
    pump(style_panel.drain_gallery, lambda: gallery.loader is None, timeout=120)
    assert gallery.error == "" and gallery.default_family == "cartoon"
    assert gallery.families == ["anime", "cartoon"] and gallery.counts["cartoon"] == 4
    thumbnails = gallery.thumbnails["cartoon"]
    assert [thumbnails[i][0] for i in range(4)] == CARTOON
    # Each preview holds the server's reconstruction of that exemplar.
    params = RigParams()
    params.appearance.style_exemplar, params.appearance.style_reconstruct = 2, True
    want = server_pixels(style_server, params, style_panel.THUMBNAIL_SIZE)
    preview = thumbnails[2][1]
    assert tuple(preview.image_size) == (style_panel.THUMBNAIL_SIZE,) * 2
    got = np.array(preview.image_pixels_float[:]).reshape(*want.shape[:2], 4)[::-1, :, :3]
    assert np.abs(np.round(got * 255) - want).max() <= 1
    # Picking a thumbnail sets the (keyframeable) exemplar number.
    style = rig.portrait_rig_style
    style.exemplar_menu = "3"
    assert style.exemplar == 3
    shown = " ".join(draw(style_panel.VIEW3D_PT_portrait_rig_style))
    assert CARTOON[3] in shown and "williamyang1991" not in shown
    style.family_menu = "anime"
    assert style.family == "anime"


def test_live_link_streams_styled_frames_that_follow_the_pose(extension, face, style_server,
                                                              tmp_path):
    live_link = extension.module("blender_rig.live_link")
    rig = demo_rig(extension, face, style_server, tmp_path)
    settings = bpy.context.scene.portrait_rig
    settings.width = settings.height = SIZE
    rig.portrait_rig_style.exemplar = 1
    settings.live = True
    try:
        pump(live_link.drain_frames, lambda: live_link.status()["frames"] >= 1, timeout=60)
        first = live_link.status()["frames"]
        image = bpy.data.images["Portrait Rig"]
        before = np.array(image.pixels[:])
        rig.animation_data_clear()               # the demo performance keys the neck
        neck = rig.pose.bones["neck"]
        neck.rotation_mode = 'XYZ'
        neck.rotation_euler = (0.0, 0.5, 0.0)         # a turn (roll is not renderable)
        bpy.context.view_layer.update()
        pump(live_link.drain_frames,
             lambda: np.abs(np.array(image.pixels[:]) - before).max() > 0.02, timeout=60)
        assert live_link.status()["frames"] > first
        assert live_link.status()["error"] == ""
    finally:
        settings.live = False


def test_animation_render_follows_the_rig(extension, face, style_server, tmp_path):
    rig = demo_rig(extension, face, style_server, tmp_path, frames=4)
    rig.portrait_rig_style.exemplar = 2
    rig.portrait_rig_style.structure = 1.0
    bpy.ops.render.render(animation=True)
    frames = [png(tmp_path / f"frame_{f:04d}.png") for f in range(1, 5)]
    assert all(np.abs(a - b).max() > 5 for a, b in zip(frames, frames[1:]))
    scene = bpy.context.scene
    scene.frame_set(3)
    params = read(extension, rig)
    assert params.appearance.style_exemplar == 2 and params.appearance.style_structure == 1.0
    assert np.abs(frames[2] - server_pixels(style_server, params)).max() <= 1
    # The rig's pose drives the portrait: the same frame with the head turned differs.
    turned = params.copy()
    turned.pose.global_ = [0.0, 0.6, 0.0]
    assert np.abs(server_pixels(style_server, turned) - frames[2]).max() > 5
    assert TINY.generator.img_resolution == SIZE
