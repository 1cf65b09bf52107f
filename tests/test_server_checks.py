"""What the server tells users at start and from ``--check``: every backend's state, the files
it looked for, what they are, and what to do (``server.backends.check``, ``server.cli``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from portrait_rig.client import Client
from server.backends.check import check_backend
from server.checkpoints.identify import identify
from tests.support.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def run_server(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PORTRAIT_RIG_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A model folder with a misplaced file (a DiffusionRig checkpoint where the StyleGAN
    generator belongs) and a wrong-kind texture."""
    (tmp_path / "stylegan").mkdir()
    torch.save({"denoisingUNet.input_blocks.0.0.weight": torch.zeros(2)},
               tmp_path / "stylegan" / "generator.pt")
    (tmp_path / "flame").mkdir()
    (tmp_path / "flame" / "FLAME_texture.npz").write_bytes(b"not a texture at all")
    monkeypatch.setenv("PORTRAIT_RIG_HOME", str(tmp_path))
    return tmp_path


def test_files_are_identified_by_what_they_are(home):
    assert identify(home / "stylegan" / "generator.pt") == "diffusionrig"
    state = check_backend("stylerig", {})
    assert state.state == "unavailable"
    assert "is a DiffusionRig checkpoint, not a StyleGAN generator" in state.reason
    assert "$PORTRAIT_RIG_HOME/stylegan/generator.pt" in state.reason
    texture = check_backend("diffusionrig", {}).files[1]
    assert "not a FLAME texture space" in texture.problem
    assert "diffusionrig.texture=none" in texture.problem        # how to run without it


def test_options_are_validated_before_anything_runs(home):
    assert "unknown stylerig option(s): foo" in check_backend("stylerig", {"foo": "1"}).reason
    bad = check_backend("diffusionrig", {"sampler": "euler"})
    assert bad.state == "unavailable"
    assert ("diffusionrig.sampler: expected one of ddim, dpm++, distilled, got 'euler'"
            in bad.reason)
    for args in (["--option", "stylerig.foo=1"], ["--option", "diffusionrig.sampler=euler"],
                 ["--option", "nope.x=1"]):
        started = run_server("--port", "0", *args, home=home)
        assert started.returncode == 1 and "cannot start" in started.stderr, args
        assert "Traceback" not in started.stderr


def test_check_lists_what_works_and_what_to_do(home):
    result = run_server("--check", home=home)
    assert result.returncode == 0, result.stdout + result.stderr       # preview can run
    out = result.stdout
    assert "preview (chosen with --backend): ready" in out
    assert "stylerig: unavailable" in out and "WRONG KIND" in out
    assert "diffusionrig: unavailable" in out
    assert "DiffusionRig stage-1 checkpoint: $PORTRAIT_RIG_HOME/diffusionrig/model.pt: missing" \
        in out
    assert "adobe-research/diffusion-rig" in out                        # where to get it
    assert "backend 'preview' can run" in out
    refused = run_server("--check", "--backend", "diffusionrig", home=home)
    assert refused.returncode == 1 and "backend 'diffusionrig' cannot run" in refused.stdout
    no_cuda = run_server("--check", "--device", "cuda", home=home)
    if not torch.cuda.is_available():
        assert no_cuda.returncode == 1 and "torch sees no CUDA device" in no_cuda.stdout


def test_help_names_every_backend_and_option(home):
    out = run_server("--help", home=home).stdout
    for name in ("preview.background", "stylerig.generator", "stylerig.rignet",
                 "diffusionrig.sampler", "diffusionrig.steps", "diffusionrig.texture"):
        assert name in out


def test_hello_carries_each_backends_state(home):
    with ServerProcess("--model", "demo", env={"PORTRAIT_RIG_HOME": str(home)}) as proc:
        with Client(proc.host, proc.port, timeout=60.0) as client:
            states = {b["name"]: b for b in client.hello["backends"]}
        log = proc.log()
    assert states["preview"]["state"] == "ready" and "reason" not in states["preview"]
    assert states["stylerig"]["state"] == "unavailable"
    assert "not a StyleGAN generator" in states["stylerig"]["reason"]
    assert "backend stylerig: unavailable: " in log
