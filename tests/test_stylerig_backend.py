"""The stylerig backend: tiny random StyleGAN2/3 generators in NVIDIA's pickle format and a
small random RigNet, rendered in process and through a real server subprocess (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from portrait_rig.client import Client
from portrait_rig import sh
from portrait_rig.params import RigParams
from server.backends import create_backend
from server.backends.check import check_backend
from server.backends.base import RenderRequest
from server.backends.preview import PreviewBackend
from server.renderer.face_model import FaceModel
from server.models.rignet import control_vector
from server.checkpoints.stylegan import generator_fingerprint, load_generator
from server.checkpoints.stylerig import save_rignet
from server.models.stylegan3 import set_transform
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from server.backends.latents import seed_z
from server.renderer.head_view import head_views
from server.backends.shots import Shot, smooth_latents
from tests.support.server_process import ServerProcess
from tests.support.stylegan_fixtures import (SMALL_SG3_R, TINY_SG2, random_generator,
                                             write_nvidia_pickle)
from tests.support.stylerig_fixtures import write_random_rignet
from tests.support.synthetic_face import synthetic_face

S2, S3 = TINY_SG2.img_resolution, SMALL_SG3_R.img_resolution


@pytest.fixture(scope="module")
def face_model():
    return FaceModel(synthetic_face())


@pytest.fixture(scope="module")
def files(tmp_path_factory, face_model):
    """Generator pickles (StyleGAN2, StyleGAN3 config R) and a RigNet whose decoder has random
    weights (an untrained one is the identity), with the networks written."""
    folder = tmp_path_factory.mktemp("stylerig")
    G2, G3 = random_generator(TINY_SG2, seed=1), random_generator(SMALL_SG3_R, seed=2)
    with torch.no_grad():          # as in trained networks, w turns and shifts the input too
        affine = G3.synthesis.input.affine.weight
        affine.copy_(torch.randn(affine.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    write_nvidia_pickle(folder / "sg2.pkl", G2, repo="stylegan2-ada")
    write_nvidia_pickle(folder / "sg3.pkl", G3, repo="stylegan3")
    net = write_random_rignet(folder / "rignet.safetensors", G2, face_model.data.n_expression,
                              seed=3)
    return {"dir": folder, "sg2": folder / "sg2.pkl", "sg3": folder / "sg3.pkl",
            "rignet": folder / "rignet.safetensors", "G2": G2, "G3": G3, "net": net}


@pytest.fixture(scope="module")
def rigged(files, face_model):
    return create_backend("stylerig", face_model, "cpu", generator=str(files["sg2"]),
                          rignet=str(files["rignet"]), framing="rig")


@pytest.fixture(scope="module")
def plain(files, face_model):
    return create_backend("stylerig", face_model, "cpu", generator=str(files["sg2"]),
                          rignet="none", framing="rig")


@pytest.fixture(scope="module")
def sg3(files, face_model):
    return create_backend("stylerig", face_model, "cpu", generator=str(files["sg3"]),
                          rignet="none")


def rig(seed=0, yaw=0.0, roll=0.0, jaw=0.0, expression=(), sh_scale=1.0, translation=(0, 0, 0),
        latent_file=None, truncation=0.7) -> RigParams:
    params = RigParams()
    params.appearance.seed, params.appearance.truncation = seed, truncation
    params.appearance.latent_file = None if latent_file is None else str(latent_file)
    params.pose.global_ = [0.0, yaw, roll]
    params.pose.jaw = [jaw, 0.0, 0.0]
    params.expression = list(expression)
    params.lighting.sh = [[v * sh_scale for v in row] for row in params.lighting.sh]
    params.translation = list(translation)
    return params


def render(backend, params, width=None, height=None, **request):
    side = backend.G.img_resolution
    return backend.render([RenderRequest(params, width or side, height or side,
                                         **request)])[0]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, S, S] in [-1, 1] -> [B, S, S, 3] uint8, as NVIDIA's gen_images.py writes."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def identity_ws(G, seed, psi=0.7) -> torch.Tensor:
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).float()
    return G.mapping(z, truncation_psi=psi)


def differ(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ---------------------------------------------------------------------------- the server

def test_server_renders_stylerig_frames(files, rigged):
    params = rig(seed=4, yaw=0.3, jaw=0.2, expression=[1.0, -0.5])
    with ServerProcess("--backend", "stylerig", "--model", "demo", "--quiet",
                       "--option", f"stylerig.generator={files['sg2']}",
                       "--option", f"stylerig.rignet={files['rignet']}",
                       "--option", "stylerig.framing=rig") as proc, \
            Client(proc.host, proc.port, timeout=60.0) as client:
        assert client.hello["default_backend"] == "stylerig"
        assert "stylerig" in [b["name"] for b in client.hello["backends"]]
        frame = client.render(params, S2, S2, format="rgba8")
        log = proc.log()
    pixels = np.frombuffer(frame.pixels, np.uint8).reshape(S2, S2, 4)
    assert frame.backend == "stylerig" and "rignet" in frame.timings
    assert differ(pixels, render(rigged, params).image) <= 1      # other thread count
    assert "identity only" not in log


# ---------------------------------------------------------------------------- identity

def test_seed_draws_nvidia_z_and_maps_it_with_the_truncation(plain, files):
    G = files["G2"]
    result = render(plain, rig(seed=5, truncation=0.5))
    assert result.image.shape == (S2, S2, 4) and result.image.dtype == np.uint8
    assert (result.image[..., 3] == 255).all()
    expected = to_uint8(G.synthesis(identity_ws(G, 5, 0.5), noise_mode="const"))[0]
    np.testing.assert_array_equal(result.image[..., :3], expected)
    assert torch.equal(seed_z(5, G.z_dim), torch.from_numpy(
        np.random.RandomState(5).randn(G.z_dim)).float())


def test_same_seed_same_frame_other_seed_other_face(rigged):
    first, again = render(rigged, rig(seed=7)).image, render(rigged, rig(seed=7)).image
    np.testing.assert_array_equal(first, again)
    assert differ(first, render(rigged, rig(seed=8)).image) > 20
    assert differ(first, render(rigged, rig(seed=7, truncation=0.2)).image) > 5


def test_without_rignet_only_identity_changes_the_image(plain, capsys, files, face_model):
    create_backend("stylerig", face_model, "cpu", generator=str(files["sg2"]), rignet="none",
                   framing="rig")
    assert "no RigNet weights" in capsys.readouterr().err
    assert "identity only" in plain.summary()
    base = render(plain, rig(seed=1))
    assert "rignet" not in base.timings
    for changed in (rig(seed=1, yaw=0.4), rig(seed=1, jaw=0.3), rig(seed=1, expression=[2.0]),
                    rig(seed=1, sh_scale=0.2), rig(seed=1, roll=0.5)):
        np.testing.assert_array_equal(render(plain, changed).image, base.image)
    assert differ(render(plain, rig(seed=2)).image, base.image) > 20


def test_rignet_moves_the_latent_to_the_rig(rigged, files):
    G, net = files["G2"], files["net"]
    params = rig(seed=3, yaw=0.25, jaw=0.2, expression=[1.5, -1.0])
    result = render(rigged, params)
    assert "rignet" in result.timings
    ws = net(identity_ws(G, 3), net.request_controls(control_vector([params], net.layout)))
    np.testing.assert_array_equal(result.image[..., :3],
                                  to_uint8(G.synthesis(ws, noise_mode="const"))[0])
    base = render(rigged, rig(seed=3)).image
    for changed in (rig(seed=3, yaw=0.4), rig(seed=3, jaw=0.3), rig(seed=3, expression=[2.0]),
                    rig(seed=3, sh_scale=0.2)):
        assert differ(render(rigged, changed).image, base) > 5


def test_rignet_sees_the_head_relative_to_the_camera_without_roll(rigged):
    """Turning the camera and the light with the head leaves the portrait as it was; roll is
    not RigNet's."""
    base = render(rigged, rig(seed=3)).image
    turned = rig(seed=3, yaw=0.5)
    turned.camera.rotation = [0.0, 0.5, 0.0]
    turned.camera.location = [1.2 * math.sin(0.5), 0.0, 1.2 * math.cos(0.5)]
    turned.lighting.sh = sh.rotate(np.array(turned.lighting.sh),
                                   axis_angle_to_matrix([0.0, 0.5, 0.0])).tolist()
    assert differ(render(rigged, turned).image, base) <= 1
    assert differ(render(rigged, rig(seed=3, roll=0.7)).image, base) <= 1
    assert differ(render(rigged, rig(seed=3, yaw=0.5)).image, base) > 5


