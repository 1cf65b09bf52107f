"""The Portrait Rig render engine on headless Blender (``bpy``) against the real render server:
animation renders, passes, colour, cancel, a dead or frozen server, resuming, shots."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.support.blender_env import (REPO_ROOT, blender, bpy, draw, extension,  # noqa: F401
                                       extension_repository, render_server)
from portrait_rig.client import Client
from portrait_rig.face_source import load_face_data
from tests.support.server_process import ServerProcess

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def face():
    return load_face_data("demo")           # the server's model ("--model demo")


def demo(extension, face, server, out: Path, frames: int = 4, size: int = 48):
    """The demo performance rendering to ``out``/frame_####.png through ``server``."""
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = server.host, server.port
    extension.module("blender_rig.demo_scene").build_demo_scene(
        bpy.context, face, frames=frames, size=size, output=str(out / "frame_"))
    return bpy.context.scene


def summary(extension) -> dict:
    return extension.module("blender_rig.sequence").last_summary()


def frame_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("frame_*.png"))


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def server_frame(server, spec, passes=()) -> tuple[np.ndarray, dict]:
    """The server's own rgb8 frame (rows top to bottom) and passes for a RenderSpec."""
    with Client(server.host, server.port, timeout=30) as client:
        frame = client.render(spec.params, spec.width, spec.height, format="rgb8",
                              passes=passes)
    rgb = np.frombuffer(frame.pixels, np.uint8).reshape(spec.height, spec.width, 3)
    extra = {name: np.frombuffer(data, np.float32).reshape(spec.height, spec.width, channels)
             for name, (channels, data) in frame.passes.items()}
    return rgb.astype(int), extra


def current_spec(extension, scene):
    sequence = extension.module("blender_rig.sequence")
    layer = scene.view_layers[0]
    return sequence.read_spec(scene, layer.depsgraph, layer)


# ------------------------------------------------------------------------------ interface

def test_engine_settings_panels_and_blenders_own_panels(extension):
    from bl_ui.properties_data_mesh import DATA_PT_shape_keys
    from bl_ui.properties_output import RENDER_PT_format

    engine_module = extension.module("blender_rig.render_engine")
    scene = bpy.context.scene
    assert draw(engine_module.RENDER_PT_portrait_rig) is None      # another engine is active
    scene.render.engine = 'PORTRAIT_RIG'
    shown = draw(engine_module.RENDER_PT_portrait_rig)
    assert {"Noise Seed", "Smooth Latents", "Frames Ahead", "Timeout"} <= set(shown)
    assert any("view transform 'AgX'" in text for text in shown)     # Blender's default
    scene.view_settings.view_transform = 'Standard'
    assert not any("view transform" in text
                   for text in draw(engine_module.RENDER_PT_portrait_rig))
    assert draw(engine_module.VIEWLAYER_PT_portrait_rig_passes) == [
        "Normal", "Albedo", "Shading", "Mask"]
    # Output, format, colour management, shape keys ... stay visible with this engine.
    assert 'PORTRAIT_RIG' in RENDER_PT_format.COMPAT_ENGINES
    assert 'PORTRAIT_RIG' in DATA_PT_shape_keys.COMPAT_ENGINES
    extension.module("blender_rig.render_engine").unregister()
    try:
        assert 'PORTRAIT_RIG' not in DATA_PT_shape_keys.COMPAT_ENGINES
    finally:
        extension.module("blender_rig.render_engine").register()


# ------------------------------------------------------------------------------ sequences

