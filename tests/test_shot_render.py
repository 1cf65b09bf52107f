"""Shot files and ``portrait-rig render``: the format's validation, every frame written once and
equal to the server's, passes as EXR and PNG, resuming, ``--overwrite``, refused frames, a
killed render leaving whole frames only."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from portrait_rig.client import Client
from portrait_rig.params import RigParams
from portrait_rig.shot_file import ShotFile, ShotFileError, ShotFrame
from portrait_rig_cli import cli
from portrait_rig_cli.render import parse_frames
from tests.support.server_process import REPO, ServerProcess

Image = pytest.importorskip("PIL.Image")
OpenEXR = pytest.importorskip("OpenEXR")

SIZE = 48


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", "demo", "--backend", "preview", "--quiet") as proc:
        yield proc


def take(count: int, start: int = 1, passes=(), image="rgb8", smooth=False) -> ShotFile:
    """A head turning and smiling over ``count`` frames (two shots: a cut half-way)."""
    frames = []
    for i in range(count):
        t = i / max(count - 1, 1)
        params = RigParams.from_dict({"pose": {"global": [0.0, 0.6 * math.sin(6 * t), 0.0],
                                               "jaw": [0.2 * t, 0.0, 0.0]},
                                      "expression": [1.5 * t, -t]})
        frames.append(ShotFrame(start + i, "Take/A" if i < count // 2 else "Take/B", params))
    return ShotFile(width=SIZE, height=SIZE, frames=frames, scene="Take", backend="preview",
                    image=image, passes=tuple(passes), seed=3, smooth=smooth)


def render(shot_path, out, server, *extra) -> int:
    return cli.main(["render", str(shot_path), "--out", str(out), "--server",
                     f"{server.host}:{server.port}", "--no-video", *extra])


def server_frame(server, shot: ShotFile, index: int, passes=()):
    with Client(server.host, server.port, timeout=30) as client:
        return client.render(shot.frames[index].params, shot.width, shot.height,
                             backend=shot.backend, format=shot.image, passes=passes,
                             shot=shot.shot_request(index))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# ------------------------------------------------------------------------------ the format

def test_shot_file_round_trip_and_errors_name_the_field(tmp_path):
    shot = take(6, passes=("normal", "mask"), smooth=True)
    shot.save(tmp_path / "s.json")
    again = ShotFile.load(tmp_path / "s.json")
    assert again.to_dict() == shot.to_dict()
    assert [f.frame for f in again.frames] == list(range(1, 7))

    def error(change) -> str:
        data = shot.to_dict()
        change(data)
        with pytest.raises(ShotFileError) as info:
            ShotFile.from_dict(data)
        return info.value.field

    assert error(lambda d: d.update(version=2)) == "version"
    assert error(lambda d: d.update(format="other")) == "format"
    assert error(lambda d: d.update(passes=["normal", "colour"])) == "passes"
    assert error(lambda d: d.update(width=0)) == "width"
    assert error(lambda d: d["frames"][3].update(frame=1)) == "frames[3].frame"
    assert error(lambda d: d["frames"][2]["params"]["pose"].update(jaw=[0, 1])) \
        == "frames[2].params.pose.jaw"


def test_smoothing_windows_stay_inside_a_shot():
    shot = take(8, smooth=True)                      # frames 1-4 shot A, 5-8 shot B
    assert shot.window(0) == [1, 2]
    assert shot.window(2) == [0, 1, 3]               # frame 5 (index 4) is another shot
    assert shot.window(5) == [4, 6, 7]
    request = shot.shot_request(4)
    assert request["id"] == "Take/B" and request["seed"] == 3 and request["frame"] == 5
    assert [n["frame"] for n in request["neighbors"]] == [6, 7]
    assert "neighbors" not in take(8).shot_request(4)


def test_frame_lists():
    assert parse_frames("1-3,7,10..11") == {1, 2, 3, 7, 10, 11}
    assert parse_frames("-2..1") == {-2, -1, 0, 1}
    with pytest.raises(ValueError):
        parse_frames("5-3")


# ------------------------------------------------------------------------------ rendering

def test_every_frame_written_equal_to_the_servers_with_exr_passes(server, tmp_path):
    shot = take(10, passes=("normal", "mask", "depth"), image="rgba8", smooth=True)
    shot.save(tmp_path / "take.json")
    out = tmp_path / "out"
    assert render(tmp_path / "take.json", out, server) == 0

    names = sorted(p.name for p in out.glob("frame_*.png"))
    assert names == [f"frame_{f:04d}.png" for f in range(1, 11)]
    assert not list(out.rglob("*.part"))                 # no temporary file left
    assert (out / "contact_sheet.png").exists()
    for index in (0, 6):
        frame = server_frame(server, shot, index, passes=shot.passes)
        want = np.frombuffer(frame.pixels, np.uint8).reshape(SIZE, SIZE, 4)
        assert np.array_equal(pixels(out / f"frame_{index + 1:04d}.png"), want)
        with OpenEXR.File(str(out / "normal" / f"frame_{index + 1:04d}.exr"),
                          separate_channels=True) as exr:
            channels = exr.channels()
            normal = np.stack([channels[c].pixels for c in "XYZ"], axis=-1)
        _, floats = frame.passes["normal"]
        # Batches of different sizes reduce in another order: passes agree to 1e-5.
        want = np.frombuffer(floats, np.float32).reshape(SIZE, SIZE, 3)
        np.testing.assert_allclose(normal, want, atol=1e-5)
        assert np.abs(normal).max() > 0.5
    frames = [pixels(out / f"frame_{f:04d}.png") for f in range(1, 11)]
    assert all(np.abs(a.astype(int) - b).max() > 10 for a, b in zip(frames, frames[1:]))


def test_png_passes(server, tmp_path):
    shot = take(2, passes=("normal", "depth"))
    shot.save(tmp_path / "take.json")
    assert render(tmp_path / "take.json", tmp_path, server, "--passes-as", "png",
                  "--no-sheet") == 0
    frame = server_frame(server, shot, 1, passes=shot.passes)
    depth = np.frombuffer(frame.passes["depth"][1], np.float32).reshape(SIZE, SIZE)
    stored = pixels(tmp_path / "depth" / "frame_0002.png").astype(float)
    assert np.abs(stored - depth * 1000).max() <= 0.5 and depth.max() > 1.0   # millimetres
    normal = pixels(tmp_path / "normal" / "frame_0002.png")
    assert normal.shape == (SIZE, SIZE, 3) and normal.dtype == np.uint8


def test_resume_skips_done_frames_and_overwrite_renders_them_again(server, tmp_path):
    shot = take(6)
    shot.save(tmp_path / "take.json")
    out = tmp_path / "out"
    assert render(tmp_path / "take.json", out, server, "--frames", "1-4") == 0
    assert sorted(p.name for p in out.glob("frame_*.png")) == \
        [f"frame_{f:04d}.png" for f in range(1, 5)]
    assert not (out / "contact_sheet.png").exists()       # the shot is not complete yet

    marker = np.zeros((SIZE, SIZE, 3), np.uint8)          # stands for a frame done earlier
    Image.fromarray(marker).save(out / "frame_0002.png")
    (out / "frame_0003.png").unlink()
    assert render(tmp_path / "take.json", out, server) == 0
    assert np.array_equal(pixels(out / "frame_0002.png"), marker)     # skipped
    assert sorted(p.name for p in out.glob("frame_*.png")) == \
        [f"frame_{f:04d}.png" for f in range(1, 7)]
    assert (out / "contact_sheet.png").exists()

    assert render(tmp_path / "take.json", out, server, "--overwrite", "--frames", "2") == 0
    want = np.frombuffer(server_frame(server, shot, 1).pixels, np.uint8)
    assert np.array_equal(pixels(out / "frame_0002.png").ravel(), want)


def test_a_refused_frame_is_reported_and_the_others_are_written(server, tmp_path, capsys):
    shot = take(4)
    data = shot.to_dict()
    data["frames"][2]["params"]["shape"] = [0.1] * 390      # more than the demo head has
    (tmp_path / "take.json").write_text(json.dumps(data))
    assert render(tmp_path / "take.json", tmp_path / "out", server) == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("frame_*.png")) == \
        ["frame_0001.png", "frame_0002.png", "frame_0004.png"]
    assert "frame 3 not rendered: bad_params" in capsys.readouterr().err


def test_bad_shot_files_and_missing_backends_are_refused(server, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"format": "portrait-rig-shot", "version": 9}')
    assert render(tmp_path / "bad.json", tmp_path / "out", server) == 2
    assert "version 9" in capsys.readouterr().err
    shot = take(2)
    shot.backend = "nosuch"
    shot.save(tmp_path / "take.json")
    assert render(tmp_path / "take.json", tmp_path / "out", server) == 1
    assert "no 'nosuch' backend" in capsys.readouterr().err


def test_a_killed_render_leaves_whole_frames_and_resumes(server, tmp_path):
    shot = take(120)
    shot.save(tmp_path / "take.json")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "portrait_rig_cli", "render", str(tmp_path / "take.json"),
               "--out", str(out), "--server", f"{server.host}:{server.port}", "--no-video",
               "--ahead", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("frame_*.png"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(out.glob("frame_*.png"))
    assert 5 <= len(written) < 120
    for path in written:                          # every frame file decodes whole
        assert pixels(path).shape == (SIZE, SIZE, 3)
    assert render(tmp_path / "take.json", out, server) == 0
    assert len(list(out.glob("frame_*.png"))) == 120
