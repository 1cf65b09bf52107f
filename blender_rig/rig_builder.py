"""Build a Portrait Rig from a face model, and keep its bones on the current identity.

Rig layout (``scene_reader`` and the rest of the add-on rely on it):

* Armature object ``<name>`` rotated +90 deg about X, so the model frame's +Y up is Blender's
  +Z and the face looks along Blender's -Y (at the Front view). Armature space IS the model
  frame (metres). Bones ``root``, ``neck``, ``jaw``, ``eye_L``, ``eye_R`` are FLAME joints
  0-4 (parents from the model: root <- neck <- jaw, eye_L, eye_R); each head sits on its
  joint for the current identity, each bone points along armature +Y with roll 0, so its rest
  rotation is the identity and its local pose rotation is the FLAME local rotation in the
  model frame. Rotation mode 'QUATERNION'; locations are locked except the root's (which
  moves the whole head) and scales are locked (the model has a metric size).
* Mesh object ``<name>_mesh``, parented to the armature with an identity transform, so its
  vertex coordinates are model-frame coordinates. Armature modifier (linear blend skinning),
  vertex groups named after the bones holding the skin weights, smooth shading, UV layer
  ``uv`` (when the model has UVs), colour attribute ``albedo`` (linear, per vertex) feeding
  the base colour of a Principled BSDF material ``<name>_skin``.
* Shape keys: ``Basis`` (template), identity ``Shape000``.. and expression ``Exp000``..
  (one per unit coefficient, sliders -3..3; the component's display name, when the model has
  one, is in the Key's ``portrait_rig_component_names`` dict), pose correctives
  ``Pose000``..``Pose035`` in FLAME's layout (joint 1-4 x the nine entries of R - I, row
  major, sliders -2..2). Each pose key is driven by a simple-expression driver of its bone's
  local quaternion (Transform Channel variables in local space), so correctives follow
  keyframes, constraints and ``-a`` renders without "Auto Run Python Scripts".
* Armature custom properties: ``portrait_rig_model``, ``portrait_rig_source``,
  ``portrait_rig_version`` (the model's name, source, version), ``portrait_rig_shape_count``,
  ``portrait_rig_expression_count`` (keys created). Mesh data custom properties: the joint
  regressor ``portrait_rig_joint_regressor`` [J*V] and, because joints are linear in the
  coefficients, its products with the template and with every created key's blend shape
  (``portrait_rig_joint_template`` [J*3], ``portrait_rig_joint_shapedirs`` [J*3*S],
  ``portrait_rig_joint_exprdirs`` [J*3*E], row-major [J, 3, K]). Joints for any
  coefficients are then a [J*3, K] product instead of a pass over the vertices.

Joints and identity: FLAME regresses joints from the shaped mesh. ``update_joints`` moves the
bones (edit mode) to the joints of the current identity keys with zero expression; whoever
changes identity values (an operator, a handler) calls it. Expression is deliberately left
out: rest positions cannot follow animated expressions, and ``scene_reader`` compensates the
root joint's expression-dependent shift exactly through the head translation.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import bpy
import numpy as np

from ..portrait_rig.face_data import FaceData

BONE_NAMES = ("root", "neck", "jaw", "eye_L", "eye_R")   # FLAME joints 0-4
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
    keys to create (the first components; None: all). ``collection``: where to link the two
    objects (default: the context's collection), which must be in the context's view layer
    (bones are created in edit mode). Uses the data API except for the mode switch.
    """
    if face.n_joints != len(BONE_NAMES):
        raise RigError(f"the rig needs FLAME's {len(BONE_NAMES)} joints, the face model has "
                       f"{face.n_joints}")
    n_shape = _count("n_shape", n_shape, face.n_shape)
    n_expression = _count("n_expression", n_expression, face.n_expression)
    if collection is None:
        collection = context.collection or context.scene.collection

    arm_obj, mesh_obj = bpy.data.objects.new(name, bpy.data.armatures.new(name)), None
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

        mesh_obj = bpy.data.objects.new(f"{name}_mesh", _build_mesh(f"{name}_mesh", face))
        collection.objects.link(mesh_obj)
        mesh_obj.parent = arm_obj
        mesh_obj.data.materials.append(_build_material(f"{name}_skin", face))
        _store_joint_data(mesh_obj.data, face, n_shape, n_expression)
        _add_vertex_groups(mesh_obj, face.weights)
        modifier = mesh_obj.modifiers.new("Armature", 'ARMATURE')
        modifier.object = arm_obj
        modifier.use_vertex_groups = True
        modifier.use_bone_envelopes = False
        modifier.use_deform_preserve_volume = False   # linear blend skinning, as FLAME
        _add_shape_keys(mesh_obj, face, n_shape, n_expression)
        _add_pose_drivers(mesh_obj, arm_obj)
    except BaseException:
        _remove(arm_obj, mesh_obj)
        raise
    return arm_obj


