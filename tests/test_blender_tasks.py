"""Long operations never freeze Blender: Add Portrait Rig and Fit Rig to Photo run as tasks
(``blender_rig.tasks``) - network on a worker thread, Blender data edited in short slices on
the main thread, cancellable at any point. The bpy module runs no event loop, so the tests
step the tasks the way the modal operator's timer does."""

from __future__ import annotations

import threading

import pytest

from tests.support.blender_env import (blender, bpy, draw, extension,  # noqa: F401
                                       extension_repository, render_server)

pytestmark = pytest.mark.blender


def serve_from(extension, server, shape_keys=20, expression_keys=10):
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = server.host, server.port
    prefs.face_source = 'SERVER'
    prefs.shape_key_count, prefs.expression_key_count = shape_keys, expression_keys


def step_until(runner, condition=lambda runner: runner.done, limit: int = 100000):
    """Step ``runner`` as the modal timer would until ``condition(runner)``; returns the
    number of steps."""
    for steps in range(1, limit):
        runner.step()
        if condition(runner):
            return steps
        if runner.waiting:
            runner._pending.thread.join(0.01)
    raise AssertionError(f"{runner.status()} after {limit} steps")


def test_add_rig_fetches_off_the_main_thread_and_builds_in_slices(extension, render_server):
    tasks = extension.module("blender_rig.tasks")
    operators = extension.module("blender_rig.operators")
    rig_builder = extension.module("blender_rig.rig_builder")
    serve_from(extension, render_server)
    workers = []
    loader = operators.face_model_loader

    def recording_loader(prefs):                 # which thread loads the model
        load = loader(prefs)
        return lambda: (workers.append(threading.current_thread()), load())[1]
    operators.face_model_loader = recording_loader
    try:
        runner = tasks.Runner(operators.add_rig_task("Sliced"), "Add Portrait Rig")
        runner.step()
        assert runner.waiting and runner.text == "loading the face model"
        assert bpy.data.objects.get("Sliced") is None       # nothing built while it waits
        step_until(runner)
    finally:
        operators.face_model_loader = loader
    assert runner.error is None, runner.error
    assert workers and threading.main_thread() not in workers
    rig = runner.result
    assert rig.name == "Sliced" and rig_builder.rig_mesh(rig) is not None
    assert len(runner.slices_ms) > 3                          # built over several steps
    # The same rig as the blocking build (what the operator's execute runs).
    assert bpy.ops.portrait_rig.add_rig(name="Blocking") == {'FINISHED'}
    keys = [[k.name for k in rig_builder.rig_mesh(bpy.data.objects[name]).data.shape_keys
             .key_blocks] for name in ("Sliced", "Blocking")]
    assert keys[0] == keys[1] and sum(name.startswith("Exp") for name in keys[0]) == 10
    # Invoked (a button) where no window runs events (blender -b, the module): to the end.
    assert bpy.ops.portrait_rig.add_rig('INVOKE_DEFAULT', name="Invoked") == {'FINISHED'}
    assert rig_builder.rig_mesh(bpy.data.objects["Invoked"]) is not None


def test_a_cancelled_build_leaves_nothing_behind(extension, render_server):
    tasks = extension.module("blender_rig.tasks")
    operators = extension.module("blender_rig.operators")
    serve_from(extension, render_server, shape_keys=100, expression_keys=50)
    before = {name: len(getattr(bpy.data, name)) for name in
              ("objects", "meshes", "armatures", "materials")}
    runner = tasks.Runner(operators.add_rig_task("Cancelled"), "Add Portrait Rig")
    step_until(runner, lambda r: r.text == "shape keys")       # half-way through the keys
    assert bpy.data.objects.get("Cancelled") is not None
    runner.cancel()
    assert isinstance(runner.error, tasks.Cancelled) and runner.done
    assert before == {name: len(getattr(bpy.data, name)) for name in before}
    runner.step()                                              # a late timer does nothing
    assert runner.done and runner.result is None


def test_cancelling_while_the_server_works_drops_its_answer(extension, render_server):
    tasks = extension.module("blender_rig.tasks")
    operators = extension.module("blender_rig.operators")
    serve_from(extension, render_server)
    release = threading.Event()
    loader = operators.face_model_loader
    operators.face_model_loader = lambda prefs: (lambda load: lambda: (release.wait(10),
                                                                       load())[1])(loader(prefs))
    try:
        runner = tasks.Runner(operators.add_rig_task("Dropped"), "Add Portrait Rig")
        runner.step()
        assert runner.waiting
        runner.cancel()
        release.set()
    finally:
        operators.face_model_loader = loader
    assert runner.step() and isinstance(runner.error, tasks.Cancelled)
    assert bpy.data.objects.get("Dropped") is None


def test_task_errors_reach_the_operator_and_the_panel_offers_cancel(extension, tmp_path):
    tasks = extension.module("blender_rig.tasks")
    panel = extension.module("blender_rig.panel")
    prefs = extension.preferences
    prefs.face_source, prefs.face_file = 'FILE', str(tmp_path / "missing.npz")

    def failing():
        yield tasks.Progress(0.5, "half")
        yield tasks.Wait(open, str(tmp_path / "missing.npz"))
    runner = tasks.Runner(failing(), "Failing")
    with pytest.raises(FileNotFoundError):
        runner.run()
    assert runner.fraction == 0.5
    with pytest.raises(RuntimeError, match="Add Portrait Rig: .*missing.npz"):
        bpy.ops.portrait_rig.add_rig()

    class Running:                                  # a modal operator in flight
        _runner = tasks.Runner(iter(()), "Add Portrait Rig")
        _cancel_requested = False
    tasks._running.append(Running)
    try:
        shown = draw(panel.VIEW3D_PT_portrait_rig)
        assert any(text.startswith("Add Portrait Rig: starting") for text in shown)
        assert bpy.ops.portrait_rig.cancel_tasks() == {'FINISHED'}
        assert Running._cancel_requested
    finally:
        tasks._running.remove(Running)
    assert not bpy.ops.portrait_rig.cancel_tasks.poll()
