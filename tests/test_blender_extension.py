"""The Blender extension: manifest, packaging, registration, preferences, operators, presets.

Runs headless on the ``bpy`` module; see support/blender_env.py for how the extension is loaded.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
import zipfile

import numpy as np
import pytest

from tests.support.blender_env import (EXTENSION_ID, REPO_ROOT, RecordingLayout,  # noqa: F401
                                       blender, bpy, disable_extension, draw, enable_extension,
                                       extension, extension_repository, render_server)

pytestmark = pytest.mark.blender

MANIFEST = REPO_ROOT / "blender_manifest.toml"
TERSE_LIMIT = 64          # Blender's limit for the tagline and permission reasons
SLEEPER = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'"   # a stand-in server


def load_manifest() -> dict:
    with open(MANIFEST, "rb") as fh:
        return tomllib.load(fh)


def test_manifest_fields_follow_the_extension_format():
    data = load_manifest()
    assert data["schema_version"] == "1.0.0"
    assert data["id"] == EXTENSION_ID
    assert re.fullmatch(r"[a-z][a-z0-9_]*", data["id"])
    assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)", data["version"])
    assert data["name"] == "Portrait Rig"
    assert data["type"] == "add-on"
    assert data["blender_version_min"] == "4.2.0"
    assert data["license"] == ["SPDX:GPL-3.0-or-later"]
    assert data["maintainer"].strip()
    for text in (data["tagline"], *data["permissions"].values()):
        assert text.strip() and len(text) <= TERSE_LIMIT
        assert text[-1].isalnum(), f"{text!r} must not end in punctuation"
    assert set(data["permissions"]) == {"network", "files"}


def extension_files() -> set[str]:
    """What the zip must hold: the entry point, the add-on and the core it shares with the
    server (a missing module breaks the installed extension; nothing else belongs there)."""
    needed = {"__init__.py", "LICENSE", "README.md", "blender_manifest.toml"}
    for package in ("blender_rig", "portrait_rig"):
        needed |= {f"{package}/{path.name}" for path in (REPO_ROOT / package).glob("*.py")}
    return needed


def test_blender_validates_builds_and_loads_the_package(tmp_path):
    """Blender's own extension tool (shipped in the wheel, run by scripts/build-extension.sh)
    validates the manifest and builds the package with exactly the extension's modules; the
    built package then loads in a clean process where only the extension is importable - no
    repository on sys.path, so an absolute import of the core, or an import of the server or
    torch, fails here."""
    from portrait_rig_cli import extension as loader
    archive = loader.build(tmp_path / "built")
    with zipfile.ZipFile(archive) as zf:
        assert set(zf.namelist()) == extension_files()
        zf.extractall(tmp_path / "repo" / EXTENSION_ID)

    script = f"""
import importlib, pkgutil, sys
import bpy
import addon_utils          # on sys.path once bpy is imported
bpy.context.preferences.extensions.repos.new(
    name="built", module="built", custom_directory={str(tmp_path / "repo")!r}, source='USER')
def fail(exc):
    raise exc
package = addon_utils.enable("bl_ext.built.{EXTENSION_ID}", default_set=True, handle_error=fail)
for sub in ("blender_rig", "portrait_rig"):
    parent = importlib.import_module(package.__name__ + "." + sub)
    for info in pkgutil.iter_modules(parent.__path__):
        importlib.import_module(parent.__name__ + "." + info.name)
leaked = sorted(name for name in ("portrait_rig", "server", "torch") if name in sys.modules)
assert not leaked, leaked
assert bpy.ops.portrait_rig.add_rig.poll()
addon_utils.disable(package.__name__, default_set=True, handle_error=fail)
print("loaded", package.__name__, flush=True)
# Blender 4.2 as a module crashes in its exit-time destructors once an add-on registered
# callbacks (portrait_rig_cli.extension.exit_status); this process has nothing left to do.
import os
os._exit(0)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"loaded bl_ext.built.{EXTENSION_ID}" in run.stdout


