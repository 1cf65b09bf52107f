"""Scene helpers shared by the rig builder and scene reader tests (need ``bpy``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

from tests.support.blender_env import bpy
from portrait_rig.demo_head import demo_head
from tests.support.synthetic_face import synthetic_face


def rig_modules(extension) -> SimpleNamespace:
    """The extension's rig_builder, scene_reader, world_sh and transforms modules."""
    return SimpleNamespace(**{name: extension.module(f"blender_rig.{name}")
                              for name in ("rig_builder", "scene_reader", "world_sh",
                                           "transforms")})


def small_face(seed: int = 0):
    """The synthetic test head with random pose correctives (its own are zero, so they would
    not exercise the correctives' drivers) and cylindrical UVs."""
    face = synthetic_face(n_lat=12, n_lon=16)
    rng = np.random.default_rng(seed)
    posedirs = rng.standard_normal(face.posedirs.shape) * 2e-3
    x, y, z = face.v_template.T
    uv = np.stack([np.arctan2(x, z) / (2 * np.pi) + 0.5, y / np.ptp(y) + 0.5], axis=1)
    return dataclasses.replace(face, posedirs=posedirs, uv=uv)


def demo_face():
    """The shipped demo head (built once per process)."""
    return demo_head()


def add_camera(name: str = "Camera", location=(0.0, -1.2, 0.0), target=(0.0, 0.0, 0.0)):
    """A camera object at ``location`` aimed at ``target`` (up = world +Z), made the scene's
    camera."""
    cam = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.scene.camera = cam
    aim(cam, location, target)
    bpy.context.view_layer.update()
    return cam


def aim(obj, location, target) -> None:
    """Place ``obj`` at ``location`` looking down its -Z at ``target``, +Y up."""
    from mathutils import Vector
    obj.location = location
    direction = Vector(target) - Vector(location)
    obj.rotation_mode = 'QUATERNION'
    obj.rotation_quaternion = direction.to_track_quat('-Z', 'Y')


def set_keys(mesh_obj, prefix: str, values) -> None:
    blocks = mesh_obj.data.shape_keys.key_blocks
    for index, value in enumerate(values):
        blocks[f"{prefix}{index:03d}"].value = float(value)


def evaluated_world_vertices(obj) -> np.ndarray:
    """World-space vertices [V, 3] (float64) of the evaluated object (shape keys, drivers,
    armature deformation applied)."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    try:
        co = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.vertices.foreach_get("co", co)
    finally:
        evaluated.to_mesh_clear()
    matrix = np.array(evaluated.matrix_world, dtype=np.float64)
    return co.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]


def world_with_background(colour=(1.0, 1.0, 1.0), strength: float = 1.0):
    """A new World (made the scene's) with a Background node of constant colour."""
    world = bpy.data.worlds.new("World")
    if world.node_tree is None:
        world.use_nodes = True
    background = next(n for n in world.node_tree.nodes if n.bl_idname == "ShaderNodeBackground")
    background.inputs["Color"].default_value = (*colour, 1.0)
    background.inputs["Strength"].default_value = strength
    bpy.context.scene.world = world
    return world, background


def environment_image(name: str, rgb: np.ndarray):
    """A float image from linear RGB pixels [H, W, 3] (bottom row first)."""
    height, width = rgb.shape[:2]
    image = bpy.data.images.new(name, width, height, float_buffer=True, alpha=True)
    rgba = np.concatenate([rgb, np.ones((height, width, 1))], axis=2).astype(np.float32)
    image.pixels.foreach_set(rgba.ravel())
    return image


def world_with_environment(image, strength: float = 1.0, rotation=None, scale=None,
                           vector_type: str = 'POINT'):
    """A World whose Background colour is ``image`` as an equirectangular Environment
    Texture, through a Mapping node (from Generated coordinates) when ``rotation`` or
    ``scale`` is given."""
    world, background = world_with_background(strength=strength)
    tree = world.node_tree
    texture = tree.nodes.new("ShaderNodeTexEnvironment")
    texture.image = image
    tree.links.new(texture.outputs["Color"], background.inputs["Color"])
    if rotation is not None or scale is not None:
        mapping = tree.nodes.new("ShaderNodeMapping")
        mapping.vector_type = vector_type
        if rotation is not None:
            mapping.inputs["Rotation"].default_value = rotation
        if scale is not None:
            mapping.inputs["Scale"].default_value = scale
        coords = tree.nodes.new("ShaderNodeTexCoord")
        tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
        tree.links.new(mapping.outputs["Vector"], texture.inputs["Vector"])
    return world
