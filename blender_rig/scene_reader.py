"""Scene -> ``RigParams``: what the render server needs to draw a rig as the scene shows it.

The server's world frame is the camera frame (OpenGL axes: the camera looks down -Z, +Y up),
so ``params.camera`` always sits at the origin with zero rotation and the head is placed
relative to it. With the armature's world rotation R_a and translation t_a (object scale is
ignored: the model has a metric size), the root bone's posed rotation R_root and head p_root
(armature space), the camera's world rotation R_c and translation t_c:

    pose.global  = axis-angle(R_c^T R_a R_root)
    translation  = R_c^T (R_a p_root + t_a - t_c) - J0 + R_g (J0 - B0),   R_g = R_c^T R_a R_root

where B0 is the root bone's rest head and J0 the server's root joint, regressed from the
mesh with the current identity AND expression (FLAME's definition); the last term keeps the
head in place where they differ (the rig's other joints follow FLAME's exactly, see
``rig_builder``). Neck, jaw and eyes send their local
rotations: the bone's posed rotation relative to its parent's, which includes constraints
(a Damped Track on an eye is sent as the rotation it produces). Everything is read from the
evaluated pose (``PoseBone.matrix``), which Blender keeps current on the original objects
after each depsgraph evaluation; pass ``depsgraph`` to read evaluated copies instead (e.g.
from a render's ``frame_change_post`` handler).

Camera: perspective -> ``fov_y`` from lens, sensor and sensor fit at the render aspect
(resolution x pixel aspect); lens shift is not sent. Orthographic -> DECA's orthographic
camera with scale = 2 / (vertical ortho extent) and tx = ty = 0. near / far = clip range.

Appearance: passed through; its texture code, unless given, is the rig's
(``texture_codes``, at the evaluated frame).

Lighting: the World (``world_sh.world_to_sh``; no World is no light) and, with
``include_lights``, the scene's lamps that render (not ``hide_render``) as seen from the head
(the mean of the posed joints; ``world_sh.lights_to_sh``), both in the camera frame.
"""

from __future__ import annotations

import math

import numpy as np

from ..portrait_rig.params import Appearance, Camera, Lighting, Pose, RigParams
from . import rig_builder, texture_codes, world_sh
from .transforms import as_matrix, matrix_to_axis_angle, rotation_part

POSE_FIELDS = ("global_", "neck", "jaw", "eye_left", "eye_right")   # per bone of BONE_NAMES


class SceneReadError(ValueError):
    """The scene cannot be turned into rig parameters (no camera, unsupported camera)."""