# ------------------------------------------------------------------------------- registration

def footprint() -> dict:
    """Everything an add-on can hang on Blender: types, RNA properties, handlers, menus."""
    handler_lists = [name for name in dir(bpy.app.handlers)
                     if isinstance(getattr(bpy.app.handlers, name), list)]
    owners = (bpy.types.Scene, bpy.types.Object, bpy.types.ViewLayer, bpy.types.WindowManager)
    return {
        "types": {name for name in dir(bpy.types) if "portrait" in name.lower()},
        "properties": {(cls.__name__, prop) for cls in owners
                       for prop in cls.bl_rna.properties.keys() if "portrait" in prop},
        "handlers": {name: list(getattr(bpy.app.handlers, name)) for name in handler_lists},
        "add_menu": list(bpy.types.VIEW3D_MT_add._dyn_ui_initialize()),
        "threads": {t.name for t in threading.enumerate()},
    }


def test_register_unregister_leaves_no_trace(blender, extension_repository):
    before = footprint()
    ext = enable_extension(extension_repository)
    live_link = ext.module("blender_rig.live_link")
    preferences = ext.module("blender_rig.preferences")
    during = footprint()
    assert "PORTRAIT_RIG_OT_add_rig" in during["types"]
    assert ("Scene", "portrait_rig") in during["properties"]
    assert live_link.on_depsgraph_update_post in during["handlers"]["depsgraph_update_post"]
    assert len(during["add_menu"]) == len(before["add_menu"]) + 1

    # Leave a worker thread, a timer and a child process behind on purpose.
    live_link.start("127.0.0.1", 9)                      # discard port: nothing listens
    server = preferences.start_server(SLEEPER)
    assert bpy.app.timers.is_registered(live_link.drain_frames)
    assert server.poll() is None

    disable_extension()
    after = footprint()
    assert after == before
    assert not bpy.app.timers.is_registered(live_link.drain_frames)
    assert server.poll() is not None                      # the local server was stopped
    assert not hasattr(bpy.types.Scene, "portrait_rig")

    enable_extension(extension_repository)                 # and it comes back
    assert bpy.ops.portrait_rig.add_rig.poll()
    assert hasattr(bpy.context.scene, "portrait_rig")
    disable_extension()
    assert footprint() == before


def test_preferences_belong_to_the_extension_package(extension):
    prefs = extension.preferences
    assert type(prefs).bl_idname == extension.name == f"bl_ext.portrait_rig_tests.{EXTENSION_ID}"
    assert (prefs.server_host, prefs.server_port) == ("127.0.0.1", 7865)


def test_remote_hosts_need_online_access(extension):
    preferences = extension.module("blender_rig.preferences")
    live_link = extension.module("blender_rig.live_link")
    assert not bpy.app.online_access              # bpy as a module runs offline by default
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.3.2.1"):
        assert preferences.network_error(host) is None, host
    for host in ("example.com", "10.0.0.5", "2001:db8::1"):
        assert "Online access is disabled" in preferences.network_error(host)

    extension.preferences.server_host = "render.example.com"
    with pytest.raises(RuntimeError, match="Online access is disabled"):
        bpy.ops.portrait_rig.connect()
    assert not live_link.is_running()
    extension.preferences.face_source = 'SERVER'
    with pytest.raises(RuntimeError, match="Online access is disabled"):
        bpy.ops.portrait_rig.add_rig()
    assert not bpy.data.objects


def test_local_server_command_starts_without_blocking(extension):
    preferences = extension.module("blender_rig.preferences")
    extension.preferences.server_command = SLEEPER
    assert bpy.ops.portrait_rig.start_server() == {'FINISHED'}
    process = preferences.server_process()
    assert process is not None and process.poll() is None    # returned while it runs
    assert not bpy.ops.portrait_rig.start_server.poll()          # one at a time
    assert bpy.ops.portrait_rig.stop_server() == {'FINISHED'}
    assert process.poll() is not None and preferences.server_process() is None