@pytest.mark.parametrize("persistent_data", [False, True])
def test_animation_is_rendered_through_the_server_with_requests_sent_ahead(
        extension, face, render_server, tmp_path, persistent_data):
    scene = demo(extension, face, render_server, tmp_path, frames=5)
    scene.render.use_persistent_data = persistent_data     # engine and depsgraph kept or not
    bpy.ops.render.render(animation=True)
    assert frame_files(tmp_path) == [f"frame_{f:04d}.png" for f in range(1, 6)]
    frames = [png(tmp_path / f"frame_{f:04d}.png") for f in range(1, 6)]
    for a, b in zip(frames, frames[1:]):
        assert np.abs(a - b).max() > 20                  # the performance moves every frame
    info = summary(extension)
    assert (info["frames"], info["requests"], info["failure"]) == (5, 5, None)
    # Frame 1 is requested on its own (a single frame might follow); from frame 2 on every
    # request was sent ahead from the main-thread read-ahead, and the render depsgraph gave
    # exactly the same parameters (otherwise they would be sent again).
    assert info["read_ahead"] and info["prefetch_hits"] == 4
    assert scene.frame_current == 1                      # read-ahead put the frame back


def test_renders_on_a_render_thread_ask_frame_by_frame(extension, face, render_server,
                                                      tmp_path, monkeypatch):
    """F12 / Ctrl+F12 in the user interface run handlers on a render thread, where
    frame_set is not allowed: every frame is then requested inside render()."""
    demo(extension, face, render_server, tmp_path, frames=4)
    sequence = extension.module("blender_rig.sequence")
    monkeypatch.setattr(sequence.threading, "main_thread", lambda: None)
    bpy.ops.render.render(animation=True)
    info = summary(extension)
    assert not info["read_ahead"] and info["prefetch_hits"] == 0
    assert info["requests"] == info["frames"] == 4 and len(frame_files(tmp_path)) == 4


def test_the_server_batches_pipelined_requests(extension, face, render_server, tmp_path):
    scene = demo(extension, face, render_server, tmp_path, frames=9, size=96)
    sequence = extension.module("blender_rig.sequence")
    spec = current_spec(extension, scene)
    pipeline = sequence.Pipeline(render_server.host, render_server.port, timeout=30)
    try:
        for frame in range(1, 9):
            pipeline.submit(sequence.RenderSpec(frame, spec.params, 96, 96, None, "rgb8", (),
                                                dict(spec.shot, frame=frame)))
        for frame in range(1, 9):
            reply = pipeline.wait(frame, lambda: False)
            assert reply.width == 96
    finally:
        pipeline.close()
    assert max(s.batch_size for s in pipeline.stats) >= 2


def test_a_single_frame_render_sends_nothing_ahead(extension, face, render_server, tmp_path):
    scene = demo(extension, face, render_server, tmp_path, frames=6)
    scene.frame_set(3)
    scene.render.filepath = str(tmp_path / "still.png")
    bpy.ops.render.render(write_still=True)
    assert (tmp_path / "still.png").is_file()
    assert summary(extension)["requests"] == 1


def test_resume_renders_only_the_missing_frames(extension, face, render_server, tmp_path):
    scene = demo(extension, face, render_server, tmp_path, frames=6)
    bpy.ops.render.render(animation=True)
    kept = {f: (tmp_path / f"frame_{f:04d}.png").stat().st_mtime_ns for f in (1, 3, 4, 6)}
    before = {f: png(tmp_path / f"frame_{f:04d}.png") for f in (2, 5)}
    for f in (2, 5):
        (tmp_path / f"frame_{f:04d}.png").unlink()
    scene.render.use_overwrite = False
    bpy.ops.render.render(animation=True)
    info = summary(extension)
    assert info["requests"] == 2 and info["frames"] == 2      # nothing sent for existing files
    assert len(frame_files(tmp_path)) == 6
    assert {f: (tmp_path / f"frame_{f:04d}.png").stat().st_mtime_ns for f in kept} == kept
    for f in (2, 5):
        assert np.array_equal(png(tmp_path / f"frame_{f:04d}.png"), before[f])