def test_head_views_split_roll_from_swing_and_place_the_head():
    params = rig(yaw=0.3, roll=0.0)
    params.pose.global_ = list(matrix_to_axis_angle(
        axis_angle_to_matrix([0, 0, 0.4]) @ axis_angle_to_matrix([0.2, 0.3, 0.0])))
    params.translation = [0.05, 0.0, 0.0]
    view, = head_views([params], 64, 32)
    assert view.roll == pytest.approx(0.4)
    np.testing.assert_allclose(axis_angle_to_matrix(view.swing),
                               axis_angle_to_matrix([0.2, 0.3, 0.0]), atol=1e-12)
    # 5 cm right at 1.2 m with a 14 degree vertical field: x_ndc = f * 0.05 / 1.2 * 32 / 64.
    focal = 1 / math.tan(math.radians(14) / 2)
    assert view.shift == pytest.approx((focal * 0.05 / 1.2 * 0.5 * 32 / 64, 0.0))
    for angle in (0.0, 1.0, math.pi - 1e-3, 3.0):
        vec = np.array([0.6, -0.8, 0.0]) * angle
        np.testing.assert_allclose(axis_angle_to_matrix(matrix_to_axis_angle(
            axis_angle_to_matrix(vec))), axis_angle_to_matrix(vec), atol=1e-9)


