"""Scene -> RigParams in real Blender: the server's skinning of read_params' output matches
Blender's evaluated mesh, cameras, and the World / lamps as spherical harmonics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.support.blender_env import bpy, blender, extension, extension_repository  # noqa: F401
from tests.support.blender_rig_scene import (add_camera, aim, demo_face, environment_image,
                                             evaluated_world_vertices, rig_modules, set_keys,
                                             small_face, world_with_background,
                                             world_with_environment)
from portrait_rig import sh
from portrait_rig.params import RigParams

pytestmark = pytest.mark.blender


@pytest.fixture
def rig(extension):
    modules = rig_modules(extension)
    modules.world_sh.clear_cache()
    return modules


def camera_frame(points: np.ndarray, cam) -> np.ndarray:
    """World points [N, 3] in the camera's frame: R_c^T (p - t_c)."""
    matrix = np.array(cam.matrix_world, dtype=np.float64)
    rotation = matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)
    return (points - matrix[:3, 3]) @ rotation


def root_in_world(arm) -> np.ndarray:
    bpy.context.view_layer.update()
    return np.array(arm.matrix_world @ arm.pose.bones["root"].head)


# ------------------------------------------------------------------------------ geometry

def test_server_skinning_of_read_params_matches_blenders_mesh(rig):
    torch = pytest.importorskip("torch")
    from server.renderer.face_model import FaceModel

    face = demo_face()
    arm = rig.rig_builder.build_rig(bpy.context, face)
    mesh_obj = rig.rig_builder.rig_mesh(arm)
    rng = np.random.default_rng(7)
    set_keys(mesh_obj, "Shape", rng.uniform(-2, 2, face.n_shape))
    set_keys(mesh_obj, "Exp", rng.uniform(0, 1, face.n_expression))
    for bone in rig.rig_builder.BONE_NAMES:                        # the control bones
        arm.pose.bones[bone].rotation_quaternion = rig.transforms.axis_angle_to_quaternion(
            rng.normal(size=3) * 0.3)
    arm.pose.bones["root"].location = (0.01, -0.02, 0.015)
    arm.location = (0.3, -0.2, 1.1)
    arm.rotation_euler = (1.3, 0.2, -0.4)
    cam = add_camera(location=(0.5, -1.1, 1.4), target=(0.3, -0.2, 1.1))
    cam.data.lens = 85
    bpy.context.view_layer.update()

    params = rig.scene_reader.read_params(arm, bpy.context.scene)
    assert type(params).from_dict(params.to_dict()) == params      # validates, round trips
    evaluated = rig.scene_reader.read_params(arm, bpy.context.scene,
                                             depsgraph=bpy.context.evaluated_depsgraph_get())
    assert evaluated == params
    received = RigParams.from_json(params.to_json())                 # as the server gets it

    model = FaceModel(face, dtype=torch.float64)
    server_vertices = model.pose_params([received])[0][0].numpy()
    blender_vertices = camera_frame(evaluated_world_vertices(mesh_obj), cam)
    assert np.abs(server_vertices - blender_vertices).max() < 1e-5
    # Not trivially equal: the pose moved the mesh far from the template.
    assert np.abs(blender_vertices - face.v_template).max() > 0.05


@pytest.fixture(scope="module")
def flame_server(tmp_path_factory):
    """A render server on a FLAME-layout model file (official keys and shapes, random
    content: tests/support/flame_fixture.py)."""
    from tests.support.flame_fixture import write_flame_fixture
    from tests.support.server_process import ServerProcess
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    write_flame_fixture(path, seed=3)
    with ServerProcess("--model", str(path), "--backend", "preview", "--quiet") as server:
        yield server


