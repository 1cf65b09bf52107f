"""The Flamenco job type's Python, run in real Blender: the expression each render task gives
Blender after loading the file points the enabled extension at the job's server."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support.blender_env import (REPO_ROOT, blender, bpy, extension,  # noqa: F401
                                       extension_repository)

pytestmark = pytest.mark.blender

COMPILE = """
const { loadJobType } = require(process.argv[1] + "/farm/flamenco/test/flamenco_api.js");
const job = loadJobType(process.argv[1] + "/farm/flamenco/portrait_rig_render.js").submit({
    frames: "1-3", server: "render-head.studio:7001", render_output_root: "/r",
    render_output_path: "/r/######", blendfile: "/p/a.blend", render_engine: "PORTRAIT_RIG",
    fps: 24, format: "PNG", image_file_extension: ".png"});
const args = job.tasks[0].commands[0].parameters.args;
console.log(JSON.stringify(args[args.indexOf("--python-expr") + 1]));
"""


@pytest.fixture(scope="module")
def expression() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js")
    out = subprocess.run([node, "-e", COMPILE, str(REPO_ROOT)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_the_render_tasks_expression_sets_the_server(extension, expression, monkeypatch):
    monkeypatch.setenv("PORTRAIT_RIG_TOKEN", "s3cret")
    exec(compile(expression, "<python-expr>", "exec"), {})
    prefs = extension.preferences
    assert prefs.server_address() == ("render-head.studio", 7001)
    assert prefs.token == "s3cret"


def test_without_the_extension_it_stops_blender(blender, expression):
    with pytest.raises(RuntimeError, match="Portrait Rig extension is not enabled"):
        exec(compile(expression, "<python-expr>", "exec"), {})