def _remove(arm_obj, mesh_obj) -> None:
    """Delete a half-built rig and the datablocks made for it."""
    if mesh_obj is not None:
        mesh = mesh_obj.data
        materials = [m for m in mesh.materials if m is not None]
        bpy.data.objects.remove(mesh_obj)
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
    n_faces = face.n_faces
    mesh.vertices.add(face.n_vertices)
    mesh.vertices.foreach_set("co", face.v_template.ravel())
    mesh.loops.add(3 * n_faces)
    mesh.loops.foreach_set("vertex_index", face.faces.ravel())
    mesh.polygons.add(n_faces)
    mesh.polygons.foreach_set("loop_start", np.arange(0, 3 * n_faces, 3, dtype=np.int32))
    mesh.update(calc_edges=True)
    mesh.polygons.foreach_set("use_smooth", np.ones(n_faces, dtype=bool))
    if face.uv is not None:
        uv_layer = mesh.uv_layers.new(name="uv")
        uv_layer.data.foreach_set("uv", face.uv[face.faces.ravel()].ravel())
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
    if material.node_tree is None:             # Blender < 5.0 creates materials without nodes
        material.use_nodes = True
    nodes = material.node_tree.nodes
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


def _store_joint_data(mesh, face: FaceData, n_shape: int, n_expression: int) -> None:
    """The joint regressor and its products with the template and the created keys."""
    regressor = face.J_regressor.astype(np.float64)
    mesh[PROP_REGRESSOR] = regressor.ravel().tolist()
    mesh[PROP_JOINT_TEMPLATE] = (regressor @ face.v_template).ravel().tolist()
    for prop, dirs, count in ((PROP_JOINT_SHAPEDIRS, face.shapedirs, n_shape),
                              (PROP_JOINT_EXPRDIRS, face.exprdirs, n_expression)):
        joint_dirs = regressor @ dirs[:, :, :count].reshape(len(dirs), -1)   # [J, 3 * K]
        mesh[prop] = joint_dirs.ravel().tolist()


def _add_vertex_groups(mesh_obj, weights: np.ndarray) -> None:
    """One vertex group per bone. ``VertexGroup.add`` sets one weight for a list of vertices,
    so vertices are batched by equal weight (FLAME's weights are mostly 0 or 1)."""
    for joint, bone in enumerate(BONE_NAMES):
        group = mesh_obj.vertex_groups.new(name=bone)
        column = weights[:, joint]
        (indices,) = np.nonzero(column > 0)
        values, inverse = np.unique(column[indices], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        batches = np.split(indices[order], np.cumsum(np.bincount(inverse))[:-1])
        for value, batch in zip(values.tolist(), batches):
            group.add(batch.tolist(), value, 'REPLACE')


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
    joints = face.joints()
    height = float(np.ptp(face.v_template[:, 1])) or 1.0
    with _bone_edit_mode(context, arm_obj) as edit_bones:
        for joint, (bone_name, fraction) in enumerate(zip(BONE_NAMES, BONE_LENGTH)):
            bone = edit_bones.new(bone_name)
            _place(bone, joints[joint], fraction * height)
            if face.parents[joint] >= 0:
                bone.parent = edit_bones[BONE_NAMES[face.parents[joint]]]
            bone.use_connect = False
            bone.use_deform = True
    for joint, bone_name in enumerate(BONE_NAMES):
        pose_bone = arm_obj.pose.bones[bone_name]
        pose_bone.rotation_mode = 'QUATERNION'
        pose_bone.lock_location = (joint != 0,) * 3
        pose_bone.lock_scale = (True, True, True)


def _place(edit_bone, head, length: float) -> None:
    """Head at ``head``, pointing along +Y with roll 0: rest rotation = identity."""
    x, y, z = (float(v) for v in head)
    edit_bone.head = (x, y, z)
    edit_bone.tail = (x, y + length, z)
    edit_bone.roll = 0.0


def _add_shape_keys(mesh_obj, face: FaceData, n_shape: int, n_expression: int) -> None:
    template = face.v_template
    mesh_obj.shape_key_add(name="Basis", from_mix=False)
    names = {}
    groups = ((SHAPE_KEY, face.shapedirs[:, :, :n_shape], COEFFICIENT_RANGE, "shape"),
              (EXPRESSION_KEY, face.exprdirs[:, :, :n_expression], COEFFICIENT_RANGE,
               "expression"),
              (POSE_KEY, face.posedirs, POSE_KEY_RANGE, None))
    for pattern, dirs, (low, high), kind in groups:
        for k in range(dirs.shape[2]):
            key_name = pattern.format(k)
            block = mesh_obj.shape_key_add(name=key_name, from_mix=False)
            block.data.foreach_set("co", (template + dirs[:, :, k]).ravel())
            block.slider_min, block.slider_max = low, high
            block.value = 0.0            # new keys start at 1 (Blender 5.0)
            if kind and k < len(getattr(face, f"{kind}_names")):
                display = face.component_name(kind, k)
                if display != key_name:
                    names[key_name] = display
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


def update_joints(arm_obj) -> bool:
    """Move the bones to the joints of the current identity (zero expression). Returns
    whether anything moved: calling it again at once does nothing, so it is safe from
    depsgraph handlers. Needs the armature in the active view layer."""
    arm_obj, mesh_obj = rig_parts(arm_obj)
    key = mesh_obj.data.shape_keys
    shape = coefficient_values(key)[0] if key is not None else ()
    joints = joint_data(mesh_obj.data).joints(shape)
    bones = arm_obj.data.bones
    if arm_obj.mode != 'EDIT':
        current = np.array([bones[name].head_local for name in BONE_NAMES])
        if np.abs(current - joints).max() < 1e-7:
            return False
    with _bone_edit_mode(bpy.context, arm_obj) as edit_bones:
        for joint, name in enumerate(BONE_NAMES):
            _place(edit_bones[name], joints[joint], edit_bones[name].length)
    return True
