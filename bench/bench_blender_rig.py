"""Blender side of the rig: building it, evaluating it, and reading parameters.

Runs in the ``bpy`` module (no Blender UI) on a FLAME-sized model (5023 vertices, 9976
triangles, 300 identity + 100 expression components, random content from
tests/support/flame_fixture.py). Prints

* ``build_rig``: all 400 components, and the preferences' default 100 + 50 keys;
* the depsgraph evaluation after an expression key changed (shape keys, pose-corrective and
  joint drivers, joint constraints, armature deformation);
* ``read_params``: p50 / p95 per call with 100 + 50 keys while the pose, expression and
  camera change every call, for a uniform World, a 2048 x 1024 environment texture (cached
  projection) and with three lamps; plus the environment projection itself (cache miss).

Target: read_params p50 <= 1 ms (it runs in depsgraph and frame-change handlers).
Figures on a shared 2-core VM vary by +-20%: compare runs on the same machine.

    python bench/bench_blender_rig.py [--count 300]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bpy  # noqa: E402
import numpy as np  # noqa: E402

from tests.support.flame_fixture import random_flame_arrays  # noqa: E402
from portrait_rig.face_data import FaceData  # noqa: E402

PACKAGE = "portrait_rig_bench"


def extension_module(name: str):
    """``blender_rig.<name>`` imported as Blender would: inside the extension package."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.blender_rig.{name}")


def flame_sized_face() -> FaceData:
    a = random_flame_arrays(seed=0)
    n_vertices = len(a["v_template"])
    return FaceData(v_template=a["v_template"], triangles=a["f"].astype(np.int32),
                    shapedirs=a["shapedirs"][:, :, :300], exprdirs=a["shapedirs"][:, :, 300:],
                    posedirs=a["posedirs"], J_regressor=a["J_regressor"],
                    weights=a["weights"], parents=np.array([-1, 0, 1, 1, 1]),
                    vertex_albedo=np.full((n_vertices, 3), 0.6),
                    uv=np.zeros((n_vertices, 2)), name="FLAME-sized random model")


def millis(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(seconds) * 1e3:7.3f} ms   p95 {p95 * 1e3:7.3f} ms"


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()

    builder = extension_module("rig_builder")
    reader = extension_module("scene_reader")
    world_sh = extension_module("world_sh")
    face = flame_sized_face()
    context = bpy.context

    bpy.ops.wm.read_factory_settings(use_empty=True)
    seconds, _ = timed(builder.build_rig, context, face)
    print(f"build_rig, 300 + 100 keys         {seconds * 1e3:8.1f} ms")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    seconds, arm = timed(builder.build_rig, context, face, n_shape=100, n_expression=50)
    print(f"build_rig, 100 + 50 keys          {seconds * 1e3:8.1f} ms")

    mesh_obj = builder.rig_mesh(arm)
    blocks = mesh_obj.data.shape_keys.key_blocks
    evaluations = []
    for i in range(20):
        blocks["Exp000"].value = 0.5 + 0.01 * i
        evaluations.append(timed(context.view_layer.update)[0])
    print(f"depsgraph evaluation, Exp changed {np.median(evaluations) * 1e3:8.2f} ms (median)")

    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    context.scene.collection.objects.link(camera)
    context.scene.camera = camera
    camera.location = (0.0, -1.2, 0.0)
    camera.rotation_euler = (np.pi / 2, 0.0, 0.0)
    world = bpy.data.worlds.new("World")
    context.scene.world = world
    rng = np.random.default_rng(0)

    def read_loop(**kwargs) -> list[float]:
        out = []
        for i in range(args.count):
            blocks[f"Exp{i % 50:03d}"].value = float(rng.uniform(-1, 1))
            arm.pose.bones["jaw"].rotation_quaternion = (1.0, 0.1 * (i % 5), 0.0, 0.0)
            camera.location.x = 0.001 * (i % 17)
            context.view_layer.update()
            start = time.perf_counter()
            reader.read_params(arm, context.scene, **kwargs)
            out.append(time.perf_counter() - start)
        return out

    print(f"read_params, uniform World        {millis(read_loop())}")

    tree = world.node_tree
    background = next(n for n in tree.nodes if n.bl_idname == "ShaderNodeBackground")
    texture = tree.nodes.new("ShaderNodeTexEnvironment")
    image = bpy.data.images.new("env", 2048, 1024, float_buffer=True)
    image.pixels.foreach_set(rng.uniform(0, 2, 2048 * 1024 * 4).astype(np.float32))
    texture.image = image
    tree.links.new(texture.outputs["Color"], background.inputs["Color"])
    world_sh.clear_cache()
    seconds, _ = timed(world_sh.world_to_sh, world, np.eye(3))
    print(f"environment projection, 2048x1024 {seconds * 1e3:8.1f} ms (cache miss)")
    print(f"read_params, environment (cached) {millis(read_loop())}")

    for index, kind in enumerate(('SUN', 'POINT', 'AREA')):
        lamp = bpy.data.objects.new(kind, bpy.data.lights.new(kind, kind))
        lamp.location = (index - 1.0, -1.0, 1.0)
        context.scene.collection.objects.link(lamp)
    print(f"read_params, environment + lamps  {millis(read_loop(include_lights=True))}")


if __name__ == "__main__":
    main()
