"""Temporal stability: the smoothing kernel (ends kept and renormalised), latent smoothing,
the ``shot`` object on the wire and its way to backends."""

from __future__ import annotations

import numpy as np
import pytest

from portrait_rig import protocol
from portrait_rig.params import ParamError, RigParams
from server.backends import shots as temporal
from server.backends.base import Backend, RenderResult
from server.service.jobs import RequestError, parse_render
from server.backends.shots import Shot, ShotError, parse_shot, smooth, smooth_latents

REFERENCE = np.array([0.25, 0.75, 1.0, 0.75, 0.25])


def reference_interior(x: np.ndarray, t: int) -> np.ndarray:
    """stylegan3-editing's filter at an interior frame, written out."""
    return (0.25 * x[t - 2] + 0.75 * x[t - 1] + x[t] + 0.75 * x[t + 1] + 0.25 * x[t + 2]) / 3


# ------------------------------------------------------------------------------ kernel

def test_interior_frames_follow_the_reference_filter():
    x = np.random.default_rng(0).standard_normal((9, 4, 3))
    out = smooth(x)
    for t in range(2, 7):
        np.testing.assert_allclose(out[t], reference_interior(x, t), rtol=1e-12)


def test_end_frames_are_kept_with_the_kernel_renormalised():
    x = np.zeros(5)
    x[-1] = 6.0                                      # an impulse on the last frame
    out = smooth(x)
    assert out.shape == x.shape                      # nothing dropped
    # Last frame: only offsets -2..0 exist, weights 0.25, 0.75, 1 (sum 2).
    assert out[4] == pytest.approx(1.0 * 6 / 2.0)
    # Second to last: offsets -2..1, weights 0.25, 0.75, 1, 0.75 (sum 2.75).
    assert out[3] == pytest.approx(0.75 * 6 / 2.75)
    assert out[2] == pytest.approx(0.25 * 6 / 3.0)   # interior: the plain kernel
    assert out[:2].tolist() == [0.0, 0.0]
    first = temporal.smoothing_matrix(5)[0]
    np.testing.assert_allclose(first, [1 / 2, 0.75 / 2, 0.25 / 2, 0, 0])


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 8])
def test_a_constant_sequence_stays_constant(frames):
    w = np.broadcast_to(np.random.default_rng(1).standard_normal((1, 16, 8)),
                        (frames, 16, 8)).copy()
    np.testing.assert_allclose(smooth(w), w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(smooth_latents(w), w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(temporal.smoothing_matrix(frames).sum(axis=1), 1.0)


def test_smoothing_along_another_axis_and_for_transforms():
    x = np.random.default_rng(2).standard_normal((3, 7, 2))
    np.testing.assert_allclose(smooth(x, axis=1), np.moveaxis(smooth(np.moveaxis(x, 1, 0)),
                                                              0, 1))
    transforms = np.random.default_rng(3).standard_normal((6, 3, 3))
    np.testing.assert_allclose(temporal.smooth_transforms(transforms)[3],
                               reference_interior(transforms, 3))


def test_latent_fine_layers_become_their_mean_over_frames():
    w = np.random.default_rng(4).standard_normal((7, 16, 4))
    out = smooth_latents(w)
    fine = temporal.FINE_LAYER_START
    for t in range(7):
        np.testing.assert_allclose(out[t, fine:], w[:, fine:].mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(out[:, :fine], smooth(w[:, :fine]), atol=1e-12)
    assert np.array_equal(w, np.random.default_rng(4).standard_normal((7, 16, 4)))  # untouched


def test_torch_tensors_keep_type_dtype_and_values():
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(5).standard_normal((6, 16, 4))
    out = smooth_latents(torch.tensor(w, dtype=torch.float64))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), smooth_latents(w), atol=1e-12)
    assert smooth(torch.ones(3, 2, dtype=torch.float32)).dtype == torch.float32


def test_a_window_of_neighbours_gives_the_sequence_result_at_its_centre():
    """What a backend does with a request's neighbours: smoothing the window [t-2, t+2]
    (cut at the shot's ends) and keeping frame t equals smoothing the whole shot at t."""
    x = np.random.default_rng(6).standard_normal((8, 5))
    whole = smooth(x)
    for t in range(8):
        lo, hi = max(t - 2, 0), min(t + 3, 8)
        np.testing.assert_allclose(smooth(x[lo:hi])[t - lo], whole[t], atol=1e-12)


# ------------------------------------------------------------------------------ shots

def neighbour(frame: int, jaw: float = 0.0) -> dict:
    return {"frame": frame, "params": {"pose": {"jaw": [jaw, 0.0, 0.0]}}}


def test_parse_shot_with_a_window():
    shot = parse_shot({"id": "Scene/Camera", "seed": 7, "frame": 3, "smooth": True,
                       "neighbors": [neighbour(1, 0.1), neighbour(2, 0.2), neighbour(5, 0.5)]},
                      4, 4)
    assert (shot.id, shot.seed, shot.frame, shot.smooth) == ("Scene/Camera", 7, 3, True)
    frames, params, centre = shot.window(RigParams())
    assert frames == [1, 2, 3, 5] and centre == 2
    assert [p.pose.jaw[0] for p in params] == [0.1, 0.2, 0.0, 0.5]
    assert parse_shot(shot.to_dict(), 4, 4) == shot


@pytest.mark.parametrize("data, field", [
    ({"seed": 1}, "shot.id"),
    ({"id": "s", "seed": -1}, "shot.seed"),
    ({"id": "s", "seed": 2**32}, "shot.seed"),
    ({"id": "s", "frame": 1.5}, "shot.frame"),
    ({"id": "s", "smooth": "yes"}, "shot.smooth"),
    ({"id": "s", "noise": 1}, "shot.noise"),
    ({"id": "s", "frame": 5, "neighbors": [neighbour(5)]}, "shot.neighbors[0].frame"),
    ({"id": "s", "frame": 5, "neighbors": [neighbour(1), neighbour(2), neighbour(3)]},
     "shot.neighbors"),
    ({"id": "s", "neighbors": [{"frame": 1}]}, "shot.neighbors[0]"),
])
def test_malformed_shots_name_the_field(data, field):
    with pytest.raises(ShotError) as info:
        parse_shot(data, 4, 4)
    assert info.value.field == field


def test_bad_neighbour_parameters_name_the_path_inside_the_shot():
    with pytest.raises(ParamError) as info:
        parse_shot({"id": "s", "frame": 2, "neighbors": [neighbour(1, jaw=99.0)]}, 4, 4)
    assert info.value.field == "shot.neighbors[0].params.pose.jaw[0]"


def render_header(**extra) -> dict:
    return {"type": "render", "id": 1, "params": {}, "width": 8, "height": 8, **extra}


def test_render_requests_carry_the_shot_or_name_its_error():
    job = parse_render(render_header(shot={"id": "Scene/Camera", "seed": 3, "frame": 12}),
                       ("preview",), "preview", 4, 4)
    assert job.shot == Shot("Scene/Camera", 3, 12)
    assert parse_render(render_header(), ("preview",), "preview", 4, 4).shot is None
    with pytest.raises(RequestError) as info:
        parse_render(render_header(shot={"id": "x", "seed": "7"}), ("preview",), "preview", 4, 4)
    assert (info.value.code, info.value.field) == (protocol.E_BAD_MESSAGE, "shot.seed")
    with pytest.raises(RequestError) as info:
        parse_render(render_header(shot={"id": "x", "frame": 2, "smooth": True,
                                         "neighbors": [neighbour(1, jaw=99.0)]}),
                     ("preview",), "preview", 4, 4)
    assert info.value.code == protocol.E_BAD_PARAMS
    assert info.value.field == "shot.neighbors[0].params.pose.jaw[0]"


class RecordingBackend(Backend):
    """Keeps the requests it is given; renders flat grey frames."""
    name = "recording"

    def __init__(self):
        super().__init__(face_model=None)
        self.seen = []

    def render(self, requests):
        self.seen.extend(requests)
        return [RenderResult(np.full((r.height, r.width, 4), 128, np.uint8)) for r in requests]


def test_backends_receive_the_shot_of_each_request():
    from server.service.worker import LocalWorker

    backend = RecordingBackend()
    worker = LocalWorker("recording", lambda: None, "cpu", lambda *a: backend)
    shots = [{"id": "A/Cam", "seed": 5, "frame": f} for f in (1, 2)]
    group = [parse_render(render_header(id=i, backend="recording", shot=shot),
                          ("recording",), "recording", 4, 4) for i, shot in enumerate(shots)]
    replies = {}
    for job in group:
        job.done = lambda job, buffers, error: replies.__setitem__(job.id, error)
    worker.execute(group)
    assert sorted(replies) == [0, 1] and not any(replies.values())
    assert [r.shot for r in backend.seen] == [Shot("A/Cam", 5, 1), Shot("A/Cam", 5, 2)]