def test_smoothing_requests_carry_the_shot_and_its_neighbours(extension, face, render_server,
                                                              tmp_path, monkeypatch):
    scene = demo(extension, face, render_server, tmp_path, frames=5)
    scene.portrait_rig_render.smooth = True
    scene.portrait_rig_render.seed = 1234
    sequence = extension.module("blender_rig.sequence")
    sent = []
    submit = sequence.Pipeline.submit
    monkeypatch.setattr(sequence.Pipeline, "submit",
                        lambda self, spec, neighbors=(): sent.append((spec, neighbors))
                        or submit(self, spec, neighbors))
    bpy.ops.render.render(animation=True)                # the server accepts the shots
    assert [spec.frame for spec, _ in sent] == [1, 2, 3, 4, 5]
    params = {spec.frame: spec.params.to_dict() for spec, _ in sent}
    for spec, neighbors in sent:
        assert spec.shot == {"id": f"{scene.name}/Camera", "seed": 1234, "frame": spec.frame,
                             "smooth": True}
        expected = [f for f in range(spec.frame - 2, spec.frame + 3)
                    if 1 <= f <= 5 and f != spec.frame]
        assert [n["frame"] for n in neighbors] == expected   # frame 1 too: read ahead
        assert all(n["params"] == params[n["frame"]] for n in neighbors)


# ------------------------------------------------------------------------------ pixels

def test_png_holds_the_servers_srgb_values(extension, face, render_server, tmp_path):
    scene = demo(extension, face, render_server, tmp_path, frames=3, size=64)
    scene.frame_set(2)
    # The file's working colour space (choosable from Blender 5.0 on).
    spaces = ("Linear Rec.709", "ACEScg") if hasattr(bpy.data, "colorspace") else ()
    for space in spaces or ("Linear Rec.709",):
        if spaces and bpy.data.colorspace.working_space != space:
            bpy.ops.wm.set_working_color_space(working_space=space)
            assert bpy.data.colorspace.working_space == space
        expected, _ = server_frame(render_server, current_spec(extension, scene))
        scene.render.filepath = str(tmp_path / f"{space}.png")
        bpy.ops.render.render(write_still=True)
        written = png(tmp_path / f"{space}.png")
        assert np.abs(written - expected).max() <= 1, space
        assert np.abs(written - expected).mean() < 0.05


def read_exr(path: Path) -> dict[str, np.ndarray]:
    """Channels of an uncompressed scanline OpenEXR, single- or multi-part (Blender writes
    multilayer files as one part per pass), FLOAT or HALF, as [height, width] arrays with
    rows top to bottom."""
    data = path.read_bytes()
    assert data[:4] == b"\x76\x2f\x31\x01"
    multipart = bool(struct.unpack_from("<I", data, 4)[0] & 0x1000)
    pos, parts = 8, []
    while True:                                   # headers: attributes, a 0 byte after each
        header = {}
        while data[pos] != 0:
            name_end = data.index(b"\0", pos)
            type_end = data.index(b"\0", name_end + 1)
            (size,) = struct.unpack_from("<i", data, type_end + 1)
            header[data[pos:name_end].decode()] = data[type_end + 5: type_end + 5 + size]
            pos = type_end + 5 + size
        pos += 1
        parts.append(header)
        if not multipart or data[pos] == 0:
            pos += multipart                          # the empty header ending the list
            break
    layouts = []
    for header in parts:
        assert header["compression"][0] == 0, "expected an uncompressed file"
        raw, channels, i = header["channels"], [], 0
        while raw[i] != 0:
            end = raw.index(b"\0", i)
            (pixel_type,) = struct.unpack_from("<i", raw, end + 1)
            channels.append((raw[i:end].decode(), {1: "<f2", 2: "<f4"}[pixel_type]))
            i = end + 17
        x0, y0, x1, y1 = struct.unpack("<4i", header["dataWindow"])
        layouts.append((channels, x1 - x0 + 1, y1 - y0 + 1, y0))
    out = {}
    for channels, width, height, y0 in layouts:   # offset tables follow, one per part
        offsets = struct.unpack_from(f"<{height}Q", data, pos)
        pos += 8 * height
        arrays = {name: np.empty((height, width), np.float32) for name, _ in channels}
        for offset in offsets:
            cursor = offset + 4 * multipart           # multi-part chunks start with the part
            y, _size = struct.unpack_from("<ii", data, cursor)
            cursor += 8
            for name, dtype in channels:
                row = np.frombuffer(data, dtype, width, cursor)
                arrays[name][y - y0] = row
                cursor += row.nbytes
        out.update(arrays)
    return out


