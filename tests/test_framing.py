"""Photoreal backends see the head FFHQ-aligned wherever the rig puts it, and the portrait is
placed back where the head is (``server.backends.framing``): the similarity algebra, the
diffusionrig backend end to end with a stand-in network that draws its conditioning, shot
smoothing of the framing, and StyleGAN2 placement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.support.diffusionrig_fixtures import write_checkpoint
from portrait_rig import sh
from portrait_rig.face_source import load_face_data
from portrait_rig.params import RigParams
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from server.backends.framing import HeadFramer, identity_framings, place
from server.backends.shots import Shot, smooth
from server.renderer import CameraBatch, project, screen_space, vertex_normals
from server.renderer.deca import DecaBufferRenderer
from server.renderer.face_model import FaceModel

pytestmark = pytest.mark.usefixtures("single_thread_module")

RESOLUTION = 128
W, H = 256, 192
AMBIENT = [[3.0, 3.0, 3.0]] + [[0.0] * 3] * 8        # no direction: rolls leave shading alone


@pytest.fixture(scope="module")
def demo():
    return FaceModel(load_face_data("demo"))


@pytest.fixture(scope="module")
def framer(demo):
    return HeadFramer(demo)            # the demo head's landmarks, found on a render of it


def head(x=0.0, y=0.0, roll=0.0, yaw=0.0, distance=1.8, light=AMBIENT, **fields) -> RigParams:
    """The demo head at (x, y) metres from the optical axis, ``distance`` from the camera."""
    pose = axis_angle_to_matrix([0.0, 0.0, roll]) @ axis_angle_to_matrix([0.0, yaw, 0.0])
    return RigParams.from_dict({
        "pose": {"global": matrix_to_axis_angle(pose).tolist(), "jaw": [0.1, 0.0, 0.0]},
        "translation": [x, y, 1.2 - distance], "lighting": {"sh": light}, **fields})


# ---------------------------------------------------------------------------- algebra

def test_reframed_codes_show_the_head_through_the_framing(demo, framer):
    renderer = DecaBufferRenderer(demo)
    params = head(0.03, -0.01, roll=0.2, yaw=0.3, light=np.random.default_rng(0).normal(
        size=(9, 3)).tolist(), expression=[1.0])
    params.pose.neck = [0.1, 0.2, 0.0]
    codes = renderer.codes([params], 80, 60)
    a, b = 0.7 * math.cos(0.4), 0.7 * math.sin(0.4)
    framing = np.array([[a, b, 0.1, -0.2]])
    aligned = framer.reframe(codes, framing)
    rig_ndc = project(renderer.vertices(codes), renderer.cameras(codes), 9, 9)[0][0].double()
    aligned_vertices = renderer.vertices(aligned)
    ndc = project(aligned_vertices, renderer.cameras(aligned), 9, 9)[0][0].double()
    M = torch.tensor([[a, -b], [b, a]], dtype=torch.float64)
    torch.testing.assert_close(ndc @ M.T + torch.tensor([0.1, -0.2], dtype=torch.float64),
                               rig_ndc, atol=2e-6, rtol=0)
    # Normals turn with the view, and the light with them: every surface keeps its shading.
    normals = vertex_normals(renderer.vertices(codes), renderer.renderer.triangles)[0].double()
    turned = vertex_normals(aligned_vertices, renderer.renderer.triangles)[0].double()
    roll = torch.from_numpy(axis_angle_to_matrix([0.0, 0.0, -0.4]))
    torch.testing.assert_close(turned, normals @ roll.T, atol=1e-4, rtol=0)
    np.testing.assert_allclose(sh.shade(turned.numpy(), aligned.light[0].double().numpy()),
                               sh.shade(normals.numpy(), codes.light[0].double().numpy()),
                               atol=5e-4)
    assert framer.reframe(codes, identity_framings(1)) is codes


def test_framings_follow_the_ffhq_recipe(framer):
    from server.photo.align import ffhq_square

    codes = framer.codes([head(0.02, 0.01, roll=0.3)], W, H)
    points = framer.landmarks(codes)[0]
    ffhq, centre, rig = (framer.framings(codes, mode)[0] for mode in ("ffhq", "centre", "rig"))
    c, x, y = ffhq_square(points * [1, -1])                 # image coordinates, y down
    # The aligned square's corners land on the FFHQ square's (y flipped back).
    M = np.array([[ffhq[0], -ffhq[1]], [ffhq[1], ffhq[0]]])
    for corner, expected in (((-1, 1), c - x - y), ((1, 1), c + x - y), ((1, -1), c + x + y)):
        np.testing.assert_allclose(M @ corner + ffhq[2:], expected * [1, -1], atol=1e-12)
    assert math.atan2(ffhq[1], ffhq[0]) == pytest.approx(0.3, abs=0.03)   # the head's roll
    np.testing.assert_allclose(centre, [1, 0, *ffhq[2:]])
    np.testing.assert_allclose(rig, [1, 0, 0, 0])


def test_place_draws_the_portrait_where_the_framing_says(demo):
    size = 32
    portrait = torch.zeros(1, 3, size, size)
    portrait[0, :, 4:12, 20:28] = 1.0                   # a white square, upper right
    portrait[0, 1] += 0.25                              # a green cast everywhere
    # Half the frame's size, turned a quarter counter-clockwise, moved right and up.
    framing = np.array([[0.0, 0.5, 0.25, 0.25]])
    (rgb, alpha), = place(portrait, framing, [(64, 64)])
    expected = torch.rot90(portrait[0], 1, dims=(1, 2))   # counter-clockwise as displayed
    # The portrait covers frame pixels [8, 40) x [24, 56): the same pixels, turned.
    torch.testing.assert_close(rgb[:, 8:40, 24:56], expected, atol=1e-5, rtol=0)
    assert (alpha[0, 8:40, 24:56] == 1).all() and (alpha[0, 50:, :10] == 0).all()
    fill = rgb[:, 60, 2]                                # far outside: the border's colour
    torch.testing.assert_close(fill, torch.tensor([0.0, 0.25, 0.0]))
    # The rig's framing is the old resize and centre crop, fully opaque.
    (rgb, alpha), = place(portrait, identity_framings(1), [(48, 24)])
    big = torch.nn.functional.interpolate(portrait, size=(48, 48), mode="bicubic",
                                          align_corners=False)
    torch.testing.assert_close(rgb, big[0, :, 12:36])
    assert (alpha == 1).all()


# ---------------------------------------------------------------------------- the backend

class DrawsItsCondition(torch.nn.Module):
    """Stands in for DiffusionRig: predicts the noise that makes x0 the conditioning's
    ``rendered`` buffer (so DDIM returns it), and records every condition it sees."""

    def __init__(self, schedule, config):
        super().__init__()
        self.abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)
        self.config = config
        self.seen = []

    def forward(self, x, t, condition, z):
        self.seen.append(condition.clone())
        abar = self.abar[torch.as_tensor(t).long()].reshape(-1, 1, 1, 1)
        x0 = (condition[:, :3] * 2 - 1).clamp(-1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


@pytest.fixture(scope="module")
def backends(tmp_path_factory, demo):
    from server.backends import create_backend

    from server import paths

    root = tmp_path_factory.mktemp("framing")
    checkpoint = write_checkpoint(root / "model.safetensors")
    np.save(root / "latent.npy", np.zeros(64, np.float32))
    paths.allow_folders([str(root)])          # requests name files only in allowed folders
    out = {}
    for mode in ("ffhq", "rig"):
        backend = create_backend("diffusionrig", demo, steps="2", framing=mode,
                                 resolution=str(RESOLUTION), checkpoint=str(checkpoint))
        backend._models[None] = DrawsItsCondition(backend.schedule, backend._models[None].config)
        out[mode] = backend
    out["latent"] = str(root / "latent.npy")
    yield out
    paths.allow_folders(())


def rendered(backend, params, latent, **request):
    from server.backends.base import RenderRequest

    params.appearance.latent_file = latent
    model = backend._models[None]
    model.seen.clear()
    result = backend.render([RenderRequest(params, W, H, **request)])[0]
    return result, model.seen[-1][0]


def rig_landmarks(demo, embedding, params) -> np.ndarray:
    """The rig head's 68 landmarks [68, 2] in frame pixels (dlib's convention), through the
    rig's own perspective camera."""
    vertices, _ = demo.pose_params([params])
    points = embedding.points(vertices, demo.triangles)
    cameras = CameraBatch.from_params([params.camera])
    ndc, depth = project(points, cameras, W, H)
    return screen_space(ndc, depth, cameras, W, H)[0][0].double().numpy() - 0.5