def test_blenders_mesh_is_the_servers_skinning_of_a_flame_model(extension, flame_server):
    """Blender's evaluated mesh equals the server's ``vertices`` reply for the parameters the
    scene reader sends, at random identity, expression and pose: FLAME's joints move with
    identity and expression, and the rig follows them exactly."""
    from portrait_rig.client import Client
    rig = rig_modules(extension)
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = flame_server.host, flame_server.port
    prefs.face_source = 'SERVER'
    assert bpy.ops.portrait_rig.add_rig() == {'FINISHED'}
    arm = bpy.context.scene.portrait_rig.rig
    mesh_obj = rig.rig_builder.rig_mesh(arm)
    assert len(mesh_obj.data.vertices) == 5023
    cam = add_camera(location=(0.4, -1.3, 0.6), target=(0.0, 0.0, 0.0))
    with Client(flame_server.host, flame_server.port, timeout=60) as client:
        for seed in range(3):
            rng = np.random.default_rng(seed)
            shape, expression = rng.uniform(-3, 3, 100), rng.uniform(-3, 3, 50)
            set_keys(mesh_obj, "Shape", shape)
            set_keys(mesh_obj, "Exp", expression)
            for bone in rig.rig_builder.BONE_NAMES:
                arm.pose.bones[bone].rotation_quaternion = \
                    rig.transforms.axis_angle_to_quaternion(rng.normal(size=3) * 0.3)
            arm.pose.bones["root"].location = rng.normal(size=3) * 0.02
            bpy.context.view_layer.update()

            params = rig.scene_reader.read_params(arm, bpy.context.scene)
            reply = client.vertices(params)
            server = np.frombuffer(reply.data, np.float32).reshape(-1, 3)
            blender = camera_frame(evaluated_world_vertices(mesh_obj), cam)
            joints = rig.rig_builder.joint_data(mesh_obj.data)
            moved = np.abs(joints.joints(shape, expression) - joints.joints(shape)).max()
            assert moved > 1e-3                   # expression alone moves FLAME's joints
            assert np.abs(server - blender).max() < 1e-5, seed


def test_expression_shift_of_the_root_joint_is_compensated(rig):
    """FLAME regresses joints from the mesh with expression; the bones sit at the identity's
    joints. The root's pivot difference must be absorbed exactly by the translation."""
    torch = pytest.importorskip("torch")
    from server.renderer.face_model import FaceModel

    face = small_face()
    shape, expression = [0.5, -1.0, 1.5, 0.3], [3.0, -2.0, 1.0]
    assert np.linalg.norm(face.joints(shape, expression)[0] - face.joints(shape)[0]) > 5e-4
    arm = rig.rig_builder.build_rig(bpy.context, face)
    mesh_obj = rig.rig_builder.rig_mesh(arm)
    set_keys(mesh_obj, "Shape", shape)
    set_keys(mesh_obj, "Exp", expression)
    arm.pose.bones["root"].rotation_quaternion = (0.9, 0.2, -0.3, 0.25)
    arm.location, arm.rotation_euler = (0.1, 0.2, 0.3), (1.2, -0.3, 0.2)
    cam = add_camera(location=(0.4, -1.0, 0.5), target=(0.1, 0.2, 0.3))

    params = RigParams.from_json(rig.scene_reader.read_params(arm, bpy.context.scene).to_json())
    server_vertices = FaceModel(face, dtype=torch.float64).pose_params([params])[0][0].numpy()
    blender_vertices = camera_frame(evaluated_world_vertices(mesh_obj), cam)
    assert np.abs(server_vertices - blender_vertices).max() < 1e-5


def test_orbiting_the_camera_changes_only_the_global_rotation(rig):
    arm = rig.rig_builder.build_rig(bpy.context, small_face())
    mesh_obj = rig.rig_builder.rig_mesh(arm)
    set_keys(mesh_obj, "Shape", [1.0, -0.5])
    arm.pose.bones["jaw"].rotation_quaternion = (0.95, 0.3, 0.0, 0.05)
    arm.location = (0.2, 0.1, 1.5)
    world_with_background((0.3, 0.4, 0.5), 2.0)
    centre = root_in_world(arm)
    cam = add_camera(location=centre + (0.1, -1.0, 0.2), target=centre)
    before = rig.scene_reader.read_params(arm, bpy.context.scene).to_dict()

    from mathutils import Matrix
    orbit = np.array(Matrix.Rotation(0.7, 3, 'Z') @ Matrix.Rotation(-0.3, 3, 'X'))
    aim(cam, centre + orbit @ (np.array(cam.location) - centre), centre)
    bpy.context.view_layer.update()
    after = rig.scene_reader.read_params(arm, bpy.context.scene).to_dict()

    assert not np.allclose(before["pose"]["global"], after["pose"]["global"], atol=1e-3)
    for params in (before, after):
        params["pose"].pop("global")
    assert np.allclose(before.pop("translation"), after.pop("translation"), atol=1e-6)
    assert np.allclose(before.pop("lighting")["sh"], after.pop("lighting")["sh"], atol=1e-6)
    assert before == after