def test_passes_reach_the_compositor_and_multilayer_files(extension, face, render_server,
                                                          tmp_path):
    scene = demo(extension, face, render_server, tmp_path, frames=3, size=64)
    layer = scene.view_layers[0]
    passes = layer.portrait_rig_passes
    passes.use_pass_normal = passes.use_pass_albedo = True
    passes.use_pass_shading = passes.use_pass_mask = True
    settings = scene.render.image_settings
    if "media_type" in settings.bl_rna.properties:        # Blender 5.0 groups formats
        settings.media_type = 'MULTI_LAYER_IMAGE'
    settings.file_format = 'OPEN_EXR_MULTILAYER'
    settings.color_depth = '32'
    settings.exr_codec = 'NONE'
    scene.frame_set(2)
    scene.render.filepath = str(tmp_path / "passes.exr")
    bpy.ops.render.render(write_still=True)

    channels = read_exr(tmp_path / "passes.exr")
    prefix = f"{layer.name}."
    names = {name[len(prefix):] for name in channels if name.startswith(prefix)}
    assert {"Combined.R", "Combined.A", "Normal.X", "Normal.Z", "Albedo.G", "Shading.B",
            "Mask.X"} <= names

    spec = current_spec(extension, scene)
    rgb, server_passes = server_frame(render_server, spec, ("normal", "albedo", "mask"))
    mask = server_passes["mask"][..., 0]
    assert 0.1 < mask.mean() < 0.9
    np.testing.assert_allclose(channels[prefix + "Mask.X"], mask, atol=1e-6)
    np.testing.assert_allclose(channels[prefix + "Albedo.R"], server_passes["albedo"][..., 0],
                               atol=1e-6)
    # Combined is scene-linear: the server's sRGB decoded.
    srgb = rgb / 255
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(channels[prefix + "Combined.G"], linear[..., 1], atol=1e-6)
    # Normals in world space: the camera looks along +Y, so a face seen head-on points to -Y.
    camera = np.array(scene.camera.matrix_world, dtype=np.float64)[:3, :3]
    world = server_passes["normal"] @ camera.T
    for axis in "XYZ":
        np.testing.assert_allclose(channels[prefix + f"Normal.{axis}"],
                                   world[..., "XYZ".index(axis)], atol=1e-5)
    centre = [channels[prefix + f"Normal.{a}"][32, 32] for a in "XYZ"]
    assert centre[1] < -0.8


# ------------------------------------------------------------------------------ failures

def test_cancel_stops_the_sequence_without_writing_the_frame(extension, face, render_server,
                                                             tmp_path, monkeypatch):
    scene = demo(extension, face, render_server, tmp_path, frames=6)
    engine = extension.module("blender_rig.render_engine").PortraitRigRenderEngine
    # Esc pressed during frame 3 (test_break itself is an RNA function, which Python
    # attributes cannot shadow; the engine asks it through should_stop).
    monkeypatch.setattr(engine, "should_stop", lambda self: bpy.context.scene.frame_current >= 3)
    with pytest.raises(RuntimeError, match="cancelled at frame 3"):
        bpy.ops.render.render(animation=True)
    assert frame_files(tmp_path) == ["frame_0001.png", "frame_0002.png"]
    assert summary(extension)["cancelled"]
    assert scene.frame_current == 1


def test_a_server_killed_mid_sequence_fails_without_a_file(extension, face, tmp_path):
    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet") as server:
        demo(extension, face, server, tmp_path, frames=5)

        def kill(scene, *_):
            if scene.frame_current == 2 and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
        bpy.app.handlers.render_pre.insert(0, kill)      # before the engine's read-ahead
        try:
            with pytest.raises(RuntimeError, match="render server at"):
                bpy.ops.render.render(animation=True)
        finally:
            bpy.app.handlers.render_pre.remove(kill)
    assert frame_files(tmp_path) == ["frame_0001.png"]
    assert png(tmp_path / "frame_0001.png").std() > 10      # a real frame, not a blank one
    assert "frame 2" in summary(extension)["failure"]


