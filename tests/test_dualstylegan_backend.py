"""The dualstylegan backend: narrow random networks written in the official file layouts
(tests/support/dualstylegan_fixtures.py), rendered in process and through a real server
subprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.dualstylegan_fixtures import ANIME, CARTOON, TINY, write_style_home
from portrait_rig.client import Client, ServerError
from portrait_rig.params import RigParams
from server.backends import create_backend
from server.backends.check import check_backend
from server.backends.base import RenderRequest
from server.backends.dualstylegan import encoder_input, style_weights
from server.backends.latents import seed_z
from server.backends.shots import Shot, smooth, smooth_latents
from server.backends.stylegan_rig import frame_images
from server.models.dualstylegan import DualStyleGAN
from server.renderer.face_model import FaceModel
from server.renderer.head_view import head_views
from tests.support.server_process import ServerProcess
from tests.support.synthetic_face import synthetic_face

S = TINY.generator.img_resolution
L, N_S = TINY.num_ws, TINY.structure_layers


@pytest.fixture(scope="module")
def face_model():
    return FaceModel(synthetic_face())


@pytest.fixture(scope="module")
def files(tmp_path_factory, face_model):
    """The style folder, and the photos requests name, in a folder the server allows
    (requests name files only inside the data folder or allowed folders)."""
    from server import paths

    written = write_style_home(tmp_path_factory.mktemp("home"), face_model.data.n_expression)
    paths.allow_folders({str(written["style"].parent), str(written["photo"].parent)})
    yield written
    paths.allow_folders(())


@pytest.fixture(scope="module")
def rigged(files, face_model):
    return create_backend("dualstylegan", face_model, "cpu", folder=str(files["root"]),
                          rignet=str(files["rignet"]))


@pytest.fixture(scope="module")
def plain(files, face_model):
    return create_backend("dualstylegan", face_model, "cpu", folder=str(files["root"]),
                          rignet="none")


def rig(seed=0, yaw=0.0, jaw=0.0, **style) -> RigParams:
    params = RigParams()
    params.appearance.seed = seed
    params.pose.global_ = [0.0, yaw, 0.0]
    params.pose.jaw = [jaw, 0.0, 0.0]
    for name, value in style.items():
        setattr(params.appearance, name, value)
    return params


def render(backend, params, size=S, **request):
    return backend.render([RenderRequest(params, size, size, **request)])[0]


def pixels(result) -> np.ndarray:
    return result.image[..., :3]


def expected(model: DualStyleGAN, content, exstyle, weights) -> np.ndarray:
    """The frame DualStyleGAN draws for W+ content and exstyle [L, C] with weights [L]."""
    image = model(content[None], exstyle[None], torch.as_tensor(weights, dtype=torch.float32))
    request = RenderRequest(RigParams(), S, S)
    return frame_images(image, [request])[0][..., :3]


def identity(model: DualStyleGAN, seed, psi=0.7) -> torch.Tensor:
    return model.generator.mapping(seed_z(seed, 16)[None], truncation_psi=psi)[0]


def rig_content(files, params) -> torch.Tensor:
    from server.models.rignet import control_vector

    model, net = files["cartoon"], files["net"]
    view, = head_views([params], S, S)
    controls = control_vector([params], net.layout)
    controls[:, net.layout.slices["global_pose"]] = torch.tensor(view.swing, dtype=torch.float32)
    controls[:, net.layout.slices["sh"]] = torch.tensor(view.light, dtype=torch.float32).flatten()
    return net(identity(model, params.appearance.seed)[None], controls)[0]


def exemplar(files, index, family="cartoon") -> torch.Tensor:
    codes = files["codes"] if family == "cartoon" else files["anime_codes"]
    name = list(codes)[index]
    return files[family].map_codes(torch.from_numpy(codes[name][0]).float())


def differ(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ---------------------------------------------------------------------------- the server

def test_server_renders_styled_frames_whose_pose_follows_the_rig(files, rigged):
    params = rig(seed=4, yaw=0.3, jaw=0.2, style_exemplar=2, style_structure=0.5)
    with ServerProcess("--backend", "dualstylegan", "--model", "demo", "--quiet",
                       "--option", f"dualstylegan.folder={files['root']}",
                       "--option", f"dualstylegan.rignet={files['rignet']}") as proc, \
            Client(proc.host, proc.port, timeout=60.0) as client:
        assert "dualstylegan" in [b["name"] for b in client.hello["backends"]]
        frame = client.render(params, S, S, format="rgb8")
        turned = client.render(rig(seed=4, yaw=-0.3, jaw=0.2, style_exemplar=2,
                                   style_structure=0.5), S, S, format="rgb8")
        with pytest.raises(ServerError) as error:
            client.render(rig(style_exemplar=9), S, S)
        thumbnails = [client.render(rig(style_reconstruct=True, style_exemplar=i), 16, 16)
                      for i in range(len(CARTOON))]
    image = np.frombuffer(frame.pixels, np.uint8).reshape(S, S, 3)
    assert frame.backend == "dualstylegan" and "rignet" in frame.timings
    assert differ(image, pixels(render(rigged, params))) <= 1           # other thread count
    assert differ(image, np.frombuffer(turned.pixels, np.uint8).reshape(S, S, 3)) > 5
    style = frame.header["info"]["style"]
    assert style == {"family": "cartoon", "families": ["anime", "cartoon"], "source": "exemplar",
                     "exemplar": 2, "name": CARTOON[2], "exemplars": 4, "layers": L,
                     "structure_layers": N_S}
    assert error.value.code == "render_failed" and "0..3" in str(error.value)
    assert [t.header["info"]["style"]["name"] for t in thumbnails] == CARTOON


# ---------------------------------------------------------------------------- content

def test_content_is_the_stylerig_latent_and_follows_the_rig(rigged, plain, files):
    params = rig(seed=3, yaw=0.25, jaw=0.2, style_exemplar=1)
    result = render(rigged, params)
    weights = [0.75] * N_S + [1.0] * (L - N_S)
    want = expected(files["cartoon"], rig_content(files, params), exemplar(files, 1), weights)
    assert differ(pixels(result), want) <= 1
    assert {"identity", "rignet", "style", "synthesis", "image"} <= set(result.timings)
    assert differ(pixels(render(rigged, rig(seed=3, yaw=-0.25, style_exemplar=1))),
                  pixels(result)) > 5
    # Without RigNet the identity is the seed's, and the pose changes nothing.
    base = pixels(render(plain, rig(seed=3, style_exemplar=1)))
    want = expected(files["cartoon"], identity(files["cartoon"], 3), exemplar(files, 1), weights)
    assert differ(base, want) <= 1
    np.testing.assert_array_equal(pixels(render(plain, rig(seed=3, yaw=0.4, style_exemplar=1))),
                                  base)
    assert "identity only" in plain.summary()


def test_structure_and_colour_sliders_weight_their_layers(plain, files):
    """style_structure weights the structure layers, style_colour the colour layers, and an
    explicit style_weights vector overrides both."""
    model, content = files["cartoon"], identity(files["cartoon"], 5)
    for structure, colour in ((0.2, 0.9), (1.0, 0.0), (0.0, 1.0)):
        result = render(plain, rig(seed=5, style_structure=structure, style_colour=colour))
        weights = [structure] * N_S + [colour] * (L - N_S)
        assert differ(pixels(result), expected(model, content, exemplar(files, 0), weights)) <= 1
    vector = [0.1, 0.9, 0.4, 0.0, 1.0, 0.5, 0.2, 1.2]
    result = render(plain, rig(seed=5, style_weights=vector, style_structure=0.0))
    assert differ(pixels(result), expected(model, content, exemplar(files, 0), vector)) <= 1
    assert style_weights(rig(style_structure=0.3, style_colour=0.6).appearance, L, N_S).tolist() \
        == pytest.approx([0.3] * N_S + [0.6] * (L - N_S))
    assert differ(pixels(render(plain, rig(seed=5, style_structure=0.0, style_colour=0.0))),
                  pixels(render(plain, rig(seed=5, style_exemplar=3, style_structure=0.0,
                                           style_colour=0.0)))) == 0


# ---------------------------------------------------------------------------- styles

def test_style_sources(plain, files):
    model, content = files["cartoon"], identity(files["cartoon"], 1)
    weights = [0.75] * N_S + [1.0] * (L - N_S)
    sampled = render(plain, rig(seed=1, style_seed=7, style_exemplar=3))
    sampler = files["sampler"]
    code = sampler(sampler.noise(7))[0]
    assert differ(pixels(sampled), expected(model, content, model.map_codes(code), weights)) <= 1
    assert sampled.info["style"]["source"] == "sampled" and sampled.info["style"]["name"] is None
    assert differ(pixels(sampled), pixels(render(plain, rig(seed=1, style_seed=8)))) > 5

    from_image = render(plain, rig(seed=1, style_image=str(files["style"])))
    code = files["encoder"](encoder_input(files["style"], "style_image"))[0]
    assert differ(pixels(from_image), expected(model, content, model.map_codes(code),
                                               weights)) <= 1
    assert from_image.info["style"]["source"] == "image"

    thumbnail = render(plain, rig(seed=1, style_reconstruct=True, style_exemplar=2, yaw=0.5))
    own = exemplar(files, 2)
    assert differ(pixels(thumbnail), expected(model, own, own, [1.0] * L)) <= 1


def test_families_and_refined_codes(plain, files):
    result = render(plain, rig(seed=2, style_family="anime", style_exemplar=1))
    want = expected(files["anime"], identity(files["anime"], 2), exemplar(files, 1, "anime"),
                    [0.75] * N_S + [1.0] * (L - N_S))
    assert differ(pixels(result), want) <= 1
    assert result.info["style"]["name"] == ANIME[1] and result.info["style"]["exemplars"] == 3
    batch = plain.render([RenderRequest(rig(seed=2, style_family="anime", style_exemplar=1), S, S),
                          RenderRequest(rig(seed=2, style_exemplar=1), S, S)])
    np.testing.assert_array_equal(batch[0].image, result.image)
    assert batch[1].info["style"]["family"] == "cartoon" and differ(batch[0].image,
                                                                    batch[1].image) > 5


def test_photo_identity_through_the_encoder(plain, files):
    result = render(plain, rig(reference_photo=str(files["photo"])))
    model = files["cartoon"]
    codes = files["encoder"](encoder_input(files["photo"], "reference_photo"))
    content = DualStyleGAN.truncate(model.map_codes(codes)[0], 0.75)
    assert differ(pixels(result), expected(model, content, exemplar(files, 0),
                                           [0.75] * N_S + [1.0] * (L - N_S))) <= 1


def test_bad_styles_say_what_to_do(plain, files, face_model, tmp_path):
    cases = [(rig(style_family="watercolour"), "no style 'watercolour'.*anime, cartoon"),
             (rig(style_family="../cartoon"), "folder name"),
             (rig(style_exemplar=4), "4 exemplars"),
             (rig(style_family="anime", style_seed=3), "no sampler.pt"),
             (rig(style_weights=[0.5] * 18), "8 layers, got 18 weights")]
    for params, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            render(plain, params)
    no_encoder = create_backend("dualstylegan", face_model, "cpu", folder=str(files["root"]),
                                rignet="none", encoder="none")
    with pytest.raises(ValueError, match="encoder.pt"):
        render(no_encoder, rig(style_image=str(files["style"])))
    with pytest.raises(ValueError, match="unknown dualstylegan option"):
        create_backend("dualstylegan", face_model, "cpu", folder=str(files["root"]), colour=1)
    problem = check_backend("dualstylegan", {"folder": str(tmp_path)}).reason
    assert "generator.pt" in problem and "williamyang1991/DualStyleGAN" in problem
    with pytest.raises(FileNotFoundError, match="no DualStyleGAN style"):
        create_backend("dualstylegan", face_model, "cpu", folder=str(tmp_path))


# ---------------------------------------------------------------------------- shots

def test_shot_smoothing_covers_content_style_and_weights(rigged, files):
    frames = {f: rig(seed=6, yaw=0.1 * f, style_exemplar=f % 2, style_structure=0.2 * f)
              for f in range(5)}
    shot = Shot("s", seed=1, frame=2, smooth=True,
                neighbors=tuple((f, p) for f, p in frames.items() if f != 2))
    result = rigged.render([RenderRequest(frames[2], S, S, shot=shot)])[0]
    model = files["cartoon"]
    content = smooth_latents(torch.stack([rig_content(files, p) for p in frames.values()]))[2]
    styles = smooth_latents(torch.stack([exemplar(files, f % 2) for f in frames]))[2]
    weights = smooth(torch.stack([style_weights(p.appearance, L, N_S)
                                  for p in frames.values()]))[2]
    assert differ(pixels(result), expected(model, content, styles, weights)) <= 1
    lone = render(rigged, frames[2])
    assert differ(pixels(lone), pixels(result)) > 0
