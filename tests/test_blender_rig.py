"""The rig builder in real Blender: what build_rig creates, joints following the identity,
pose correctives driven by the bones, finding rigs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.support.blender_env import bpy, blender, extension, extension_repository  # noqa: F401
from tests.support.blender_rig_scene import (evaluated_world_vertices, rig_modules, set_keys,
                                             small_face)

pytestmark = pytest.mark.blender


@pytest.fixture
def rig(extension):
    return rig_modules(extension)


def test_build_rig_creates_the_documented_layout(rig):
    face = small_face()
    arm = rig.rig_builder.build_rig(bpy.context, face, name="Head", n_shape=3)
    mesh_obj = rig.rig_builder.rig_mesh(arm)

    assert arm.type == 'ARMATURE' and arm.name == "Head"
    assert mesh_obj.name == "Head_mesh" and mesh_obj.parent == arm
    assert tuple(arm.rotation_euler) == pytest.approx((np.pi / 2, 0, 0))
    bones = arm.data.bones
    assert [b.name for b in bones] == ["root", "neck", "DEF-neck", "jaw", "DEF-jaw", "eye_L",
                                       "DEF-eye_L", "eye_R", "DEF-eye_R"]
    assert {b.name: b.parent.name if b.parent else None for b in bones} == {
        "root": None, "neck": "root", "DEF-neck": "neck", "jaw": "DEF-neck", "DEF-jaw": "jaw",
        "eye_L": "DEF-neck", "DEF-eye_L": "eye_L", "eye_R": "DEF-neck", "DEF-eye_R": "eye_R"}
    assert [b.name for b in bones if b.use_deform] == list(rig.rig_builder.DEFORM_NAMES)
    assert not arm.data.collections["Deform"].is_visible
    for bone in bones:
        # Rest rotation identity (pointing along +Y, roll 0), head on the template's joint.
        joint = rig.rig_builder.BONE_NAMES.index(bone.name.removeprefix("DEF-"))
        assert np.allclose(np.array(bone.matrix_local)[:3, :3], np.eye(3), atol=1e-6)
        assert np.allclose(bone.head_local, face.joints()[joint], atol=1e-6)
    assert all(pb.rotation_mode == 'QUATERNION' for pb in arm.pose.bones)

    mesh = mesh_obj.data
    assert len(mesh.vertices) == face.n_vertices and len(mesh.polygons) == face.n_triangles
    co = np.empty(face.n_vertices * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    assert np.allclose(co.reshape(-1, 3), face.v_template, atol=1e-7)
    loops = np.empty(3 * face.n_triangles, np.int32)
    mesh.loops.foreach_get("vertex_index", loops)
    assert np.array_equal(loops.reshape(-1, 3), face.triangles)

    names = [k.name for k in mesh.shape_keys.key_blocks]
    assert names == (["Basis", "Shape000", "Shape001", "Shape002", "Exp000", "Exp001", "Exp002"]
                     + [f"Pose{i:03d}" for i in range(36)])
    offsets = np.empty(face.n_vertices * 3, np.float32)
    mesh.shape_keys.key_blocks["Exp001"].data.foreach_get("co", offsets)
    assert np.allclose(offsets.reshape(-1, 3) - face.v_template, face.exprdirs[:, :, 1],
                       atol=1e-7)
    assert all(k.value == 0.0 for k in mesh.shape_keys.key_blocks[1:])
    rest = evaluated_world_vertices(mesh_obj)       # a new rig shows the template, upright
    assert np.allclose(rest, face.v_template @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]]).T,
                       atol=1e-6)
    exp = mesh.shape_keys.key_blocks["Exp000"]
    assert (exp.slider_min, exp.slider_max) == (-3, 3)
    assert mesh.shape_keys["portrait_rig_component_names"]["Exp001"] == "smile"
    drivers = mesh.shape_keys.animation_data.drivers
    assert len(drivers) == 36 and all(d.driver.is_simple_expression for d in drivers)

    assert [g.name for g in mesh_obj.vertex_groups] == list(rig.rig_builder.DEFORM_NAMES)
    for joint, group in enumerate(mesh_obj.vertex_groups):
        weights = np.zeros(face.n_vertices)
        for vertex in mesh.vertices:
            for element in vertex.groups:
                if element.group == group.index:
                    weights[vertex.index] = element.weight
        assert np.allclose(weights, face.weights[:, joint], atol=1e-6)
    modifier = mesh_obj.modifiers["Armature"]
    assert modifier.type == 'ARMATURE' and modifier.object == arm

    assert "uv" in mesh.uv_layers
    albedo = mesh.color_attributes["albedo"]
    rgba = np.empty(face.n_vertices * 4, np.float32)
    albedo.data.foreach_get("color", rgba)
    assert np.allclose(rgba.reshape(-1, 4)[:, :3], face.vertex_albedo, atol=1e-6)
    material = mesh.materials[0]
    links = material.node_tree.links
    assert any(link.to_socket.name == "Base Color" and
               getattr(link.from_node, "layer_name", "") == "albedo" for link in links)

    joints_obj = bpy.data.objects["Head_joints"]
    assert joints_obj.parent == arm and joints_obj.hide_render and joints_obj.hide_get()
    assert [k.name for k in joints_obj.data.shape_keys.key_blocks] == names[:7]
    assert [g.name for g in joints_obj.vertex_groups] == ["neck", "jaw", "eye_L", "eye_R"]

    assert arm["portrait_rig_model"] == face.name
    assert arm["portrait_rig_source"] == face.source
    assert arm["portrait_rig_shape_count"] == 3
    assert arm["portrait_rig_expression_count"] == face.n_expression
    assert len(mesh["portrait_rig_joint_regressor"]) == 5 * face.n_vertices


def test_build_rig_rejects_bad_counts_and_models(rig):
    face = small_face()
    with pytest.raises(ValueError, match="n_shape"):
        rig.rig_builder.build_rig(bpy.context, face, n_shape=-1)
    four_joints = dataclasses.replace(
        face, J_regressor=face.J_regressor[:4], weights=face.weights[:, :4],
        parents=face.parents[:4], posedirs=face.posedirs[:, :, :27])
    with pytest.raises(ValueError, match="5 joints"):
        rig.rig_builder.build_rig(bpy.context, four_joints)

    outside = bpy.data.collections.new("Not in the scene")   # bones cannot be edited there
    with pytest.raises(ValueError, match="not in the view layer"):
        rig.rig_builder.build_rig(bpy.context, face, collection=outside)
    assert len(bpy.data.objects) == len(bpy.data.meshes) == len(bpy.data.armatures) == 0


def flame_joint_transforms(face, shape, expression, rotvecs, transforms) -> np.ndarray:
    """FLAME's posed joint transforms G_j [J, 4, 4] (model frame): joint j rotates about its
    regressed location J_j (identity and expression), G_j = G_parent T(J_j - J_parent) R_j."""
    joints = face.joints(shape, expression)
    out = np.zeros((len(joints), 4, 4))
    for j, parent in enumerate(face.parents):
        local = np.eye(4)
        local[:3, :3] = transforms.axis_angle_to_matrix(rotvecs[j])
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0.0)
        out[j] = local if parent < 0 else out[parent] @ local
    return out


def test_posed_joints_follow_identity_and_expression_as_flame(rig):
    """Each control bone's head sits on FLAME's posed joint and turns with FLAME's rotation,
    at any identity and expression, with the bones' rest heads left on the template."""
    face = small_face()
    arm = rig.rig_builder.build_rig(bpy.context, face)
    mesh_obj = rig.rig_builder.rig_mesh(arm)
    rng = np.random.default_rng(5)
    shape, expression = rng.uniform(-3, 3, face.n_shape), rng.uniform(-3, 3, face.n_expression)
    set_keys(mesh_obj, "Shape", shape)
    set_keys(mesh_obj, "Exp", expression)
    rotvecs = rng.normal(size=(5, 3)) * 0.4
    for name, rotvec in zip(rig.rig_builder.BONE_NAMES, rotvecs):
        arm.pose.bones[name].rotation_quaternion = rig.transforms.axis_angle_to_quaternion(rotvec)
    bpy.context.view_layer.update()

    expected = flame_joint_transforms(face, shape, expression, rotvecs, rig.transforms)
    # The root turns about its rest head B_0 instead of J_0 = B_0 + d_0: the whole head
    # shifts by (R_0 - I) d_0 (the scene reader sends that as translation).
    d0 = face.joints(shape, expression)[0] - face.joints()[0]
    shift = (expected[0, :3, :3] - np.eye(3)) @ d0
    moved = np.abs(face.joints(shape, expression) - face.joints()).max()
    assert moved > 5e-3                                # expression and identity move joints
    for joint, name in enumerate(rig.rig_builder.BONE_NAMES):
        posed = np.array(arm.pose.bones[name].matrix)
        assert np.allclose(posed[:3, :3], expected[joint, :3, :3], atol=1e-6), name
        head = face.joints()[0] if joint == 0 else expected[joint, :3, 3] + shift
        assert np.allclose(posed[:3, 3], head, atol=2e-7), name
    assert np.allclose(arm.data.bones["jaw"].head_local, face.joints()[2], atol=1e-7)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-4, 0.5, 2.0, np.pi - 1e-7])
