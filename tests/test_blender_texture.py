"""Texture codes on the rig in real Blender: stored, keyframed and sent per frame, set by a
photo fit, and shown as the albedo map in the rig's material."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.blender_env import (bpy, blender, draw, extension,  # noqa: F401
                                       extension_repository, render_server)
from tests.support.blender_rig_scene import add_camera, rig_modules, small_face
from portrait_rig.params import RigParams
from portrait_rig.texture_space import TextureSpace

pytestmark = pytest.mark.blender


@pytest.fixture
def texture_codes(extension):
    return extension.module("blender_rig.texture_codes")


@pytest.fixture
def rig(extension):
    modules = rig_modules(extension)
    arm = modules.rig_builder.build_rig(bpy.context, small_face())
    add_camera()
    return arm


def space_for(mesh, size: int = 8, components: int = 3) -> TextureSpace:
    rng = np.random.default_rng(0)
    n_triangles = len(mesh.polygons)
    return TextureSpace(mean=rng.uniform(0.2, 0.8, (size, size, 3)),
                        directions=rng.normal(0, 0.05, (size, size, 3, components)),
                        face_uv=rng.uniform(0, 1, (n_triangles, 3, 2)), source="test.npz")


def test_codes_are_stored_keyed_and_read_per_frame(extension, texture_codes, rig):
    scene_reader = extension.module("blender_rig.scene_reader")
    scene = bpy.context.scene
    assert scene_reader.read_params(rig, scene).appearance.texture == []
    texture_codes.set_codes(rig, [1.0, -2.0, 0.5])
    rig.keyframe_insert(f'["{texture_codes.PROP_TEXTURE}"]', frame=1)
    texture_codes.set_codes(rig, [3.0, 0.0, 0.5])
    rig.keyframe_insert(f'["{texture_codes.PROP_TEXTURE}"]', frame=11)
    scene.frame_set(1)
    params = scene_reader.read_params(rig, scene)
    assert params.appearance.texture == [1.0, -2.0, 0.5]
    assert RigParams.from_json(params.to_json()).appearance.texture == [1.0, -2.0, 0.5]
    # A render reads each frame from the evaluated rig, without moving the scene.
    depsgraph = bpy.context.evaluated_depsgraph_get()
    scene.frame_set(11)
    ahead = scene_reader.read_params(rig, scene, depsgraph=bpy.context.evaluated_depsgraph_get())
    assert ahead.appearance.texture == pytest.approx([3.0, 0.0, 0.5])
    scene.frame_set(6)
    halfway = scene_reader.read_params(rig, scene, depsgraph=depsgraph).appearance.texture
    assert -2.0 < halfway[1] < 0.0 and 1.0 < halfway[0] < 3.0
    # An explicit code wins; an empty one means "the rig's".
    given = scene_reader.read_params(rig, scene, appearance={"texture": [0.25]})
    assert given.appearance.texture == [0.25]


def test_a_photo_fit_sets_the_code(extension, texture_codes, rig):
    photo_fit = extension.module("blender_rig.photo_fit")
    params = RigParams()
    params.appearance.texture = [0.5] * 50
    photo_fit.apply_fit(rig, bpy.context.scene, {"params": params.to_dict()}, light=False)
    assert texture_codes.read_codes(rig) == [0.5] * 50


def test_the_material_shows_the_albedo_of_the_code(extension, texture_codes, rig):
    mesh = extension.module("blender_rig.rig_builder").rig_parts(rig)[1].data
    space = space_for(mesh)
    texture_codes.set_codes(rig, [1.0, 0.0, -2.0])
    image = texture_codes.show_albedo(rig, space)
    # The mesh samples the image through the space's UVs, in triangle (loop) order.
    uv = np.zeros(len(mesh.loops) * 2)
    mesh.uv_layers[texture_codes.UV_LAYER].data.foreach_get("uv", uv)
    np.testing.assert_allclose(uv.reshape(-1, 3, 2), space.face_uv, atol=1e-6)
    material = mesh.materials[0]
    base = next(n for n in material.node_tree.nodes
                if n.bl_idname == "ShaderNodeBsdfPrincipled").inputs["Base Color"]
    assert base.links[0].from_node.image == image

    def shown():
        pixels = np.zeros(space.size * space.size * 4, np.float32)
        image.pixels.foreach_get(pixels)
        return pixels.reshape(space.size, space.size, 4)[::-1, :, :3]

    np.testing.assert_allclose(shown(), np.clip(space.albedo([1.0, 0.0, -2.0]), 0, 1),
                               atol=0.6 / 255)
    # A keyed change plays through the frame handler.
    rig.keyframe_insert(f'["{texture_codes.PROP_TEXTURE}"]', frame=1)
    texture_codes.set_codes(rig, [-1.0, 2.0, 0.0])
    rig.keyframe_insert(f'["{texture_codes.PROP_TEXTURE}"]', frame=2)
    bpy.context.scene.frame_set(2)
    np.testing.assert_allclose(shown(), np.clip(space.albedo([-1.0, 2.0, 0.0]), 0, 1),
                               atol=0.6 / 255)
    # A space for another mesh is refused.
    other = TextureSpace(space.mean, space.directions, space.face_uv[:-1])
    with pytest.raises(ValueError, match="triangles"):
        texture_codes.show_albedo(rig, other)


def test_a_server_without_texture_space_leaves_the_material(extension, texture_codes, rig,
                                                            render_server):
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = render_server.host, render_server.port
    bpy.context.view_layer.objects.active = rig
    panel = texture_codes.VIEW3D_PT_portrait_rig_texture
    assert "Show Texture" in draw(panel)
    assert bpy.ops.portrait_rig.show_texture() == {'CANCELLED'}
    mesh = extension.module("blender_rig.rig_builder").rig_parts(rig)[1].data
    assert texture_codes.UV_LAYER not in mesh.uv_layers
