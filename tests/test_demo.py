"""``portrait-rig demo`` end to end (its own server subprocess, headless Blender), the .blend it
saves, and the extension loader it shares with the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.support.blender_env import (REPO_ROOT, blender, bpy, extension,  # noqa: F401
                                       extension_repository, render_server)

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.blender

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def portrait_rig(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "portrait_rig_cli", *args], cwd=REPO_ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run = portrait_rig("demo", "--frames", "6", "--size", "128", "--out", str(out),
                       "--sheet", str(out / "docs" / "sheet.png"))
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_demo_renders_frames_sheet_video_and_blend(demo_run):
    out, run = demo_run
    frames = [out / "frames" / f"frame_{f:04d}.png" for f in range(1, 7)]
    assert all(path.is_file() for path in frames)
    images = [rgb(path) for path in frames]
    assert all(image.shape == (128, 128, 3) for image in images)
    for a, b in zip(images, images[1:]):
        assert np.abs(a - b).max() > 20                   # the performance moves
    assert "rendered 6 frames" in run.stdout

    sheet = rgb(out / "contact_sheet.png")              # 6 frames, 4 columns, 4 px gaps
    assert sheet.shape == (2 * 132 + 4, 4 * 132 + 4, 3)
    np.testing.assert_array_equal(sheet[4:132, 4:132], images[0])
    np.testing.assert_array_equal(sheet[136:264, 136:264], images[5])
    assert (out / "docs" / "sheet.png").read_bytes() == (out / "contact_sheet.png").read_bytes()
    if "skipped" not in run.stdout:
        assert (out / "demo.mp4").stat().st_size > 1000
    assert (out / "demo.blend").is_file()


def test_the_saved_blend_renders_the_same_frames(demo_run, extension, render_server, tmp_path):
    """What `blender -b demo.blend -a` does for a user, with this session's server."""
    out, _ = demo_run
    bpy.ops.wm.open_mainfile(filepath=str(out / "demo.blend"))
    prefs = extension.preferences
    prefs.server_host, prefs.server_port = render_server.host, render_server.port
    scene = bpy.context.scene
    assert scene.render.engine == 'PORTRAIT_RIG'
    scene.frame_start, scene.frame_end = 4, 5
    scene.render.filepath = str(tmp_path / "again_")
    bpy.ops.render.render(animation=True)
    for frame in (4, 5):
        again, first = rgb(tmp_path / f"again_{frame:04d}.png"), rgb(out / "frames" /
                                                                     f"frame_{frame:04d}.png")
        # The same frame up to float rounding of a re-evaluated scene (an edge pixel or two).
        assert np.abs(again - first).max() <= 2
        assert (again != first).any(axis=-1).mean() < 1e-3


def test_demo_without_a_server_exits_non_zero(tmp_path):
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = portrait_rig("demo", "--frames", "2", "--size", "32", "--out", str(tmp_path),
                       "--server", f"127.0.0.1:{port}", timeout=120)
    assert run.returncode == 1
    assert f"127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr


LOAD_INSTALLED = """
import sys, tempfile
from pathlib import Path
import bpy
from portrait_rig_cli import extension
root = extension.source_root()
assert root == Path(sys.argv[1]).resolve(), root
package = extension.enable(Path(tempfile.mkdtemp()), "installed")
assert package.__name__ == "bl_ext.installed.portrait_rig"
assert hasattr(bpy.types.Scene, "portrait_rig_render")
engines = bpy.types.RenderEngine.__subclasses__()
assert any(getattr(e, "bl_idname", "") == "PORTRAIT_RIG" for e in engines)
print("ok")
"""


def test_the_loader_assembles_the_extension_from_installed_packages(tmp_path):
    """A regular install has blender_rig and portrait_rig in site-packages but no extension
    root (entry __init__.py, manifest): the loader builds one from links to them."""
    site = tmp_path / "site-packages"
    for package in ("blender_rig", "portrait_rig", "portrait_rig_cli"):
        shutil.copytree(REPO_ROOT / package, site / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_INSTALLED), str(site)],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
