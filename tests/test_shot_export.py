"""Export Shot on headless Blender: the file holds what the render engine would ask the server
for at every frame, and ``portrait-rig render`` turns it into the engine's frames."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.blender_env import (blender, bpy, draw, extension,  # noqa: F401
                                       extension_repository, render_server)
from portrait_rig.face_source import load_face_data
from portrait_rig.shot_file import ShotFile
from portrait_rig_cli import cli

Image = pytest.importorskip("PIL.Image")
pytestmark = pytest.mark.blender


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_exported_shot_renders_the_engines_frames(extension, render_server, tmp_path):
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = render_server.host, render_server.port
    extension.module("blender_rig.demo_scene").build_demo_scene(
        bpy.context, load_face_data("demo"), frames=5, size=40,
        output=str(tmp_path / "engine" / "frame_"))
    scene = bpy.context.scene
    scene.frame_set(3)
    scene.portrait_rig_render.seed = 11
    scene.view_layers[0].portrait_rig_passes.use_pass_mask = True
    engine = extension.module("blender_rig.render_engine")
    assert "Export Shot" in draw(engine.RENDER_PT_portrait_rig)

    path = tmp_path / "take.json"
    assert bpy.ops.portrait_rig.export_shot(filepath=str(path)) == {'FINISHED'}
    assert scene.frame_current == 3                       # the scene is back at its frame
    shot = ShotFile.load(path)
    assert [f.frame for f in shot.frames] == [1, 2, 3, 4, 5]
    assert (shot.width, shot.height, shot.passes, shot.seed) == (40, 40, ("mask",), 11)
    assert {f.shot for f in shot.frames} == {f"{scene.name}/{scene.camera.name}"}
    sequence = extension.module("blender_rig.sequence")
    layer = scene.view_layers[0]
    for entry in shot.frames:                             # the engine's own reading
        scene.frame_set(entry.frame)
        spec = sequence.read_spec(scene, layer.depsgraph, layer)
        assert entry.params.to_dict() == spec.params.to_dict()

    bpy.ops.render.render(animation=True)                 # the engine's frames
    out = tmp_path / "cli"
    assert cli.main(["render", str(path), "--out", str(out), "--no-video", "--server",
                     f"{render_server.host}:{render_server.port}"]) == 0
    for f in range(1, 6):
        engine_frame = png(tmp_path / "engine" / f"frame_{f:04d}.png")
        assert np.abs(png(out / f"frame_{f:04d}.png") - engine_frame).max() <= 1
        assert (out / "mask" / f"frame_{f:04d}.exr").exists()


def test_scenes_without_a_rig_are_refused(extension, tmp_path):
    with pytest.raises(RuntimeError, match="no Portrait Rig"):
        bpy.ops.portrait_rig.export_shot(filepath=str(tmp_path / "take.json"))
    assert not (tmp_path / "take.json").exists()