# ---------------------------------------------------------------------------------- operators

def server_model(server):
    from portrait_rig.client import Client
    from portrait_rig.face_data import FaceData
    with Client(server.host, server.port) as client:
        hello = client.hello
        header, payload = client.fetch_model()
    return hello, FaceData.from_wire(header, payload)


@pytest.fixture
def demo_npz(render_server, tmp_path):
    """The server's demo head saved as a local .npz face model file."""
    _, data = server_model(render_server)
    path = tmp_path / "demo_head.npz"
    data.save(path)
    return path


def rig_mesh(extension, rig):
    return extension.module("blender_rig.rig_builder").rig_mesh(rig)


def shape_key_names(extension, rig) -> list[str]:
    return [kb.name for kb in rig_mesh(extension, rig).data.shape_keys.key_blocks]


def test_add_rig_from_the_server(extension, render_server):
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = render_server.host, render_server.port
    prefs.face_source = 'SERVER'
    prefs.shape_key_count, prefs.expression_key_count = 5, 3
    assert {'REGISTER', 'UNDO'} <= set(bpy.types.PORTRAIT_RIG_OT_add_rig.bl_options)

    assert bpy.ops.portrait_rig.add_rig(name="Ada") == {'FINISHED'}
    hello, data = server_model(render_server)
    rig = bpy.data.objects["Ada"]
    assert bpy.context.view_layer.objects.active == rig and rig.select_get()
    assert bpy.context.scene.portrait_rig.rig == rig
    assert rig["portrait_rig_model"] == hello["face_model"]["name"] == data.name
    names = shape_key_names(extension, rig)
    assert [n for n in names if n.startswith("Shape")] == [f"Shape{i:03d}" for i in range(5)]
    assert [n for n in names if n.startswith("Exp")] == [f"Exp{i:03d}" for i in range(3)]
    mesh = rig_mesh(extension, rig)
    assert len(mesh.data.vertices) == hello["face_model"]["vertices"]
    verts = np.empty(len(mesh.data.vertices) * 3, np.float32)
    mesh.data.vertices.foreach_get("co", verts)
    np.testing.assert_allclose(verts.reshape(-1, 3), data.v_template, atol=1e-6)


def test_add_rig_from_a_local_file(extension, tmp_path):
    from tests.support.synthetic_face import synthetic_face
    data = synthetic_face()
    path = tmp_path / "sphere.npz"
    data.save(path)
    prefs = extension.preferences
    prefs.face_source, prefs.face_file = 'FILE', str(path)
    prefs.shape_key_count, prefs.expression_key_count = 100, 100   # more than it has

    assert bpy.ops.portrait_rig.add_rig() == {'FINISHED'}
    rig = bpy.context.view_layer.objects.active
    names = shape_key_names(extension, rig)
    assert sum(n.startswith("Shape") for n in names) == data.n_shape
    assert sum(n.startswith("Exp") for n in names) == data.n_expression

    prefs.face_file = str(tmp_path / "missing.npz")
    with pytest.raises(RuntimeError, match="not found.*missing.npz"):
        bpy.ops.portrait_rig.add_rig()
    prefs.face_file = str(tmp_path / "model.obj")
    with pytest.raises(RuntimeError, match="unknown face model source"):
        bpy.ops.portrait_rig.add_rig()