MOVES = [dict(), dict(x=0.05, y=0.03), dict(x=-0.06, roll=0.35), dict(y=-0.04, roll=-0.3),
         dict(x=0.03, distance=1.4, roll=0.2)]


def test_the_network_sees_the_same_head_wherever_it_is_and_the_portrait_follows(
        backends, demo, framer):
    from server.photo.landmarks import FaceDetector

    detector = FaceDetector()
    conditions, errors = [], []
    for move in MOVES:
        params = head(**move)
        result, condition = rendered(backends["ffhq"], params, backends["latent"])
        conditions.append(condition)
        # The portrait (here: the conditioning, drawn back into the frame) sits where the rig
        # puts the head: its landmarks are the rig's projected ones.
        found = detector(np.ascontiguousarray(result.image[..., :3])).landmarks
        expected = rig_landmarks(demo, framer.embedding, params)
        errors.append(np.linalg.norm(found - expected, axis=1).mean())
    assert max(errors) < 3.0, errors
    # The network's input does not change: DECA's weak-perspective camera sees the head the
    # same wherever it is, and the framing takes out position, size and roll (an ambient
    # light, so the roll leaves the shading alone).
    for condition in conditions[1:]:
        assert (condition - conditions[0]).abs().mean() < 1e-4
    # The rig's framing hands the network the head wherever it is: a different input.
    _, moved = rendered(backends["rig"], head(**MOVES[2]), backends["latent"])
    _, still = rendered(backends["rig"], head(), backends["latent"])
    assert (moved - still).abs().mean() > 0.05


def test_framings_are_smoothed_over_the_shot(backends):
    backend = backends["ffhq"]
    frames = {f: head(x=0.04 * (f >= 10), roll=0.2 * (f == 10)) for f in range(8, 13)}
    shot = Shot("Scene/Camera", frame=10, smooth=True,
                neighbors=tuple((f, p) for f, p in frames.items() if f != 10))
    from server.backends.base import RenderRequest

    requests = [RenderRequest(frames[10], W, H, shot=shot), RenderRequest(frames[10], W, H)]
    codes = backend.buffers.codes([frames[10]] * 2, W, H)
    smoothed, alone = backend._framings(requests, codes)
    window = backend.framer.framings(backend.buffers.codes(list(frames.values()), W, H), "ffhq")
    np.testing.assert_allclose(smoothed, smooth(window)[2])
    np.testing.assert_allclose(alone, window[2])
    assert np.abs(smoothed - alone).max() > 0.01
