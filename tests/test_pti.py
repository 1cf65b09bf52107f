"""Pivotal tuning end to end on a tiny generator: a real photo, a real kill and resume, the
personal model written atomically and rendered by the stylerig backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from tests.support.server_process import REPO  # noqa: E402

pytestmark = [pytest.mark.training, pytest.mark.slow]
GENERATOR = REPO / "tests" / "data" / "stylegan2_tiny.safetensors"


def pti(home, photo, *extra) -> subprocess.Popen:
    env = {**os.environ, "PORTRAIT_RIG_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "server.training.pti", "--photo", str(photo),
                             "--name", "astro", "--generator", str(GENERATOR),
                             "--pivot-steps", "6", "--steps", "12", "--save-every", "4",
                             *extra], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_pti_resumes_after_a_kill_and_improves_the_reconstruction(tmp_path):
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    home = tmp_path / "home"
    out = home / "personal" / "astro"

    first = pti(home, photo)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        lines = (out / "pti_log.jsonl").read_text().splitlines() \
            if (out / "pti_log.jsonl").is_file() else []
        if len(lines) >= 5:                      # the state of step 4 is on disk
            break
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / "pti_state.pt").is_file()
    assert not (out / "generator.safetensors").exists()     # nothing half-written is visible
    saved = torch.load(out / "pti_state.pt", weights_only=True)["step"]
    assert saved in (4, 8)

    second = pti(home, photo)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    assert "resuming" in stderr and f"at step {saved}" in stderr
    record = json.loads((out / "pti.json").read_text())
    assert record["tuning_steps"] == 12
    before, after = record["before"], record["after"]
    assert after["psnr"] > before["psnr"] + 0.1
    assert after["identity_distance"] < before["identity_distance"]
    assert "PSNR" in stdout and not (out / "pti_state.pt").exists()
    steps = [json.loads(line)["step"] for line in (out / "pti_log.jsonl").read_text().splitlines()]
    assert steps[-1] == 12 and steps.count(saved + 1) >= 1
    assert Image.open(out / "preview.png").size == (3 * 256, 256)

    # the stylerig backend renders the personal model with its pivot
    from portrait_rig.params import Appearance, RigParams
    from server.backends import create_backend
    from server.backends.base import RenderRequest
    from server.checkpoints.stylegan import load_generator
    from server.renderer.face_model import FaceModel
    from tests.support.synthetic_face import synthetic_face

    from server import paths

    os.environ["PORTRAIT_RIG_HOME"] = str(home)
    paths.allow_folders([str(out)])               # the pivot, named as a latent file below
    try:
        backend = create_backend("stylerig", FaceModel(synthetic_face()), "cpu",
                                 generator=str(GENERATOR), rignet="none", framing="rig")
        params = RigParams(appearance=Appearance(personal_model="astro"))
        frame = backend.render([RenderRequest(params, 32, 32)])[0].image
        base = backend.render([RenderRequest(RigParams(appearance=Appearance(
            latent_file=str(out / "pivot.npz"))), 32, 32)])[0].image
    finally:
        del os.environ["PORTRAIT_RIG_HOME"]
        paths.allow_folders(())
    tuned = load_generator(out / "generator.safetensors")
    pivot = torch.from_numpy(np.load(out / "pivot.npz")["w"])[None]
    with torch.no_grad():
        expected = tuned.synthesis(pivot, noise_mode="const")
    expected = (expected[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(frame[..., :3].astype(int) - expected).max() <= 1
    assert np.abs(frame[..., :3].astype(int) - base[..., :3]).max() > 2   # not the base G