def test_rotation_conversions_keep_double_precision(rig, angle):
    transforms = rig.transforms
    rng = np.random.default_rng(3)
    for axis in rng.normal(size=(5, 3)):
        rotvec = axis / np.linalg.norm(axis) * angle
        matrix = transforms.axis_angle_to_matrix(rotvec)
        assert np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-14)
        back = transforms.matrix_to_axis_angle(matrix)
        assert np.allclose(transforms.axis_angle_to_matrix(back), matrix, atol=1e-14)
        if angle < 3:                            # at pi, rotvec and -rotvec are the same
            assert np.allclose(back, rotvec, atol=1e-12)
        assert np.allclose(transforms.quaternion_to_matrix(
            transforms.matrix_to_quaternion(matrix)), matrix, atol=1e-14)


def test_pose_corrective_keys_follow_bone_rotations(rig):
    arm = rig.rig_builder.build_rig(bpy.context, small_face(), n_shape=0, n_expression=0)
    mesh_obj = rig.rig_builder.rig_mesh(arm)
    rng = np.random.default_rng(1)
    rotvecs = rng.normal(size=(4, 3)) * 0.5
    for name, rotvec in zip(("neck", "jaw", "eye_L", "eye_R"), rotvecs):
        arm.pose.bones[name].rotation_quaternion = rig.transforms.axis_angle_to_quaternion(rotvec)
    arm.pose.bones["root"].rotation_quaternion = (0.8, 0.6, 0.0, 0.0)   # root has no correctives
    bpy.context.view_layer.update()

    blocks = mesh_obj.data.shape_keys.key_blocks
    values = np.array([blocks[f"Pose{i:03d}"].value for i in range(36)])
    expected = np.concatenate([(rig.transforms.axis_angle_to_matrix(v) - np.eye(3)).ravel()
                               for v in rotvecs])
    assert np.allclose(values, expected, atol=1e-5)


