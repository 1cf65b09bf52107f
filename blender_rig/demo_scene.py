"""The demo performance: a rig in a new scene, keyframed and lit, ready to render through the
Portrait Rig engine (what ``portrait-rig demo`` renders).

The take lasts ``frames`` frames at 24 fps; every action is placed at a fraction of it, so a
short render still shows all of them:

* head turn: the neck yaws right, then left, with a small nod, and comes back;
* smile (expression component "smile") in the first half, a jaw opening ("ah") after it;
* two blinks ("blink left" + "blink right");
* a light sweeping once around the head: the World is an Environment Texture generated in
  memory (a dim sky and one bright warm spot), turned about the vertical axis by a keyframed
  Mapping rotation. The server sees it as spherical-harmonics light (``world_sh``).

Expression components are found by their display names (the demo head's); a face model
without them (FLAME's components are anonymous) keeps its expression neutral.
"""

from __future__ import annotations

import math

import bpy
import numpy as np

from ..portrait_rig import sh
from . import compat, presets, rig_builder
from .transforms import axis_angle_to_quaternion

FPS = 24
CAMERA_DISTANCE = 1.2          # metres from the face
CAMERA_LENS = 150.0            # mm on a 36 mm sensor: ~14 degrees, head and neck in frame
LIGHT_IMAGE = "Portrait Rig light sweep"
LIGHT_SIZE = (64, 32)          # equirectangular texels (width, height)
SKY = np.array([0.2, 0.22, 0.27])           # linear radiance of the dim surroundings
KEY = np.array([1.0, 0.88, 0.74]) * 6.0     # peak radiance of the warm key light
KEY_SPREAD = 0.1                            # key = exp((cos angle - 1) / KEY_SPREAD)
KEY_DIRECTION = (-0.8, -0.45, 0.45)         # world direction it comes from at frame 1


def build_demo_scene(context, face, *, frames: int = 48, size: int = 512,
                     output: str = "//frames/frame_", name: str = "Portrait"):
    """Turn ``context.scene`` into the demo: render settings, a rig built from ``face`` (a
    ``FaceData``), a camera, the light sweep and the keyframed performance. Returns the
    rig's armature object."""
    if frames < 2:
        raise ValueError(f"the demo needs at least 2 frames, got {frames}")
    scene = context.scene
    configure_render(scene, frames, size, output)
    rig = rig_builder.build_rig(context, face, name=name)
    scene.portrait_rig.rig = rig
    scene.portrait_rig.lighting = 'WORLD'
    add_camera(scene)
    add_light_sweep(scene, frames)
    keyframe_performance(rig, frames)
    scene.frame_set(scene.frame_start)
    return rig


def configure_render(scene, frames: int, size: int, output: str) -> None:
    """Portrait Rig engine, square frames, PNG sequence, colours exactly as the server's."""
    scene.render.engine = 'PORTRAIT_RIG'
    scene.render.resolution_x = scene.render.resolution_y = size
    scene.render.resolution_percentage = 100
    scene.render.fps = FPS
    scene.frame_start, scene.frame_end, scene.frame_step = 1, frames, 1
    scene.render.filepath = output
    settings = scene.render.image_settings
    settings.file_format = 'PNG'
    settings.color_mode = 'RGB'
    settings.color_depth = '8'
    scene.render.dither_intensity = 0.0        # 8-bit files hold the server's exact values
    scene.render.use_persistent_data = True    # keep the render depsgraph between frames
    scene.view_settings.view_transform = 'Standard'
    scene.view_settings.look = 'None'


def add_camera(scene):
    """A camera in front of the face (the rig looks along -Y), aimed at its centre."""
    data = bpy.data.cameras.new("Camera")
    data.lens = CAMERA_LENS
    camera = bpy.data.objects.new("Camera", data)
    scene.collection.objects.link(camera)
    camera.location = (0.0, -CAMERA_DISTANCE, 0.0)
    camera.rotation_euler = (math.pi / 2, 0.0, 0.0)        # looks along +Y, Z up
    scene.camera = camera
    return camera


def light_sweep_pixels(width: int, height: int) -> np.ndarray:
    """The environment: linear RGBA float32 [height, width, 4], rows bottom to top, in
    Cycles' equirectangular mapping (``sh.equirect_directions``)."""
    directions, _ = sh.equirect_directions(height, width)
    key = np.asarray(KEY_DIRECTION, dtype=np.float64)
    key /= np.linalg.norm(key)
    falloff = np.exp((directions @ key - 1.0) / KEY_SPREAD)
    rgb = SKY + falloff[:, None] * KEY
    rgba = np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)
    return rgba.reshape(height, width, 4).astype(np.float32)


