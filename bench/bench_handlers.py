"""Main-thread cost of the live link: the scene handlers and the frame drain.

Runs in the ``bpy`` module with the extension enabled as Blender enables it, on a FLAME-sized
rig (5023 vertices; random content from tests/support/flame_fixture.py) with the preferences'
default 100 identity + 50 expression keys (plus 36 pose correctives). Prints medians and p95 of

* ``depsgraph_update_post`` as Blender calls it after an expression key changed: read_params,
  compare with the last parameters, hand over to the worker. Target: median <= 1 ms;
* ``frame_change_post`` with nothing changed (read_params + compare);
* ``drain_frames`` writing one frame into the image (sRGB decode, flip, foreach_set).

The live link points at a port where nothing listens: the handlers never touch the socket,
so their cost does not depend on the server.

Then the long operators as they run from the interface (``blender_rig.tasks``): each modal
timer event runs one ``Runner.step``, the only time the operator holds Blender's main thread,
and the runner records every step's duration. Printed: the steps' maximum, p95 and count,
and the total time, for

* "Add Portrait Rig" from a render server serving a FLAME-layout model file (5023
  vertices; the preferences' 100 + 50 keys): model download on a worker, rig built in slices;
* "Fit Rig to Photo" (the demo head's server, scikit-image's astronaut photo, when dlib and
  scikit-image are installed): fit on the server from a worker, result set on the rig.

Target: no step over 100 ms, i.e. the interface never stops answering for longer than that.
Figures on a shared 2-core VM vary by +-20%.

    python bench/bench_handlers.py [--count 300] [--size 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests.support import blender_env  # noqa: E402  (loads bpy; enables the extension like Blender)
from tests.support.blender_env import bpy  # noqa: E402
from tests.support.flame_fixture import random_flame_arrays  # noqa: E402
from portrait_rig.face_data import FaceData  # noqa: E402

N_SHAPE, N_EXPRESSION = 100, 50


def flame_sized_face() -> FaceData:
    a = random_flame_arrays(seed=0)
    n = len(a["v_template"])
    return FaceData(v_template=a["v_template"], triangles=a["f"].astype(np.int32),
                    shapedirs=a["shapedirs"][:, :, :300], exprdirs=a["shapedirs"][:, :, 300:],
                    posedirs=a["posedirs"], J_regressor=a["J_regressor"], weights=a["weights"],
                    parents=np.array([-1, 0, 1, 1, 1]), vertex_albedo=np.full((n, 3), 0.6),
                    name="FLAME-sized random model")


def summary(label: str, seconds: list[float]) -> None:
    ms = np.array(seconds) * 1e3
    print(f"{label:<58} median {np.median(ms):7.3f} ms   p95 {np.percentile(ms, 95):7.3f} ms"
          f"   (n={len(ms)})")


def timed_handler(handlers, function, times: list[float]):
    """Put a timing wrapper in place of ``function`` in a handler list."""
    def wrapper(*args):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    handlers.remove(function)
    handlers.append(wrapper)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=300, help="calls per measurement")
    ap.add_argument("--size", type=int, default=512, help="frame side for drain_frames")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        blender_env.factory_reset()
        ext = blender_env.enable_extension(Path(tmp))
        live_link = ext.module("blender_rig.live_link")
        rig_builder = ext.module("blender_rig.rig_builder")

        scene = bpy.context.scene
        world = bpy.data.worlds.new("World")
        world.color = (0.8, 0.8, 0.8)
        scene.world = world
        cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
        cam.location, cam.rotation_euler = (0.0, -1.2, 0.0), (np.pi / 2, 0.0, 0.0)
        scene.collection.objects.link(cam)
        scene.camera = cam
        rig = rig_builder.build_rig(bpy.context, flame_sized_face(), name="Bench",
                                    n_shape=N_SHAPE, n_expression=N_EXPRESSION)
        blocks = rig_builder.rig_mesh(rig).data.shape_keys.key_blocks
        print(f"rig: {len(blocks)} shape keys ({N_SHAPE} identity, {N_EXPRESSION} expression, "
              f"{len(blocks) - N_SHAPE - N_EXPRESSION - 1} pose, Basis), "
              f"{len(rig_builder.rig_mesh(rig).data.vertices)} vertices")

        live_link.start("127.0.0.1", 9)            # the discard port: nothing listens there
        scene.portrait_rig.rig = rig
        scene.portrait_rig.live = True
        bpy.context.view_layer.update()

        handlers = bpy.app.handlers.depsgraph_update_post
        changed: list[float] = []
        wrapper = timed_handler(handlers, live_link.on_depsgraph_update_post, changed)
        expression = blocks["Exp000"]
        for i in range(args.count):
            expression.value = 0.5 + 0.001 * i        # a new value every time: full path
            bpy.context.view_layer.update()
        handlers.remove(wrapper)
        handlers.append(live_link.on_depsgraph_update_post)
        assert len(changed) == args.count, "the depsgraph handler did not run on every update"
        summary("depsgraph_update_post, expression key changed", changed)

        frame_rgba = np.random.default_rng(0).integers(
            0, 256, (args.size, args.size, 4), dtype=np.uint8)
        frame = SimpleNamespace(width=args.size, height=args.size, format="rgba8",
                                pixels=memoryview(frame_rgba.tobytes()), timings={})

        unchanged = []
        for _ in range(args.count):
            start = time.perf_counter()
            live_link.on_frame_change_post(scene)
            unchanged.append(time.perf_counter() - start)
        summary("frame_change_post, nothing changed", unchanged)

        drains = []
        for _ in range(max(args.count // 5, 20)):
            live_link._session.worker.frames.put((frame, 0.0))
            start = time.perf_counter()
            live_link.drain_frames()
            drains.append(time.perf_counter() - start)
        summary(f"drain_frames, one {args.size}x{args.size} rgba8 frame", drains)

        live_link.stop()
        bench_tasks(ext, Path(tmp))
        blender_env.disable_extension()
        blender_env.remove_repository()


def step_task(tasks, generator, label: str):
    """Step a task the way the modal operator's timer does; returns its runner."""
    runner = tasks.Runner(generator, label)
    while not runner.step():
        time.sleep(tasks.TIMER_S)
    if runner.error is not None:
        raise runner.error
    return runner