def test_several_rigs_are_independent_and_found_from_either_part(rig):
    builder = rig.rig_builder
    first = builder.build_rig(bpy.context, small_face(), name="PortraitRig")
    second = builder.build_rig(bpy.context, small_face(), name="PortraitRig")
    assert first != second and second.name != first.name
    first_mesh, second_mesh = builder.rig_mesh(first), builder.rig_mesh(second)
    assert builder.find_rig(first_mesh) == first and builder.find_rig(second_mesh) == second
    assert builder.find_rig(second) == second
    assert builder.rig_parts(second_mesh) == (second, second_mesh)
    assert builder.find_rig(None) is None

    set_keys(second_mesh, "Exp", [1.0])
    second.pose.bones["jaw"].rotation_quaternion = (0.9, 0.4, 0.0, 0.0)
    bpy.context.view_layer.update()
    assert first_mesh.data.shape_keys.key_blocks["Exp000"].value == 0.0
    assert first_mesh.data.shape_keys.key_blocks["Pose013"].value == 0.0
    assert second_mesh.data.shape_keys.key_blocks["Pose013"].value != 0.0
    assert first.data != second.data and first_mesh.data != second_mesh.data

    plain = bpy.data.objects.new("Plain", bpy.data.meshes.new("Plain"))
    assert builder.find_rig(plain) is None
    with pytest.raises(ValueError, match="not part of a Portrait Rig"):
        builder.rig_parts(plain)