def add_light_sweep(scene, frames: int):
    """A World lit by the generated environment, turned once about +Z over the take."""
    width, height = LIGHT_SIZE
    image = bpy.data.images.new(LIGHT_IMAGE, width, height, alpha=True, float_buffer=True)
    image.pixels.foreach_set(light_sweep_pixels(width, height).ravel())
    image.pack()                         # saved inside the .blend (as OpenEXR)
    world = bpy.data.worlds.new("Light Sweep")
    tree = compat.node_tree(world)
    background = next(n for n in tree.nodes if n.bl_idname == "ShaderNodeBackground")
    texture = tree.nodes.new("ShaderNodeTexEnvironment")
    texture.image = image
    mapping = tree.nodes.new("ShaderNodeMapping")
    coordinates = tree.nodes.new("ShaderNodeTexCoord")
    tree.links.new(coordinates.outputs["Generated"], mapping.inputs["Vector"])
    tree.links.new(mapping.outputs["Vector"], texture.inputs["Vector"])
    tree.links.new(texture.outputs["Color"], background.inputs["Color"])
    rotation = mapping.inputs["Rotation"]
    # One turn over the take; the last frame stops a step short of the first one's angle.
    for frame, angle in ((1, 0.0), (frames + 1, 2 * math.pi)):
        rotation.default_value = (0.0, 0.0, angle)
        rotation.keyframe_insert("default_value", frame=frame)
    for curve in compat.fcurves(tree):
        for point in curve.keyframe_points:
            point.interpolation = 'LINEAR'          # a steady sweep, no easing
    scene.world = world
    return world


def _frame(frames: int, fraction: float) -> int:
    return 1 + round(fraction * (frames - 1))


def _key_rotation(pose_bone, frames: int, keys) -> None:
    """Keyframe a bone's quaternion from (fraction, axis-angle vector) pairs."""
    for fraction, rotvec in keys:
        pose_bone.rotation_quaternion = axis_angle_to_quaternion(rotvec).tolist()
        pose_bone.keyframe_insert("rotation_quaternion", frame=_frame(frames, fraction))


def _key_value(block, frames: int, keys) -> None:
    """Keyframe a shape key from (fraction, value) pairs; where a short take puts two keys
    on one frame, the larger value wins (a blink stays visible)."""
    values: dict[int, float] = {}
    for fraction, value in keys:
        frame = _frame(frames, min(max(fraction, 0.0), 1.0))
        values[frame] = max(values.get(frame, value), value)
    for frame, value in sorted(values.items()):
        block.value = value
        block.keyframe_insert("value", frame=frame)


def keyframe_performance(rig, frames: int) -> None:
    """Head turn, smile, jaw opening and two blinks (see the module notes)."""
    bones = rig.pose.bones
    yaw = math.radians(24.0)
    _key_rotation(bones["neck"], frames, [
        (0.0, (0.0, 0.0, 0.0)), (0.22, (0.06, yaw, 0.0)), (0.5, (-0.03, -yaw, 0.0)),
        (0.78, (0.05, 0.4 * yaw, 0.0)), (1.0, (0.0, 0.0, 0.0))])
    _key_rotation(bones["jaw"], frames, [
        (0.0, (0.0, 0.0, 0.0)), (0.55, (0.0, 0.0, 0.0)), (0.68, (0.3, 0.0, 0.0)),
        (0.82, (0.0, 0.0, 0.0))])
    _, by_name = presets.expression_keys(rig)
    if (smile := by_name.get("smile")) is not None:
        _key_value(smile, frames, [(0.0, 0.0), (0.15, 0.0), (0.3, 1.2), (0.5, 1.0),
                                   (0.62, 0.0), (1.0, 0.0)])
    blink_step = 1.5 / max(frames - 1, 1)              # ~1.5 frames either side of closed
    for name in ("blink left", "blink right"):
        if (block := by_name.get(name)) is None:
            continue
        keys = [(0.0, 0.0)]
        for closed in (0.4, 0.9):
            keys += [(closed - blink_step, 0.0), (closed, 1.0), (closed + blink_step, 0.0)]
        _key_value(block, frames, keys)