@pytest.mark.parametrize("kind, fit, size, pixel_aspect", [
    ('PERSP', 'AUTO', (1920, 1080), (1, 1)),
    ('PERSP', 'AUTO', (600, 900), (1, 1)),
    ('PERSP', 'HORIZONTAL', (600, 900), (1, 1)),
    ('PERSP', 'VERTICAL', (1000, 500), (2, 1)),
    ('ORTHO', 'AUTO', (1000, 500), (1, 1)),
    ('ORTHO', 'VERTICAL', (500, 1000), (1, 1)),
])
def test_camera_matches_blenders_projection(rig, kind, fit, size, pixel_aspect):
    arm = rig.rig_builder.build_rig(bpy.context, small_face())
    cam = add_camera()
    cam.data.type, cam.data.sensor_fit = kind, fit
    cam.data.lens, cam.data.sensor_width, cam.data.sensor_height = 70, 36, 24
    cam.data.ortho_scale = 0.6
    cam.data.clip_start, cam.data.clip_end = 0.05, 30
    render = bpy.context.scene.render
    render.resolution_x, render.resolution_y = size
    render.pixel_aspect_x, render.pixel_aspect_y = pixel_aspect

    camera = rig.scene_reader.read_params(arm, bpy.context.scene).camera
    projection = np.array(cam.calc_matrix_camera(
        bpy.context.evaluated_depsgraph_get(), x=size[0], y=size[1],
        scale_x=pixel_aspect[0], scale_y=pixel_aspect[1]))
    assert (camera.location, camera.rotation) == ([0, 0, 0], [0, 0, 0])
    assert (camera.near, camera.far) == pytest.approx((0.05, 30))
    if kind == 'PERSP':
        assert camera.type == "perspective"
        assert 1 / math.tan(math.radians(camera.fov_y) / 2) == pytest.approx(projection[1, 1])
    else:
        assert camera.type == "orthographic" and camera.tx == camera.ty == 0
        assert camera.scale == pytest.approx(projection[1, 1])


def test_read_params_needs_a_camera(rig):
    arm = rig.rig_builder.build_rig(bpy.context, small_face())
    with pytest.raises(ValueError, match="no active camera"):
        rig.scene_reader.read_params(arm, bpy.context.scene)


# ------------------------------------------------------------------------------ lighting

def front_view(rig):
    """A rig at the origin seen by a camera at -Y looking along +Y (camera frame = model
    frame up to a translation)."""
    arm = rig.rig_builder.build_rig(bpy.context, small_face())
    add_camera(location=(0, -1.2, 0), target=(0, 0, 0))
    return arm


def scene_sh(rig, arm, **kwargs) -> np.ndarray:
    return np.array(rig.scene_reader.read_params(arm, bpy.context.scene, **kwargs).lighting.sh)


def spot_image(size=(32, 64)) -> np.ndarray:
    """Dark equirectangular RGB pixels with a bright 2x2 spot centred on texture coordinates
    (0.5, 0.5), which Blender maps to the +X direction."""
    rgb = np.full((*size, 3), 0.05)
    row, col = size[0] // 2, size[1] // 2
    rgb[row - 1: row + 1, col - 1: col + 1] = (40.0, 30.0, 20.0)
    return rgb


def test_uniform_world_is_band_zero_only(rig):
    arm = front_view(rig)
    colour, strength = np.array([0.2, 0.5, 0.8]), 1.7
    world_with_background(tuple(colour), strength)
    code = scene_sh(rig, arm)
    assert np.allclose(code[0], colour * strength * math.sqrt(4 * math.pi), atol=1e-9)
    assert np.allclose(code[1:], 0.0, atol=1e-9)


def test_bright_spot_at_plus_x_lights_the_faces_left(rig):
    arm = front_view(rig)
    world_with_environment(environment_image("spot", spot_image()), strength=2.0)
    code = scene_sh(rig, arm)
    assert (code[1] > 0).all()                                   # x: the subject's left
    assert (np.abs(code[2:4]) < 0.05 * code[1]).all()            # not up/down or front/back
    assert code[1, 0] > code[1, 1] > code[1, 2]                  # the spot's colour
    shading = sh.shade(np.array([[1.0, 0, 0], [-1.0, 0, 0]]), code)
    assert (shading[0] > 3 * shading[1]).all()