def read_params(armature_obj, scene, *, include_lights: bool = False, appearance=None,
                camera=None, depsgraph=None) -> RigParams:
    """Rig parameters of the rig ``armature_obj`` (its armature or mesh) as ``scene`` shows
    it through ``camera`` (default: the scene's camera). ``appearance``: an ``Appearance``
    or its dict form, passed through. See the module notes for the conventions."""
    arm_obj, mesh_obj = rig_builder.rig_parts(armature_obj)
    cam_obj = camera if camera is not None else scene.camera
    if cam_obj is None or cam_obj.type != 'CAMERA':
        raise SceneReadError(f"scene '{scene.name}' has no active camera to view the rig from")
    key = mesh_obj.data.shape_keys
    if depsgraph is not None:
        arm_obj, cam_obj = arm_obj.evaluated_get(depsgraph), cam_obj.evaluated_get(depsgraph)
        key = key.evaluated_get(depsgraph) if key is not None else None
    shape, expression = (rig_builder.coefficient_values(key) if key is not None
                         else (np.zeros(0), np.zeros(0)))

    cam_matrix = as_matrix(cam_obj.matrix_world)
    cam_rotation, cam_location = rotation_part(cam_matrix), cam_matrix[:3, 3]
    arm_matrix = as_matrix(arm_obj.matrix_world)
    arm_rotation, arm_location = rotation_part(arm_matrix), arm_matrix[:3, 3]

    bones = [arm_obj.pose.bones[name] for name in rig_builder.BONE_NAMES]
    posed = {bone.name: as_matrix(bone.matrix) for bone in bones}      # armature space
    rotations = {name: rotation_part(matrix) for name, matrix in posed.items()}
    root = bones[0].name
    head_rotation = cam_rotation.T @ arm_rotation @ rotations[root]
    # A control bone's parent is its FLAME parent's deforming bone (same rotation).
    parents = [b.parent.name.removeprefix(rig_builder.DEFORM_PREFIX) for b in bones[1:]]
    local = [rotations[p].T @ rotations[b.name] for p, b in zip(parents, bones[1:])]
    pose = Pose(**{field: matrix_to_axis_angle(rotation).tolist()
                   for field, rotation in zip(POSE_FIELDS, [head_rotation, *local])})

    root_rest = np.array(arm_obj.data.bones[root].head_local)
    root_joint = rig_builder.joint_data(mesh_obj.data).joints(shape, expression)[0]
    root_in_camera = cam_rotation.T @ (arm_rotation @ posed[root][:3, 3] + arm_location
                                       - cam_location)
    translation = root_in_camera - root_joint + head_rotation @ (root_joint - root_rest)

    to_camera = cam_rotation.T                     # world directions -> camera frame
    light = world_sh.world_to_sh(scene.world, to_camera)
    if include_lights:
        head = arm_rotation @ np.mean([m[:3, 3] for m in posed.values()], axis=0) + arm_location
        lamps = scene.objects if depsgraph is None else (
            obj.evaluated_get(depsgraph) for obj in scene.objects if obj.type == 'LIGHT')
        light = light + world_sh.lights_to_sh(
            (obj for obj in lamps if obj.type == 'LIGHT' and not obj.hide_render),
            head, to_camera)

    if appearance is None:
        appearance = Appearance()
    elif isinstance(appearance, dict):
        appearance = Appearance.from_dict(appearance)
    if not appearance.texture:
        appearance.texture = texture_codes.read_codes(arm_obj)     # evaluated: animated
    return RigParams(shape=shape.tolist(), expression=expression.tolist(), pose=pose,
                     translation=translation.tolist(), camera=camera_params(cam_obj, scene),
                     lighting=Lighting(light.tolist()), appearance=appearance)


def camera_params(cam_obj, scene) -> Camera:
    """The server camera for a Blender camera object: at the origin of its own frame."""
    data = cam_obj.data
    render = scene.render
    width = render.resolution_x * render.pixel_aspect_x
    height = render.resolution_y * render.pixel_aspect_y
    fit = data.sensor_fit
    if fit == 'AUTO':
        fit, sensor = ('HORIZONTAL' if width >= height else 'VERTICAL'), data.sensor_width
    else:
        sensor = data.sensor_width if fit == 'HORIZONTAL' else data.sensor_height
    # The sensor (or ortho scale) spans the fitted axis; the other follows the render aspect.
    vertical_share = height / width if fit == 'HORIZONTAL' else 1.0
    near, far = data.clip_start, data.clip_end
    if data.type == 'PERSP':
        fov_y = 2.0 * math.degrees(math.atan(sensor / (2.0 * data.lens) * vertical_share))
        return Camera(type="perspective", fov_y=fov_y, location=[0.0, 0.0, 0.0],
                      rotation=[0.0, 0.0, 0.0], near=near, far=far)
    if data.type == 'ORTHO':
        return Camera(type="orthographic", scale=2.0 / (data.ortho_scale * vertical_share),
                      tx=0.0, ty=0.0, location=[0.0, 0.0, 0.0], rotation=[0.0, 0.0, 0.0],
                      near=near, far=far)
    raise SceneReadError(f"camera '{cam_obj.name}' is panoramic; the render server draws "
                         "perspective or orthographic views only")
