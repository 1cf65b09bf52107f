"""Fit the rig to a photo: the render server fits its face model to the photo (the ``fit``
message, docs/protocol.md) and the answer is set on the rig.

What ``apply_fit`` sets:

* identity and expression shape keys (``Shape###`` / ``Exp###``; values beyond a key's slider
  range are clamped, coefficients the rig has no key for are dropped);
* the texture code, when the fit has one (``texture_codes``);
* the head's rotation as the photo shows it: relative to the scene camera when there is one
  (what ``scene_reader`` reads back as ``pose.global``: root = R_a^T R_c R_g), else relative
  to the rig's front; the jaw's rotation; neck and eyes at rest;
* optionally the light: a World whose equirectangular environment radiates the fitted SH
  light (``sh_environment``), in the same frame, so that ``world_sh`` projects it back to
  the fitted code (negative lobes, which no environment can emit, are clipped), and the live
  link's lighting source set to that World;
* optionally the photo as the rig's DiffusionRig reference photo.

bpy is used only on the main thread; the fit itself (seconds) runs on a worker thread
(``fit_task``, driven by ``tasks``).
"""

from __future__ import annotations

import math

import bpy
import numpy as np

from ..portrait_rig import client as wire
from ..portrait_rig import sh
from . import compat, preferences, rig_builder, tasks, texture_codes, world_sh
from .transforms import (as_matrix, axis_angle_to_matrix, matrix_to_quaternion,
                         rotation_part)

FIT_TIMEOUT_S = 180.0
LIGHT_NAME = "Portrait Rig Fitted Light"
ENVIRONMENT_SIZE = (32, 64)          # rows, columns: what world_sh samples anyway


def fit_request(prefs=None):
    """A function ``photo bytes -> fit reply`` that asks the server set in the preferences
    (read here, on the main thread) and touches no bpy data, for a worker thread. Raises
    ValueError when the network policy forbids the host; the function raises
    ConnectionError, TimeoutError or ``ServerError`` (e.g. code ``no_face``)."""
    prefs = prefs or preferences.get()
    host, port = prefs.server_address()
    if (error := preferences.network_error(host)) is not None:
        raise ValueError(error)
    token = prefs.token or None

    def request(photo: bytes) -> dict:
        with wire.Client(host, port, token=token, timeout=30.0,
                         client_name="Blender Portrait Rig") as client:
            return client.fit(photo, timeout=FIT_TIMEOUT_S)
    return request


def read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def fit_task(rig_name: str, path: str, *, light: bool = True, use_as_reference: bool = True):
    """The Fit Rig to Photo task (``tasks``): the photo read and fitted on worker threads,
    then set on the rig (looked up again: the user may have changed the scene meanwhile).
    Returns (reply, counts)."""
    request = fit_request()
    photo = yield tasks.Wait(read_file, path, text="reading the photo")
    reply = yield tasks.Wait(request, photo, text="fitting on the server")
    rig = bpy.data.objects.get(rig_name)
    if rig is None or rig_builder.find_rig(rig) is None:
        raise ValueError(f"the rig '{rig_name}' is gone")
    counts = apply_fit(rig, bpy.context.scene, reply, light=light)
    if use_as_reference:
        rig.portrait_rig.reference_photo = path
    return reply, counts


def frame_to_world(rig, scene) -> np.ndarray:
    """[3, 3] rotation from the fit's frame (the camera's: OpenGL axes) to Blender's world:
    the scene camera's rotation, or the rig's when there is no camera (the fit then faces the
    rig's front)."""
    viewer = scene.camera if scene.camera is not None else rig
    return rotation_part(as_matrix(viewer.matrix_world))


def apply_fit(rig, scene, reply: dict, *, light: bool = True) -> dict:
    """Set the rig (and with ``light`` the scene's World) from a ``fit`` reply (module
    notes). Returns counts: keys set, clamped and missing."""
    from ..portrait_rig.params import RigParams

    arm_obj, mesh_obj = rig_builder.rig_parts(rig)
    params = RigParams.from_dict(reply["params"])
    counts = _set_coefficients(mesh_obj, params.shape, params.expression)
    if params.appearance.texture:
        texture_codes.set_codes(arm_obj, params.appearance.texture)

    R_frame = frame_to_world(arm_obj, scene)
    R_arm = rotation_part(as_matrix(arm_obj.matrix_world))
    head = R_arm.T @ R_frame @ axis_angle_to_matrix(params.pose.global_)
    rotations = {"root": head, "jaw": axis_angle_to_matrix(params.pose.jaw)}
    for name in rig_builder.BONE_NAMES:
        bone = arm_obj.pose.bones[name]
        bone.rotation_mode = 'QUATERNION'
        bone.rotation_quaternion = matrix_to_quaternion(rotations.get(name, np.eye(3))).tolist()
    if light:
        set_world_light(scene, np.array(params.lighting.sh), R_frame)
        scene.portrait_rig.lighting = 'WORLD'
    return counts