def test_mapping_rotation_turns_the_environment(rig):
    arm = front_view(rig)
    image = environment_image("spot", spot_image())
    world_with_environment(image)
    plain = scene_sh(rig, arm)
    world_with_environment(image, rotation=(0, 0, math.pi))
    half_turn = scene_sh(rig, arm)
    # Half a turn about world Z (the camera frame's y) negates x and z: the coefficients of
    # x, z, xy and yz change sign.
    signs = np.array([1, -1, 1, -1, -1, 1, -1, 1, 1])[:, None]
    assert np.allclose(half_turn, signs * plain, atol=1e-6)
    assert np.abs(plain[1]).min() > 0.1

    # Point: lookup = R d, so the +X texel is seen from R^-1 (+X) = world -Y, behind the
    # camera: the face's front (+Z) is lit. Texture applies the inverse: world +Y, the back.
    world_with_environment(image, rotation=(0, 0, math.pi / 2), vector_type='POINT')
    point = scene_sh(rig, arm)
    world_with_environment(image, rotation=(0, 0, math.pi / 2), vector_type='TEXTURE')
    texture = scene_sh(rig, arm)
    assert (point[3] > 0.9 * plain[1]).all() and (np.abs(point[1:3]) < 0.05 * plain[1]).all()
    assert np.allclose(texture[1:4], -point[1:4], atol=1e-3 * plain[1].max())

    # Object coordinates of an empty turned like the mapping: the inverse turn, as Texture.
    world = world_with_environment(image)
    empty = bpy.data.objects.new("Turn", None)
    empty.rotation_euler = (0, 0, math.pi / 2)
    bpy.context.scene.collection.objects.link(empty)
    bpy.context.view_layer.update()
    coords = world.node_tree.nodes.new("ShaderNodeTexCoord")
    coords.object = empty
    texture_node = next(n for n in world.node_tree.nodes
                        if n.bl_idname == "ShaderNodeTexEnvironment")
    world.node_tree.links.new(coords.outputs["Object"], texture_node.inputs["Vector"])
    assert np.allclose(scene_sh(rig, arm), texture, atol=1e-6)


def test_mapping_scale_keeps_a_uniform_environment_uniform(rig):
    arm = front_view(rig)
    image = environment_image("grey", np.full((32, 64, 3), 0.6))
    world_with_environment(image, strength=1.5, scale=(1.0, 2.0, 0.5))
    code = scene_sh(rig, arm)
    assert np.allclose(code[0], 0.9 * math.sqrt(4 * math.pi), rtol=1e-3)
    assert np.allclose(code[1:], 0.0, atol=2e-3)


def test_byte_images_are_linearised(rig):
    arm = front_view(rig)
    image = bpy.data.images.new("grey", 16, 8, float_buffer=False)
    assert image.colorspace_settings.name == "sRGB"
    image.pixels.foreach_set(np.full(16 * 8 * 4, 0.5, dtype=np.float32))
    world_with_environment(image)
    stored = round(0.5 * 255) / 255                              # 8-bit storage
    linear = ((stored + 0.055) / 1.055) ** 2.4
    assert np.allclose(scene_sh(rig, arm)[0], linear * math.sqrt(4 * math.pi), rtol=1e-4)


def test_environment_cache_follows_strength_and_mapping(rig):
    arm = front_view(rig)
    world = world_with_environment(environment_image("spot", spot_image()), strength=1.0)
    first = scene_sh(rig, arm)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 3.0
    assert np.allclose(scene_sh(rig, arm), 3 * first)


def test_lamps_add_directional_light(rig):
    arm = front_view(rig)
    world_with_background((0, 0, 0))
    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", 'SUN'))
    sun.data.energy, sun.data.color = 2.0, (1.0, 0.5, 0.25)
    sun.rotation_euler = (0, math.pi / 2, 0)                     # shines from +X
    bpy.context.scene.collection.objects.link(sun)
    bpy.context.view_layer.update()

    assert np.allclose(scene_sh(rig, arm), 0.0)                  # lamps only on request
    code = scene_sh(rig, arm, include_lights=True)
    # A delta light's band-limited irradiance facing it is (1/4 + 1/2 + 5/16) E, its
    # radiance off a white surface that over pi.
    facing = sh.shade(np.array([1.0, 0, 0]), code)
    assert np.allclose(facing, 1.0625 * 2.0 * np.array([1.0, 0.5, 0.25]) / math.pi)

    sun.hide_render = True                                       # not rendered: ignored
    assert np.allclose(scene_sh(rig, arm, include_lights=True), 0.0)


def test_point_lamp_irradiance_falls_off_with_distance_squared(rig):
    point = bpy.data.objects.new("Point", bpy.data.lights.new("Point", 'POINT'))
    point.data.energy = 100.0
    bpy.context.scene.collection.objects.link(point)
    target = np.array([0.3, -0.2, 1.0])
    codes = []
    for distance in (0.5, 1.0):
        point.location = target + (0, 0, distance)                 # straight above
        bpy.context.view_layer.update()
        codes.append(rig.world_sh.lights_to_sh([point], target, np.eye(3)))
    near, far = codes
    assert (near[3] > 0).all() and np.allclose(near[[1, 2]], 0, atol=1e-6 * near[3, 0])
    assert np.allclose(far, near / 4, atol=1e-6 * near[0, 0])
    # Radiant intensity P / (4 pi): irradiance 100 / (4 pi 0.25) facing the lamp.
    facing = sh.shade(np.array([0, 0, 1.0]), near)
    assert np.allclose(facing, 1.0625 * (100 / (4 * math.pi * 0.25)) / math.pi)