# ---------------------------------------------------------------------------- StyleGAN3

def test_stylegan3_rolls_and_shifts_through_the_input_transform(sg3, files):
    G = files["G3"]
    ws = identity_ws(G, 2)
    base = render(sg3, rig(seed=2)).image
    # Config R is equivariant to quarter turns: a quarter roll turns the portrait
    # counter-clockwise as displayed.
    quarter = render(sg3, rig(seed=2, roll=math.pi / 2)).image
    assert differ(quarter, np.rot90(base, 1, axes=(0, 1))) <= 1
    assert differ(quarter, np.rot90(base, -1, axes=(0, 1))) > 10
    params = rig(seed=2, roll=0.3, translation=(0.02, -0.01, 0.0))
    view, = head_views([params], S3, S3)
    try:
        set_transform(G, view.roll, *view.shift)
        expected = to_uint8(G.synthesis(ws))[0]
    finally:
        set_transform(G)
    assert view.shift[0] > 0 and view.shift[1] > 0          # right, and down the image
    np.testing.assert_array_equal(render(sg3, params).image[..., :3], expected)


# ---------------------------------------------------------------------------- latent files

@pytest.fixture
def latents(tmp_path, monkeypatch):
    """The data folder's latents/ (the folder ``appearance.latent_file`` names files in)."""
    monkeypatch.setenv("PORTRAIT_RIG_HOME", str(tmp_path))
    (tmp_path / "latents").mkdir()
    return tmp_path / "latents"


def test_latent_files_hold_z_w_or_w_plus(plain, files, latents):
    G = files["G2"]
    z = np.random.RandomState(9).randn(G.z_dim)
    np.save(latents / "z.npy", z)
    from_z = render(plain, rig(seed=0, latent_file="z.npy"))
    np.testing.assert_array_equal(from_z.image, render(plain, rig(seed=9)).image)

    w = G.mapping(torch.from_numpy(z[None]).float())[0, 0]
    np.savez(latents / "w.npz", w=w.numpy())
    expected = to_uint8(G.synthesis(w.expand(1, G.num_ws, -1)))[0]
    for truncation in (0.7, 1.0):                     # a w from a file is used as it is
        image = render(plain, rig(latent_file="w.npz", truncation=truncation)).image
        np.testing.assert_array_equal(image[..., :3], expected)

    w_plus = torch.randn(G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(4))
    torch.save(w_plus, latents / "w_plus.pt")
    np.savez(latents / "projected_w.npz", w=w_plus[None].numpy())     # projector.py layout
    expected = to_uint8(G.synthesis(w_plus[None]))[0]
    for name in ("w_plus.pt", "projected_w.npz"):
        image = render(plain, rig(latent_file=name)).image
        np.testing.assert_array_equal(image[..., :3], expected)