def _set_coefficients(mesh_obj, shape, expression) -> dict:
    key = mesh_obj.data.shape_keys
    blocks = key.key_blocks if key is not None else {}
    counts = {"set": 0, "clamped": 0, "missing": 0}
    for pattern, values in ((rig_builder.SHAPE_KEY, shape),
                            (rig_builder.EXPRESSION_KEY, expression)):
        names, prefix = {pattern.format(i) for i in range(len(values))}, pattern.split("{")[0]
        for block in blocks:                       # keys past the fit's count go to zero
            if block.name.startswith(prefix) and block.name not in names:
                block.value = 0.0
        for i, value in enumerate(values):
            block = blocks.get(pattern.format(i))
            if block is None:
                counts["missing"] += int(abs(value) > 1e-6)
                continue
            clamped = min(max(value, block.slider_min), block.slider_max)
            counts["clamped"] += int(clamped != value)
            block.value = clamped
            counts["set"] += 1
    return counts


def sh_environment(code: np.ndarray, R_frame_to_world: np.ndarray,
                   size: tuple[int, int] = ENVIRONMENT_SIZE) -> np.ndarray:
    """Linear RGBA pixels [H, W, 4] float32 (Blender's row order: bottom row first) of an
    equirectangular environment whose SH projection, seen in the frame ``R_frame_to_world``
    maps to the world, is the light ``code`` [9, 3] (``portrait_rig.sh``): its radiance is the
    band-limited function with those coefficients, clipped at zero."""
    height, width = size
    directions, _ = sh.equirect_directions(height, width)           # world frame, Z up
    in_frame = directions @ np.asarray(R_frame_to_world, dtype=np.float64)   # R^T d
    # the code is the plain projection in band 0 and the projection / pi in bands 1-2
    projection = np.asarray(code, dtype=np.float64) * np.array([1.0] + [math.pi] * 8)[:, None]
    radiance = (sh.basis(in_frame) * sh.ORTHONORMAL) @ projection              # [N, 3]
    pixels = np.ones((height * width, 4), dtype=np.float32)
    pixels[:, :3] = np.clip(radiance, 0.0, None)
    return pixels.reshape(height, width, 4)


def set_world_light(scene, code: np.ndarray, R_frame_to_world: np.ndarray):
    """Make the scene's World the environment of ``sh_environment`` (created or reused under
    the name ``LIGHT_NAME``, the image packed into the .blend); returns the World."""
    height, width = ENVIRONMENT_SIZE
    image = bpy.data.images.get(LIGHT_NAME)
    if image is None or tuple(image.size) != (width, height) or not image.is_float:
        if image is not None:
            bpy.data.images.remove(image)
        image = bpy.data.images.new(LIGHT_NAME, width, height, alpha=False, float_buffer=True)
    image.pixels.foreach_set(sh_environment(code, R_frame_to_world).ravel())
    image.update()
    world_sh.clear_cache()                         # same image, new pixels
    world = bpy.data.worlds.get(LIGHT_NAME) or bpy.data.worlds.new(LIGHT_NAME)
    tree = compat.node_tree(world)
    nodes, links = tree.nodes, tree.links
    nodes.clear()
    texture = nodes.new("ShaderNodeTexEnvironment")
    texture.image = image
    background = nodes.new("ShaderNodeBackground")
    background.inputs["Strength"].default_value = 1.0
    output = nodes.new("ShaderNodeOutputWorld")
    links.new(texture.outputs["Color"], background.inputs["Color"])
    links.new(background.outputs["Background"], output.inputs["Surface"])
    texture.location, background.location, output.location = (-300, 0), (0, 0), (200, 0)
    scene.world = world
    return world


def describe(reply: dict, counts: dict) -> str:
    """One line for the operator's report."""
    turn = math.degrees(float(np.linalg.norm(reply["params"]["pose"]["global"])))
    text = (f"Fitted by {reply['method']} in {reply['ms'] / 1000:.1f} s: {counts['set']} keys, "
            f"head turned {turn:.0f} deg, landmark error {reply['landmark_error']:.1f} px")
    if counts["clamped"]:
        text += f"; {counts['clamped']} values clamped to their slider range"
    if counts["missing"]:
        text += f"; {counts['missing']} coefficients have no shape key on this rig"
    return text