def test_expression_presets_set_and_key_the_expression(extension, demo_npz):
    presets = extension.module("blender_rig.presets")
    prefs = extension.preferences
    prefs.face_source, prefs.face_file = 'FILE', str(demo_npz)
    bpy.ops.portrait_rig.add_rig()
    rig = bpy.context.view_layer.objects.active
    blocks, by_name = presets.expression_keys(rig)
    assert presets.usable(rig) == set(presets.PRESETS)            # the demo head has them all

    assert bpy.ops.portrait_rig.expression_preset(preset='SMILE') == {'FINISHED'}
    values = {name: block.value for name, block in by_name.items()}
    assert values.pop("smile") == pytest.approx(1.0)
    assert values.pop("squint") == pytest.approx(0.3)
    assert not any(values.values())

    by_name["pucker"].value = 0.7                                 # a manual tweak
    bpy.context.scene.frame_set(12)
    assert bpy.ops.portrait_rig.expression_preset(preset='WINK', insert_keyframes=True) \
        == {'FINISHED'}
    assert by_name["blink left"].value == pytest.approx(1.0)
    assert by_name["pucker"].value == 0.0                         # presets replace, not add
    action = rig_mesh(extension, rig).data.shape_keys.animation_data.action
    keyed = {}
    for curve in _fcurves(action):
        name = re.fullmatch(r'key_blocks\["(.+)"\]\.value', curve.data_path).group(1)
        keyed[name] = {tuple(p.co) for p in curve.keyframe_points}
    assert set(keyed) == {block.name for block in blocks}
    assert keyed[by_name["blink left"].name] == {(12.0, 1.0)}

    bpy.ops.portrait_rig.expression_preset(preset='NEUTRAL')
    assert not any(block.value for block in blocks)


def test_presets_need_named_components(extension, tmp_path):
    from tests.support.synthetic_face import synthetic_face
    presets = extension.module("blender_rig.presets")
    data = synthetic_face()
    data.expression_names = []                 # anonymous components, as in FLAME
    data.save(tmp_path / "anonymous.npz")
    prefs = extension.preferences
    prefs.face_source, prefs.face_file = 'FILE', str(tmp_path / "anonymous.npz")
    bpy.ops.portrait_rig.add_rig()
    rig = bpy.context.view_layer.objects.active
    assert presets.usable(rig) == {"NEUTRAL"}
    with pytest.raises(RuntimeError, match="needs the expression components smile"):
        bpy.ops.portrait_rig.expression_preset(preset='SMILE')


def test_sidebar_and_preferences_draw(extension, demo_npz):
    """Every panel draws with real properties, operators and icons, before and after a rig
    exists; the preferences show what the chosen options need."""
    panel = extension.module("blender_rig.panel")
    operators = extension.module("blender_rig.operators")
    prefs = extension.preferences
    for cls in panel.CLASSES:
        assert cls.bl_category == "Portrait Rig" and cls.bl_region_type == 'UI'
    main, connection, live, appearance, expression = panel.CLASSES
    assert "Add Portrait Rig" in draw(main)
    assert "Disconnected: 127.0.0.1:7865" in draw(connection)
    assert draw(appearance) is None and draw(expression) is None      # no rig yet

    prefs.face_source, prefs.face_file = 'FILE', str(demo_npz)
    bpy.ops.portrait_rig.add_rig()
    assert "Live Rig" in draw(live)
    assert {"Truncation", "Latent File", "Reference Photo", "Personal Model"} <= set(draw(appearance))
    shown = draw(expression)
    assert {"Neutral", "Smile", "Surprise", "Sad", "Angry", "Wink", "Blink"} <= set(shown)

    texts = []
    operators.draw_add_menu(type("Menu", (), {"layout": RecordingLayout(texts)})(), None)
    assert texts == ["Add Portrait Rig"]

    prefs_class = type(prefs)
    shown = draw(prefs_class, data=prefs)
    assert {"Host", "Port", "Token", "Model File", "Identity Keys"} <= set(shown)
    prefs.face_source = 'SERVER'
    prefs.server_host = "render.example.com"
    shown = draw(prefs_class, data=prefs)
    assert "Model File" not in shown
    assert any("Online access is disabled" in text for text in shown)


def _fcurves(action):
    """F-curves of an action, layered (Blender 4.4+) or legacy."""
    if hasattr(action, "layers") and action.layers:
        for layer in action.layers:
            for strip in layer.strips:
                for bag in strip.channelbags:
                    yield from bag.fcurves
    else:
        yield from action.fcurves