def test_bad_latent_files_are_named(plain, latents):
    np.save(latents / "short.npy", np.zeros(5))
    torch.save({"w": torch.zeros(3)}, latents / "named.pt")
    for name, message in (("short.npy", r"short.npy: holds an array of shape \[5\]"),
                          ("named.pt", r"named.pt: holds an array named 'w' of shape \[3\]"),
                          ("missing.npy", "no file of that name")):
        with pytest.raises(ValueError, match=message):
            render(plain, rig(latent_file=name))


# ---------------------------------------------------------------------------- batches

def test_a_batch_of_three_equals_three_singles(rigged, sg3):
    for backend, batch in (
            (rigged, [rig(seed=1), rig(seed=2, yaw=0.3), rig(seed=1, expression=[1.0])]),
            (sg3, [rig(seed=1), rig(seed=2, roll=0.4), rig(seed=3)])):   # 2 transforms
        side = backend.G.img_resolution
        results = backend.render([RenderRequest(p, side, side) for p in batch])
        for params, result in zip(batch, results):
            # StyleGAN3 normalises styles over the batch (cancelled by demodulation, up to
            # rounding): one 8-bit level at most.
            assert differ(result.image, render(backend, params).image) <= 1


def test_smoothing_uses_the_neighbours_the_request_carries(rigged, files):
    G, net = files["G2"], files["net"]
    # A jump at frame 10 (the kernel leaves linear ramps, and RigNet is linear in the
    # controls, unchanged).
    frames = {f: rig(seed=3, yaw=0.4 * (f == 10), jaw=0.1 * (f >= 10)) for f in range(8, 13)}
    neighbors = tuple((f, p) for f, p in frames.items() if f != 10)
    shot = Shot("Scene/Camera", frame=10, smooth=True, neighbors=neighbors)
    smoothed = render(rigged, frames[10], shot=shot).image
    ws = net(identity_ws(G, 3).expand(5, -1, -1),
             net.request_controls(control_vector(list(frames.values()), net.layout)))
    expected = to_uint8(G.synthesis(smooth_latents(ws)[2:3]))[0]
    assert differ(smoothed[..., :3], expected) <= 1
    alone = render(rigged, frames[10]).image
    assert differ(smoothed, alone) > 2
    unsmoothed = Shot("Scene/Camera", frame=10, smooth=False, neighbors=neighbors)
    np.testing.assert_array_equal(render(rigged, frames[10], shot=unsmoothed).image, alone)


# ---------------------------------------------------------------------------- output

def test_frames_are_resized_to_cover_and_centre_cropped(plain, files):
    G = files["G2"]
    image = render(plain, rig(seed=6), 48, 20).image
    assert image.shape == (20, 48, 4)
    native = G.synthesis(identity_ws(G, 6))
    big = F.interpolate(native, size=(48, 48), mode="bicubic", align_corners=False)
    np.testing.assert_array_equal(image[..., :3], to_uint8(big[:, :, 14:34])[0])


def test_passes_come_from_the_face_model_renderer(plain, face_model):
    params = rig(seed=1, yaw=0.2)
    result = render(plain, params, 40, 30, passes=("normal", "mask"))
    reference = PreviewBackend(face_model).render([RenderRequest(params, 40, 30,
                                                                 ("normal", "mask"))])[0]
    assert set(result.passes) == {"normal", "mask"}
    for name in result.passes:
        np.testing.assert_array_equal(result.passes[name], reference.passes[name])


# ---------------------------------------------------------------------------- options