def test_a_frozen_server_times_out_instead_of_hanging(extension, face, render_server,
                                                      tmp_path):
    scene = demo(extension, face, render_server, tmp_path, frames=4)
    scene.portrait_rig_render.timeout = 1.0

    def freeze(scene, *_):
        if scene.frame_current == 2:
            render_server.proc.send_signal(signal.SIGSTOP)
    bpy.app.handlers.render_pre.insert(0, freeze)
    try:
        with pytest.raises(RuntimeError, match="no reply from the render server"):
            bpy.ops.render.render(animation=True)
    finally:
        bpy.app.handlers.render_pre.remove(freeze)
        render_server.proc.send_signal(signal.SIGCONT)   # the shared server carries on
    assert frame_files(tmp_path) == ["frame_0001.png"]


SCRIPT = """
import importlib, sys, tempfile
from pathlib import Path
import bpy
from portrait_rig_cli import extension
from portrait_rig.face_source import load_face_data
bpy.ops.wm.read_factory_settings(use_empty=True)
package = extension.enable(Path(tempfile.mkdtemp()), "portrait_rig_script")
prefs = bpy.context.preferences.addons[package.__name__].preferences
prefs.server_port = int(sys.argv[1])
demo = importlib.import_module(package.__name__ + ".blender_rig.demo_scene")
demo.build_demo_scene(bpy.context, load_face_data("demo"), frames=3, size=32,
                      output=sys.argv[2] + "/frame_")
try:
    bpy.ops.render.render(animation=True)
except RuntimeError as exc:
    print(exc, file=sys.stderr)
    sys.exit(extension.exit_status(3))
"""


def free_port() -> int:
    import socket
    with socket.socket() as probe:                       # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_a_script_render_without_a_server_raises_and_writes_nothing(tmp_path):
    """A script's bpy.ops.render.render gets the failure as an exception (and decides the
    exit status itself); the engine's handlers fail nowhere on the way, on every version."""
    port = free_port()
    run = run_script(SCRIPT, port, tmp_path)
    assert run.returncode == 3, run.stderr
    assert f"no render server at 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr                 # no handler raised (4.2: no
    assert not list(tmp_path.glob("frame_*"))            # bpy.app.module)


CLI_RENDER = """
import atexit, importlib, tempfile
from pathlib import Path
import bpy
from portrait_rig_cli import extension
bpy.ops.wm.read_factory_settings(use_empty=True)
package = extension.enable(Path(tempfile.mkdtemp()), "portrait_rig_script")
sequence = importlib.import_module(package.__name__ + ".blender_rig.sequence")
compat = importlib.import_module(package.__name__ + ".blender_rig.compat")
compat.is_module = lambda: False                # the Blender application, not the module
scene = bpy.context.scene
scene.render.engine = "PORTRAIT_RIG"
sequence.on_render_init(scene)
sequence.job_for(scene).failure = "frame 1: no render server at 127.0.0.1:9"
# After `blender -b scene.blend -a` Blender calls render_cancel from C, with no Python code
# waiting for the render: atexit calls the handler the same way.
atexit.register(sequence.on_render_end, scene)
print("rendering", flush=True)
"""


def test_a_failed_command_line_render_exits_with_status_1():
    """``blender -b scene.blend -a`` ends with status 1 after a failed frame (Blender itself
    would exit 0): the render_cancel handler, called with no Python caller, ends the process."""
    run = run_script(CLI_RENDER)
    assert "rendering" in run.stdout
    assert run.returncode == 1, run.stderr
    assert "Portrait Rig: render failed: frame 1: no render server" in run.stderr
    assert "Traceback" not in run.stderr
