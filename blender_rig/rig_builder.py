"""Build a Portrait Rig from a face model whose mesh equals FLAME's skinning exactly.

Rig layout (``scene_reader`` and the rest of the add-on rely on it):

* Armature object ``<name>`` rotated +90 deg about X, so the model frame's +Y up is Blender's
  +Z and the face looks along Blender's -Y (at the Front view). Armature space IS the model
  frame (metres). Control bones ``root``, ``neck``, ``jaw``, ``eye_L``, ``eye_R`` are FLAME
  joints 0-4, rest heads on the template's joints, each pointing along armature +Y with roll
  0, so its rest rotation is the identity and its local pose rotation is the FLAME local
  rotation in the model frame. Rotation mode 'QUATERNION'; locations are locked except the
  root's (which moves the whole head) and scales are locked (the model has a metric size).
  Bone collections "Controls" and "Deform" (hidden).
* Deforming bones ``DEF-neck``, ``DEF-jaw``, ``DEF-eye_L``, ``DEF-eye_R``: children of the
  control bone of the same joint, same rest head; ``root`` deforms itself. A control bone's
  parent is its FLAME parent's deforming bone (``DEF-neck`` for jaw and eyes, ``root`` for
  the neck).
* Mesh object ``<name>_mesh``, parented to the armature with an identity transform, so its
  vertex coordinates are model-frame coordinates. Armature modifier (linear blend skinning),
  vertex groups named after the deforming bones (``DEFORM_NAMES``) holding the skin weights,
  smooth shading, UV layer ``uv`` (when the model has UVs), colour attribute ``albedo``
  (linear, per vertex) feeding the base colour of a Principled BSDF material ``<name>_skin``.
* Shape keys: ``Basis`` (template), identity ``Shape000``.. and expression ``Exp000``..
  (one per unit coefficient, sliders -3..3; the component's display name, when the model has
  one, is in the Key's ``portrait_rig_component_names`` dict), pose correctives
  ``Pose000``..``Pose035`` in FLAME's layout (joint 1-4 x the nine entries of R - I, row
  major, sliders -2..2). Each pose key is driven by a simple-expression driver of its bone's
  local quaternion (Transform Channel variables in local space), so correctives follow
  keyframes, constraints and ``-a`` renders without "Auto Run Python Scripts".
* Joint object ``<name>_joints`` (hidden, unselectable, not rendered), parented to the
  armature: one vertex per joint 1-4 at J_j - B_j, the joint FLAME regresses from the
  current identity AND expression minus the bone's rest head. Its shape keys carry the
  regressor's products with the mesh's identity and expression keys, each driven by (a copy
  of) the mesh key of the same name, so the vertex follows every key exactly, animated or
  not. A vertex group per control bone holds its vertex.
* Armature custom properties: ``portrait_rig_model``, ``portrait_rig_source``,
  ``portrait_rig_version`` (the model's name, source, version), ``portrait_rig_shape_count``,
  ``portrait_rig_expression_count`` (keys created). Mesh data custom properties: the joint
  regressor ``portrait_rig_joint_regressor`` [J*V] and, because joints are linear in the
  coefficients, its products with the template and with every created key's blend shape
  (``portrait_rig_joint_template`` [J*3], ``portrait_rig_joint_shapedirs`` [J*3*S],
  ``portrait_rig_joint_exprdirs`` [J*3*E], row-major [J, 3, K]). Joints for any
  coefficients are then a [J*3, K] product instead of a pass over the vertices.

Joints exactly as FLAME. FLAME rotates joint j about J_j = B_j + d_j, regressed from the mesh
with identity and expression; rest heads cannot move with animated keys. Two Copy Location
constraints (local space, from the joint object's vertex) make up for d_j: the control bone's
location is +d_j (its head sits on J_j, posed by its parent: FLAME's joint transform G_j) and
its deforming bone's is -d_j after the control's rotation (G_j T(-d_j), whose skinning
G_j T(-d_j) T(-B_j) = G_j T(-J_j) is FLAME's). With the parent link through the parent's
deforming bone the chain composes exactly, at any identity, expression and pose, in every
evaluation (viewport, playback, ``-a`` renders). The root's pivot is B_0 instead of J_0, a
pure translation of the whole head that ``scene_reader`` compensates through the head
translation.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import bpy
import numpy as np

from ..portrait_rig.face_data import FaceData
from . import compat

BONE_NAMES = ("root", "neck", "jaw", "eye_L", "eye_R")   # FLAME joints 0-4: the controls
DEFORM_PREFIX = "DEF-"
DEFORM_NAMES = ("root", *(DEFORM_PREFIX + name for name in BONE_NAMES[1:]))   # skin weights
JOINT_CONSTRAINT = "Portrait Rig joint"
SLICE_S = 0.02               # build_rig_steps yields after about this much work
# Bone display length as a fraction of the model's height (display only).
BONE_LENGTH = (0.25, 0.2, 0.12, 0.06, 0.06)

SHAPE_KEY = "Shape{:03d}"
EXPRESSION_KEY = "Exp{:03d}"
POSE_KEY = "Pose{:03d}"
_KEY_PATTERN = re.compile(r"(Shape|Exp)(\d{3,})")
COEFFICIENT_RANGE = (-3.0, 3.0)      # slider range of identity / expression keys (std devs)
POSE_KEY_RANGE = (-2.0, 2.0)         # entries of R - I lie in [-2, 2]

PROP_MODEL = "portrait_rig_model"
PROP_SOURCE = "portrait_rig_source"
PROP_VERSION = "portrait_rig_version"
PROP_SHAPE_COUNT = "portrait_rig_shape_count"
PROP_EXPRESSION_COUNT = "portrait_rig_expression_count"
PROP_REGRESSOR = "portrait_rig_joint_regressor"
PROP_JOINT_TEMPLATE = "portrait_rig_joint_template"
PROP_JOINT_SHAPEDIRS = "portrait_rig_joint_shapedirs"
PROP_JOINT_EXPRDIRS = "portrait_rig_joint_exprdirs"
PROP_COMPONENT_NAMES = "portrait_rig_component_names"

# R - I of a unit quaternion (w, x, y, z), row major: the pose-corrective features. The
# Transform Channel variables give a normalised quaternion, so no division is needed.
ROTATION_MINUS_IDENTITY = (
    "-2*(y*y + z*z)", "2*(x*y - w*z)", "2*(x*z + w*y)",
    "2*(x*y + w*z)", "-2*(x*x + z*z)", "2*(y*z - w*x)",
    "2*(x*z - w*y)", "2*(y*z + w*x)", "-2*(x*x + y*y)",
)


class RigError(ValueError):
    """An object that is not a usable Portrait Rig, or a face model it cannot be built from."""


# ============================================================================= building

def build_rig(context, face: FaceData, *, name: str = "PortraitRig", n_shape: int | None = None,
              n_expression: int | None = None, collection=None):
    """Create the rig described in the module notes and return its armature object.

    ``face``: the face model. ``n_shape`` / ``n_expression``: how many identity / expression
    keys to create (the first components; None: all). ``collection``: where to link the
    objects (default: the context's collection), which must be in the context's view layer
    (bones are created in edit mode). Uses the data API except for the mode switch.
    """
    steps = build_rig_steps(context, face, name=name, n_shape=n_shape,
                            n_expression=n_expression, collection=collection)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def build_rig_steps(context, face: FaceData, *, name: str = "PortraitRig",
                    n_shape: int | None = None, n_expression: int | None = None,
                    collection=None, budget_s: float = SLICE_S):
    """``build_rig`` in slices: a generator that yields ``(fraction done, what)`` about every
    ``budget_s`` seconds of work and returns the armature (``tasks.Task`` drives it between
    Blender's events). Closing it early removes what was built."""
    if face.n_joints != len(BONE_NAMES):
        raise RigError(f"the rig needs FLAME's {len(BONE_NAMES)} joints, the face model has "
                       f"{face.n_joints}")
    n_shape = _count("n_shape", n_shape, face.n_shape)
    n_expression = _count("n_expression", n_expression, face.n_expression)
    if collection is None:
        collection = context.collection or context.scene.collection

    arm_obj = bpy.data.objects.new(name, bpy.data.armatures.new(name))
    mesh_obj = joints_obj = None
    try:
        arm_obj.rotation_euler = (np.pi / 2, 0.0, 0.0)
        arm_obj.show_in_front = True
        arm_obj[PROP_MODEL] = face.name
        arm_obj[PROP_SOURCE] = face.source
        arm_obj[PROP_VERSION] = face.version
        arm_obj[PROP_SHAPE_COUNT] = n_shape
        arm_obj[PROP_EXPRESSION_COUNT] = n_expression
        collection.objects.link(arm_obj)
        _build_bones(context, arm_obj, face)          # first: fails if not editable here
        yield 0.05, "bones"

        mesh_obj = bpy.data.objects.new(f"{name}_mesh", _build_mesh(f"{name}_mesh", face))
        collection.objects.link(mesh_obj)
        mesh_obj.parent = arm_obj
        yield 0.1, "mesh"
        mesh_obj.data.materials.append(_build_material(f"{name}_skin", face))
        joint_dirs = _joint_dirs(face, n_shape, n_expression)
        yield 0.11, "joints"
        _store_joint_data(mesh_obj.data, face, joint_dirs)
        yield 0.12, "skin weights"
        clock = _Slicer(budget_s)
        for fraction in _add_vertex_groups(mesh_obj, face.weights, clock):
            yield 0.12 + 0.13 * fraction, "skin weights"
        modifier = mesh_obj.modifiers.new("Armature", 'ARMATURE')
        modifier.object = arm_obj
        modifier.use_vertex_groups = True
        modifier.use_bone_envelopes = False
        modifier.use_deform_preserve_volume = False   # linear blend skinning, as FLAME
        keys = _key_specs(face, n_shape, n_expression)
        mesh_obj.shape_key_add(name="Basis", from_mix=False)
        for i, key in enumerate(keys):
            _add_shape_key(mesh_obj, face.v_template, key)
            if clock.due():
                yield 0.25 + 0.55 * (i + 1) / len(keys), "shape keys"
        _name_components(mesh_obj, face, n_shape, n_expression)
        _add_pose_drivers(mesh_obj, arm_obj)
        yield 0.8, "pose correctives"
        joints_obj = _build_joint_object(f"{name}_joints", face, collection, arm_obj)
        keys = _joint_key_specs(joint_dirs)
        basis = _joint_basis(face)
        for i, key in enumerate(keys):
            _add_shape_key(joints_obj, basis, key)
            if clock.due():
                yield 0.8 + 0.1 * (i + 1) / len(keys), "joints"
        for count in _drive_joint_keys(joints_obj, mesh_obj, clock):
            yield 0.9 + 0.1 * count / max(len(keys), 1), "joints"
        _add_joint_constraints(arm_obj, joints_obj)
    except BaseException:                             # GeneratorExit too: a cancelled build
        _remove(arm_obj, mesh_obj, joints_obj)
        raise
    return arm_obj


class _Slicer:
    """Says when ``budget_s`` seconds have passed since it last said so."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.start = time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.start < self.budget_s:
            return False
        self.start = now
        return True


def _remove(arm_obj, mesh_obj, joints_obj=None) -> None:
    """Delete a half-built rig and the datablocks made for it."""
    for obj in (mesh_obj, joints_obj):
        if obj is None:
            continue
        mesh = obj.data
        materials = [m for m in mesh.materials if m is not None]
        bpy.data.objects.remove(obj)
        bpy.data.meshes.remove(mesh)
        for material in materials:
            bpy.data.materials.remove(material)
    armature = arm_obj.data
    bpy.data.objects.remove(arm_obj)
    bpy.data.armatures.remove(armature)


def _count(label: str, value: int | None, available: int) -> int:
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RigError(f"{label} must be a non-negative integer or None, got {value!r}")
    return min(value, available)


def _build_mesh(name: str, face: FaceData):
    """Mesh in model-frame coordinates with UVs and the albedo colour attribute."""
    mesh = bpy.data.meshes.new(name)
    n_triangles = face.n_triangles
    mesh.vertices.add(face.n_vertices)
    mesh.vertices.foreach_set("co", face.v_template.ravel())
    mesh.loops.add(3 * n_triangles)
    mesh.loops.foreach_set("vertex_index", face.triangles.ravel())
    mesh.polygons.add(n_triangles)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * n_triangles, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    mesh.polygons.foreach_set("use_smooth", np.ones(n_triangles, dtype=bool))
    if face.uv is not None:
        uv_layer = mesh.uv_layers.new(name="uv")
        uv_layer.data.foreach_set("uv", face.uv[face.triangles.ravel()].ravel())
    albedo = mesh.color_attributes.new("albedo", 'FLOAT_COLOR', 'POINT')
    rgba = np.concatenate([face.vertex_albedo, np.ones((face.n_vertices, 1), np.float32)], 1)
    albedo.data.foreach_set("color", rgba.ravel())
    mesh.color_attributes.active_color = albedo
    mesh.color_attributes.render_color_index = mesh.color_attributes.active_color_index
    if mesh.validate(verbose=False):
        raise RigError("the face model's triangles do not form a valid mesh")
    return mesh


def _build_material(name: str, face: FaceData):
    """Principled BSDF whose base colour is the per-vertex ``albedo`` attribute."""
    material = bpy.data.materials.new(name)
    nodes = compat.node_tree(material).nodes
    bsdf = next((n for n in nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"), None)
    if bsdf is None:
        raise RigError("a new material has no Principled BSDF node")
    attribute = nodes.new("ShaderNodeVertexColor")
    attribute.layer_name = "albedo"
    attribute.location = (bsdf.location.x - 300, bsdf.location.y)
    material.node_tree.links.new(attribute.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.5
    material.diffuse_color = (*face.vertex_albedo.mean(axis=0).tolist(), 1.0)   # viewport
    return material


def _joint_dirs(face: FaceData, n_shape: int, n_expression: int) -> tuple:
    """The regressor's products with the created identity and expression blend shapes:
    ([J, 3, S], [J, 3, E]) float64, joints per unit coefficient. Multiplied in float32 (the
    arrays' own precision; a float64 copy of FLAME's blend shapes costs more than the rest
    of a build slice)."""
    return tuple((face.J_regressor @ dirs[:, :, :count].reshape(len(dirs), -1))
                 .astype(np.float64).reshape(face.n_joints, 3, count)
                 for dirs, count in ((face.shapedirs, n_shape), (face.exprdirs, n_expression)))


def _store_joint_data(mesh, face: FaceData, joint_dirs: tuple) -> None:
    """The joint regressor and its products with the template and the created keys."""
    regressor = face.J_regressor.astype(np.float64)
    mesh[PROP_REGRESSOR] = regressor.ravel().tolist()
    mesh[PROP_JOINT_TEMPLATE] = (regressor @ face.v_template).ravel().tolist()
    mesh[PROP_JOINT_SHAPEDIRS] = joint_dirs[0].ravel().tolist()
    mesh[PROP_JOINT_EXPRDIRS] = joint_dirs[1].ravel().tolist()


def _add_vertex_groups(mesh_obj, weights: np.ndarray, clock: _Slicer):
    """One vertex group per deforming bone (``DEFORM_NAMES``). ``VertexGroup.add`` sets one
    weight for a list of vertices, so vertices are batched by equal weight (FLAME's weights
    are mostly 0 or 1; the rest take a call each). Yields the fraction done whenever
    ``clock`` says a slice is over."""
    for joint, bone in enumerate(DEFORM_NAMES):
        group = mesh_obj.vertex_groups.new(name=bone)
        column = weights[:, joint]
        (indices,) = np.nonzero(column > 0)
        values, inverse = np.unique(column[indices], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        batches = np.split(indices[order], np.cumsum(np.bincount(inverse))[:-1])
        for i, (value, batch) in enumerate(zip(values.tolist(), batches)):
            group.add(batch.tolist(), value, 'REPLACE')
            if clock.due():
                yield (joint + i / len(values)) / len(DEFORM_NAMES)


@contextmanager
def _bone_edit_mode(context, arm_obj):
    """Armature edit mode on ``arm_obj`` for the block, yielding its edit bones; restores the
    object's previous mode, its viewport visibility (edit mode refuses hidden objects) and
    the view layer's active object."""
    if arm_obj.mode == 'EDIT':
        yield arm_obj.data.edit_bones
        return
    view_layer = context.view_layer
    previous_active, previous_mode = view_layer.objects.active, arm_obj.mode
    try:
        view_layer.objects.active = arm_obj
    except RuntimeError:
        raise RigError(f"'{arm_obj.name}' is not in the view layer '{view_layer.name}', so "
                       "its bones cannot be edited") from None
    hidden = arm_obj.hide_viewport, arm_obj.hide_get(view_layer=view_layer)
    try:
        arm_obj.hide_viewport = False
        arm_obj.hide_set(False, view_layer=view_layer)
        with context.temp_override(active_object=arm_obj, object=arm_obj,
                                   selected_objects=[arm_obj],
                                   selected_editable_objects=[arm_obj]):
            bpy.ops.object.mode_set(mode='EDIT')
            try:
                yield arm_obj.data.edit_bones
            finally:
                bpy.ops.object.mode_set(mode=previous_mode)
    finally:
        view_layer.objects.active = previous_active
        arm_obj.hide_viewport = hidden[0]
        arm_obj.hide_set(hidden[1], view_layer=view_layer)


def _build_bones(context, arm_obj, face: FaceData) -> None:
    """The control bones on the template's joints, FLAME's tree between them through the
    deforming bones, and the deforming bones (hidden) on the control bones (module notes)."""
    joints = face.joints()
    height = float(np.ptp(face.v_template[:, 1])) or 1.0
    armature = arm_obj.data
    controls = armature.collections.new("Controls")
    deform = armature.collections.new("Deform")
    deform.is_visible = False
    with _bone_edit_mode(context, arm_obj) as edit_bones:
        for joint, (bone_name, fraction) in enumerate(zip(BONE_NAMES, BONE_LENGTH)):
            bone = edit_bones.new(bone_name)
            _place(bone, joints[joint], fraction * height)
            if face.parents[joint] >= 0:
                bone.parent = edit_bones[DEFORM_NAMES[face.parents[joint]]]
            bone.use_connect = False
            bone.use_deform = joint == 0
            controls.assign(bone)
            if joint:
                child = edit_bones.new(DEFORM_NAMES[joint])
                _place(child, joints[joint], 0.5 * fraction * height)
                child.parent = bone
                child.use_connect = False
                child.use_deform = True
                deform.assign(child)
    for joint, bone_name in enumerate(BONE_NAMES):
        pose_bone = arm_obj.pose.bones[bone_name]
        pose_bone.rotation_mode = 'QUATERNION'
        pose_bone.lock_location = (joint != 0,) * 3
        pose_bone.lock_scale = (True, True, True)
    for bone_name in DEFORM_NAMES[1:]:
        pose_bone = arm_obj.pose.bones[bone_name]
        pose_bone.lock_location = pose_bone.lock_scale = (True, True, True)
        pose_bone.lock_rotation = (True, True, True)
        pose_bone.lock_rotation_w = True


def _place(edit_bone, head, length: float) -> None:
    """Head at ``head``, pointing along +Y with roll 0: rest rotation = identity."""
    x, y, z = (float(v) for v in head)
    edit_bone.head = (x, y, z)
    edit_bone.tail = (x, y + length, z)
    edit_bone.roll = 0.0


@dataclass(frozen=True)
class _KeySpec:
    name: str
    offsets: np.ndarray          # [V, 3] per unit value
    low: float
    high: float


def _key_specs(face: FaceData, n_shape: int, n_expression: int) -> list[_KeySpec]:
    specs = []
    for pattern, dirs, (low, high) in (
            (SHAPE_KEY, face.shapedirs[:, :, :n_shape], COEFFICIENT_RANGE),
            (EXPRESSION_KEY, face.exprdirs[:, :, :n_expression], COEFFICIENT_RANGE),
            (POSE_KEY, face.posedirs, POSE_KEY_RANGE)):
        specs += [_KeySpec(pattern.format(k), dirs[:, :, k], low, high)
                  for k in range(dirs.shape[2])]
    return specs


def _add_shape_key(obj, basis: np.ndarray, spec: _KeySpec):
    block = obj.shape_key_add(name=spec.name, from_mix=False)
    block.data.foreach_set("co", (basis + spec.offsets).ravel())
    block.slider_min, block.slider_max = spec.low, spec.high
    block.value = 0.0            # new keys start at 1 (Blender 5.0)
    return block


def _name_components(mesh_obj, face: FaceData, n_shape: int, n_expression: int) -> None:
    names = {}
    for pattern, kind, count in ((SHAPE_KEY, "shape", n_shape),
                                 (EXPRESSION_KEY, "expression", n_expression)):
        for k in range(min(count, len(getattr(face, f"{kind}_names")))):
            display = face.component_name(kind, k)
            if display != pattern.format(k):
                names[pattern.format(k)] = display
    mesh_obj.data.shape_keys[PROP_COMPONENT_NAMES] = names


def _add_pose_drivers(mesh_obj, arm_obj) -> None:
    """Drive ``Pose{9*(j-1)+e}`` by entry e of R_j - I, R_j = joint j's local rotation."""
    blocks = mesh_obj.data.shape_keys.key_blocks
    for joint in range(1, len(BONE_NAMES)):
        for entry, expression in enumerate(ROTATION_MINUS_IDENTITY):
            block = blocks[POSE_KEY.format(9 * (joint - 1) + entry)]
            driver = block.driver_add("value").driver
            driver.type = 'SCRIPTED'
            for component in "wxyz":
                if component not in expression:
                    continue
                variable = driver.variables.new()
                variable.name = component
                variable.type = 'TRANSFORMS'
                target = variable.targets[0]
                target.id = arm_obj
                target.bone_target = BONE_NAMES[joint]
                target.transform_type = f"ROT_{component.upper()}"
                target.rotation_mode = 'QUATERNION'
                target.transform_space = 'LOCAL_SPACE'
            driver.expression = expression


def _joint_basis(face: FaceData) -> np.ndarray:
    """[4, 3] J_j - B_j of joints 1-4 at zero coefficients (B: the rest heads)."""
    regressor = face.J_regressor.astype(np.float64)
    return (regressor @ face.v_template)[1:] - face.joints()[1:]


def _joint_key_specs(joint_dirs: tuple) -> list[_KeySpec]:
    """The joint object's keys: the regressor's products with the mesh's identity and
    expression keys (``_joint_dirs``, joints 1-4), named like them."""
    return [_KeySpec(pattern.format(k), dirs[1:, :, k], *COEFFICIENT_RANGE)
            for pattern, dirs in zip((SHAPE_KEY, EXPRESSION_KEY), joint_dirs)
            for k in range(dirs.shape[2])]


def _build_joint_object(name: str, face: FaceData, collection, arm_obj):
    """The joint object (module notes) with its Basis; ``_joint_key_specs`` are its keys.
    A vertex group per control bone of joints 1-4 holds that joint's vertex."""
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(BONE_NAMES) - 1)
    mesh.vertices.foreach_set("co", _joint_basis(face).astype(np.float32).ravel())
    obj = bpy.data.objects.new(name, mesh)
    collection.objects.link(obj)
    obj.parent = arm_obj
    obj.hide_select = True
    obj.hide_render = True
    obj.display_type = 'BOUNDS'
    obj.hide_set(True)
    for joint, bone in enumerate(BONE_NAMES[1:]):
        obj.vertex_groups.new(name=bone).add([joint], 1.0, 'REPLACE')
    obj.shape_key_add(name="Basis", from_mix=False)
    return obj


def _drive_joint_keys(joints_obj, mesh_obj, clock: _Slicer):
    """Drive each joint-object key by the mesh's key of the same name (a copy of its value);
    yields the number of keys done whenever ``clock`` says a slice is over, and at the end."""
    source = mesh_obj.data.shape_keys
    blocks = joints_obj.data.shape_keys.key_blocks
    for done, block in enumerate(blocks[1:], start=1):
        driver = block.driver_add("value").driver
        driver.type = 'AVERAGE'
        variable = driver.variables.new()
        variable.type = 'SINGLE_PROP'
        target = variable.targets[0]
        target.id_type = 'KEY'
        target.id = source
        target.data_path = f'key_blocks["{block.name}"].value'
        if clock.due():
            yield done
    yield len(blocks) - 1


def _add_joint_constraints(arm_obj, joints_obj) -> None:
    """Control bone j: location J_j - B_j; its deforming bone: the opposite (module notes)."""
    for bone in BONE_NAMES[1:]:
        for owner, invert in ((bone, False), (DEFORM_PREFIX + bone, True)):
            constraint = arm_obj.pose.bones[owner].constraints.new('COPY_LOCATION')
            constraint.name = JOINT_CONSTRAINT
            constraint.target = joints_obj
            constraint.subtarget = bone
            constraint.owner_space = constraint.target_space = 'LOCAL'
            constraint.invert_x = constraint.invert_y = constraint.invert_z = invert


# ============================================================================= finding

def find_rig(obj):
    """The rig armature of ``obj`` (the armature itself or its mesh), or None."""
    if obj is None:
        return None
    if obj.type == 'ARMATURE' and PROP_MODEL in obj:
        return obj
    if obj.type == 'MESH' and PROP_REGRESSOR in obj.data:
        parent = obj.parent
        if parent is not None and parent.type == 'ARMATURE' and PROP_MODEL in parent:
            return parent
    return None


def rig_mesh(arm_obj):
    """The rig's mesh object (a child mesh carrying the joint data), or None."""
    for child in arm_obj.children:
        if child.type == 'MESH' and PROP_REGRESSOR in child.data:
            return child
    return None


def rig_parts(obj):
    """(armature, mesh) of the rig ``obj`` belongs to; raises RigError when it is none."""
    arm_obj = find_rig(obj)
    mesh_obj = rig_mesh(arm_obj) if arm_obj is not None else None
    if mesh_obj is None:
        name = obj.name if obj is not None else "None"
        raise RigError(f"'{name}' is not part of a Portrait Rig (an armature built by Add "
                       "Portrait Rig and its mesh)")
    return arm_obj, mesh_obj


# ============================================================================= reading

class JointData:
    """The rig's joints as linear functions of its keys (model frame, float64):
    J = template + shapedirs @ shape + exprdirs @ expression, with template [J, 3],
    shapedirs [J, 3, S], exprdirs [J, 3, E] (S, E = keys created)."""

    def __init__(self, mesh):
        n_joints = len(BONE_NAMES)
        self.template = np.array(mesh[PROP_JOINT_TEMPLATE], dtype=np.float64).reshape(n_joints, 3)
        self.shapedirs = np.array(mesh[PROP_JOINT_SHAPEDIRS], dtype=np.float64).reshape(
            n_joints, 3, -1)
        self.exprdirs = np.array(mesh[PROP_JOINT_EXPRDIRS], dtype=np.float64).reshape(
            n_joints, 3, -1)

    def joints(self, shape=(), expression=()) -> np.ndarray:
        """Joints [J, 3]; coefficient lists shorter or longer than the keys are cut/padded."""
        out = self.template.copy()
        for dirs, coeffs in ((self.shapedirs, shape), (self.exprdirs, expression)):
            n = min(len(coeffs), dirs.shape[2])
            if n:
                out += dirs[:, :, :n] @ np.asarray(coeffs[:n], dtype=np.float64)
        return out


_joint_cache: dict[int, JointData] = {}


def joint_data(mesh) -> JointData:
    """``JointData`` of a rig mesh datablock (cached; the data never changes after building)."""
    uid = mesh.original.session_uid
    data = _joint_cache.get(uid)
    if data is None:
        if PROP_JOINT_TEMPLATE not in mesh:
            raise RigError(f"mesh '{mesh.name}' carries no Portrait Rig joint data")
        data = _joint_cache[uid] = JointData(mesh)
    return data


class KeyLayout:
    """Where the identity and expression keys sit in a Key's ``key_blocks``: ``shape[i]`` is
    the index of ``Shape{i:03d}`` (-1 where missing), likewise ``expression``."""

    def __init__(self, key):
        found = {"Shape": {}, "Exp": {}}
        for index, block in enumerate(key.key_blocks):
            match = _KEY_PATTERN.fullmatch(block.name)
            if match:
                found[match.group(1)][int(match.group(2))] = index
        self.count = len(key.key_blocks)
        self.names = (key.key_blocks[0].name, key.key_blocks[-1].name) if self.count else ()
        self.shape = self._indices(found["Shape"])
        self.expression = self._indices(found["Exp"])
        self._values = np.zeros(self.count, dtype=np.float32)

    @staticmethod
    def _indices(positions: dict[int, int]) -> np.ndarray:
        out = np.full(max(positions, default=-1) + 1, -1, dtype=np.int64)
        for component, index in positions.items():
            out[component] = index
        return out

    def matches(self, key) -> bool:
        blocks = key.key_blocks
        return len(blocks) == self.count and (
            not self.count or (blocks[0].name, blocks[-1].name) == self.names)

    def values(self, key) -> tuple[np.ndarray, np.ndarray]:
        """(identity [S], expression [E]) key values, float64; missing keys read 0."""
        key.key_blocks.foreach_get("value", self._values)
        padded = np.append(self._values, 0.0).astype(np.float64)   # index -1 -> 0
        return padded[self.shape], padded[self.expression]


_layout_cache: dict[int, KeyLayout] = {}


def coefficient_values(key) -> tuple[np.ndarray, np.ndarray]:
    """(identity [S], expression [E]) values of a rig's shape keys (``mesh.shape_keys``,
    original or evaluated), in component order."""
    uid = key.original.session_uid
    layout = _layout_cache.get(uid)
    if layout is None or not layout.matches(key):
        layout = _layout_cache[uid] = KeyLayout(key)
    return layout.values(key)