def test_bad_options_are_named(files, face_model, tmp_path):
    def make(**options):
        return create_backend("stylerig", face_model, "cpu", **options)

    sg2 = str(files["sg2"])
    with pytest.raises(ValueError, match="unknown stylerig option"):
        make(generator=sg2, steps=3)
    with pytest.raises(ValueError, match="precision 'fp16'.*CUDA"):
        make(generator=sg2, precision="fp16")
    with pytest.raises(FileNotFoundError, match="rignet: file not found"):
        make(generator=sg2, rignet=str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match=r"edits latents \[8, 16\].*has \[8, 8\]"):
        make(generator=str(files["sg3"]), rignet=str(files["rignet"]))
    missing = tmp_path / "generator.pkl"
    assert "StyleGAN generator not found" in check_backend("stylerig", {"generator": missing}).reason
    with pytest.raises(FileNotFoundError, match="generator not found"):
        make(generator=str(missing))


def test_a_neck_turn_moves_the_portrait_like_a_global_turn(rigged):
    """RigNet sees everything above the neck as one head (``server.renderer.head_view``)."""
    base = render(rigged, rig(seed=3)).image
    turned = render(rigged, rig(seed=3, yaw=0.4)).image
    neck = rig(seed=3)
    neck.pose.neck = [0.0, 0.4, 0.0]
    assert differ(render(rigged, neck).image, turned) <= 1
    assert differ(turned, base) > 5


def test_a_rignet_for_another_generator_or_face_model_is_refused(files, face_model, tmp_path):
    """RigNet files record their generator (by fingerprint, which survives a move) and face
    model; a mismatch names both and says how to run without it."""
    loaded = load_generator(files["sg2"])
    own = {"generator": "sg2.pkl", "generator_fingerprint": generator_fingerprint(loaded),
           "face_model": face_model.data.name,
           "face_vertices": str(face_model.data.n_vertices)}
    cases = {"ok.safetensors": own,
             "other_generator.safetensors": {**own, "generator": "ffhq.pkl",
                                             "generator_fingerprint": "0123456789abcdef"},
             "other_face.safetensors": {**own, "face_model": "FLAME 2020",
                                        "face_vertices": "5023"}}
    for name, meta in cases.items():
        save_rignet(files["net"], tmp_path / name, meta)

    def make(name):
        return create_backend("stylerig", face_model, "cpu", generator=str(files["sg2"]),
                              rignet=str(tmp_path / name), framing="rig")

    assert make("ok.safetensors").rignet is not None
    with pytest.raises(ValueError, match=r"trained for the generator 'ffhq.pkl'.*not sg2.pkl.*"
                                         r"stylerig.rignet=none"):
        make("other_generator.safetensors")
    with pytest.raises(ValueError, match=r"face model 'FLAME 2020' \(5023 vertices\).*"
                                         r"stylerig.rignet=none"):
        make("other_face.safetensors")


# ---------------------------------------------------------------------------- StyleGAN2 framing

@pytest.fixture(scope="module")
def framed(files):
    """StyleGAN2 with its portrait placed through the FFHQ framing of the demo head."""
    from portrait_rig.face_source import load_face_data

    demo = FaceModel(load_face_data("demo"))
    return create_backend("stylerig", demo, "cpu", generator=str(files["sg2"]), rignet="none")


def test_stylegan2_portraits_are_placed_where_the_head_is(framed, files):
    from server.backends.framing import place

    G = files["G2"]
    native = G.synthesis(identity_ws(G, 6), noise_mode="const")
    centred = rig(seed=6)
    moved = rig(seed=6, roll=0.4, translation=(0.03, -0.02, 0.0))
    images = {}
    for name, params in (("centred", centred), ("moved", moved)):
        framing = framed.framer.framings(framed.framer.codes([params], 64, 48), "ffhq")
        (rgb, alpha), = place(native, framing, [(64, 48)])
        image = render(framed, params, 64, 48).image
        expected = (rgb * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert differ(image[..., :3], expected) <= 1
        np.testing.assert_array_equal(image[..., 3], (alpha[0] * 255).round().byte().numpy())
        images[name] = image
    # Roll and position, which StyleGAN2 cannot draw, now move the portrait.
    assert differ(images["centred"], images["moved"]) > 20
    assert 0 < images["moved"][..., 3].mean() < 255