def report_steps(label: str, runner) -> None:
    steps = np.array(runner.slices_ms)
    print(f"{label:<58} max {steps.max():7.1f} ms   p95 {np.percentile(steps, 95):6.1f} ms"
          f"   ({len(steps)} steps, {time.perf_counter() - runner.started:.1f} s in all)")


def bench_tasks(ext, tmp: Path) -> None:
    from tests.support.flame_fixture import write_flame_fixture
    from tests.support.server_process import ServerProcess
    tasks = ext.module("blender_rig.tasks")
    operators = ext.module("blender_rig.operators")
    photo_fit = ext.module("blender_rig.photo_fit")
    prefs = ext.preferences
    prefs.face_source = 'SERVER'
    model = tmp / "generic_model.pkl"
    write_flame_fixture(model)
    with ServerProcess("--model", str(model), "--backend", "preview", "--quiet") as server:
        prefs.server_host, prefs.server_port = server.host, server.port
        runner = step_task(tasks, operators.add_rig_task("Bench Rig"), "Add Portrait Rig")
        report_steps("Add Portrait Rig, FLAME layout, 100 + 50 keys: main thread", runner)
    try:
        from skimage.data import astronaut
        import dlib  # noqa: F401
        from PIL import Image
    except ImportError:
        print("Fit Rig to Photo: skipped (needs dlib and scikit-image)")
        return
    photo = tmp / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet") as server:
        prefs.server_host, prefs.server_port = server.host, server.port
        rig = step_task(tasks, operators.add_rig_task("Fit Rig"), "Add Portrait Rig").result
        runner = step_task(tasks, photo_fit.fit_task(rig.name, str(photo)), "Fit Rig to Photo")
        report_steps("Fit Rig to Photo, demo head, astronaut: main thread", runner)


if __name__ == "__main__":
    main()
