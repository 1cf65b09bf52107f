"""Texture codes (``appearance.texture``, DECA's ``tex``) from a fit, through the rig, into the
DiffusionRig buffers and personalisation: FLAME-layout model and texture space with random
content."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.flame_fixture import write_flame_fixture
from portrait_rig.face_source import load_face_data
from portrait_rig.params import RigParams
from server.photo.embedding import LandmarkEmbedding
from server.renderer.deca import DecaBufferRenderer, DecaCodes
from server.renderer.face_model import FaceModel
from server.renderer.texture import FlameTexture

pytestmark = pytest.mark.usefixtures("single_thread_module")

SIZE = 96
TEX = 16


@pytest.fixture(scope="module")
def flame(tmp_path_factory):
    """A FLAME-layout model, a texture space (planar UVs, 16 x 16 texels, 50 components) and
    68 landmarks on the front of the head."""
    folder = tmp_path_factory.mktemp("flame")
    arrays = write_flame_fixture(folder / "generic_model.pkl")
    model = FaceModel(load_face_data(str(folder / "generic_model.pkl")))
    v = arrays["v_template"]
    rng = np.random.default_rng(11)
    np.savez(folder / "FLAME_texture.npz", mean=rng.uniform(60, 200, (TEX, TEX, 3)),
             tex_dir=rng.normal(0, 4, (TEX, TEX, 3, 50)),
             vt=np.stack([0.5 + v[:, 0] / 0.2, 0.5 + v[:, 1] / 0.25], 1), ft=arrays["f"])
    texture = FlameTexture(folder / "FLAME_texture.npz")
    # Landmarks: front-facing triangles spread over the face.
    tri = v[arrays["f"]]
    front = np.nonzero((np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])[:, 2] > 0)
                       & (tri[:, :, 2].mean(1) > 0.06))[0]
    triangles = rng.choice(front, 68, replace=False)
    embedding = LandmarkEmbedding(triangles.astype(np.int64), np.full((68, 3), 1 / 3, np.float32),
                                  np.ones(68, bool))
    return model, texture, embedding


def textured(code, **fields) -> RigParams:
    params = RigParams.from_dict({"camera": {"type": "orthographic", "scale": 7.0},
                                  "pose": {"global": [0.0, 0.2, 0.0]}, **fields})
    params.appearance.texture = list(code)
    return params


def test_each_item_of_a_batch_gets_its_own_texture_code(flame):
    model, texture, _ = flame
    renderer = DecaBufferRenderer(model, texture)
    codes = [np.random.default_rng(i).normal(size=n) for i, n in ((1, 50), (2, 20))]
    batch = renderer.codes([textured(codes[0]), textured(codes[1]), textured([])], SIZE, SIZE)
    assert batch.tex.shape == (3, 50) and (batch.tex[1, 20:] == 0).all()
    buffers = renderer.render(batch, SIZE)
    for i, params in enumerate((textured(codes[0]), textured(codes[1]), textured([]))):
        alone = renderer.render(renderer.codes([params], SIZE, SIZE), SIZE)
        torch.testing.assert_close(buffers.albedo[i], alone.albedo[0], atol=1e-5, rtol=0)
    assert (buffers.albedo[0] - buffers.albedo[2]).abs().max() > 0.1
    # Batches of codes of any lengths concatenate (zero-padded).
    both = DecaCodes.cat([renderer.codes([textured(codes[1])], SIZE, SIZE),
                          renderer.codes([textured([])], SIZE, SIZE)])
    assert both.tex.shape == (2, 20) and (both.tex[1] == 0).all()
    # More coefficients than the space holds is an error naming the field.
    with pytest.raises(ValueError, match=r"appearance.texture: 51 values"):
        renderer.render(renderer.codes([textured(np.ones(51))], SIZE, SIZE), SIZE)


def test_a_model_without_texture_space_keeps_its_own_albedo():
    demo = DecaBufferRenderer(FaceModel(load_face_data("demo")))
    plain = demo.render(demo.codes([textured([])], SIZE, SIZE), SIZE)
    coded = demo.render(demo.codes([textured(np.ones(50))], SIZE, SIZE), SIZE)
    assert torch.equal(plain.packed, coded.packed)


def test_personalisation_keeps_every_photos_texture_code(flame):
    from server.training.diffusionrig.album import FittedPhoto, album_data

    model, texture, _ = flame
    photos = [FittedPhoto(f"{i}.png", np.zeros((SIZE, SIZE, 3), np.uint8),
                          textured(np.random.default_rng(i).normal(size=50), shape=[i * 0.5]),
                          "deca", 1.0) for i in range(3)]
    data = album_data(photos, model, SIZE, texture)
    renderer = DecaBufferRenderer(model, texture)
    for i, photo in enumerate(photos):
        params = photo.params.copy()
        params.shape = [0.5]                                # the album's mean identity
        expected = renderer.conditioning(renderer.render(
            renderer.codes([params], SIZE, SIZE), SIZE))[0]
        torch.testing.assert_close(data.buffers[i], expected, atol=1e-4, rtol=0)   # batched
    assert (data.buffers[0, 6:] - data.buffers[1, 6:]).abs().max() > 0.1   # albedo differs


def test_optimisation_fits_the_texture_code(flame):
    from server.photo.optimise import FitSettings, fit_aligned
    from server.renderer import project, screen_space

    model, texture, embedding = flame
    renderer = DecaBufferRenderer(model, texture)
    truth = np.random.default_rng(5).normal(size=50)
    target = textured(truth, lighting={"sh": [[3.2] * 3, [0.3] * 3, [0.4] * 3, [0.6] * 3]
                                       + [[0.0] * 3] * 5})
    size = 128
    codes = renderer.codes([target], size, size)
    buffers = renderer.render(codes, size)
    image = (buffers.rendered[0] * buffers.mask[0] + 0.4 * (1 - buffers.mask[0])).clamp(0, 1)
    image = np.round(image.numpy() * 255).astype(np.uint8)
    vertices = renderer.vertices(codes)
    ndc, depth = project(embedding.points(vertices, model.triangles), renderer.cameras(codes),
                         size, size)
    landmarks = screen_space(ndc, depth, renderer.cameras(codes), size, size)[0][0].double()
    settings = FitSettings(rigid_steps=60, shape_steps=40, light_steps=150, refine_steps=0,
                           render_size=size, n_shape=0, n_expression=0)
    result = fit_aligned(image, landmarks.numpy() - 0.5, model, embedding, settings,
                         texture=texture)
    fitted = np.array(result.params.appearance.texture)
    assert fitted.shape == (50,) and np.allclose(result.albedo_gain, 1)
    assert np.corrcoef(fitted, truth)[0, 1] > 0.8
    without = fit_aligned(image, landmarks.numpy() - 0.5, model, embedding, settings)
    assert without.params.appearance.texture == []
    final = [h for h in result.history if h["stage"] == "light"][-1]["photo"]
    plain = [h for h in without.history if h["stage"] == "light"][-1]["photo"]
    assert final < 0.5 * plain


# ---------------------------------------------------------------------------- the wire

def test_clients_fetch_the_texture_space_the_backend_samples(flame, tmp_path):
    from portrait_rig import protocol
    from portrait_rig.client import Client, ServerError
    from portrait_rig.texture_space import TextureSpace
    from tests.support.server_process import ServerProcess

    model, texture, _ = flame
    home = tmp_path / "home"
    (home / "flame").mkdir(parents=True)
    (home / "flame" / "FLAME_texture.npz").write_bytes(texture.path.read_bytes())
    pkl = texture.path.parent / "generic_model.pkl"
    with ServerProcess("--model", str(pkl), env={"PORTRAIT_RIG_HOME": str(home)}) as server, \
            Client(server.host, server.port, timeout=60.0) as client:
        space = TextureSpace.from_wire(*client.fetch_texture(20))
        with pytest.raises(ServerError) as err:
            client.fetch_texture(-1)
        assert err.value.code == protocol.E_BAD_MESSAGE and err.value.field == "components"
    assert space.components == 20 and space.size == 256 and space.source == "FLAME_texture.npz"
    np.testing.assert_array_equal(space.face_uv, texture.texel_uv.numpy())
    code = np.random.default_rng(2).normal(size=30)         # longer than fetched: cut
    expected = texture.albedo_map(torch.tensor(code[None, :20], dtype=torch.float32))
    np.testing.assert_allclose(space.albedo(code), expected[0].permute(1, 2, 0).numpy(),
                               atol=2e-3)                  # directions travel as float16
    np.testing.assert_array_equal(space.albedo([]), texture.mean.permute(1, 2, 0).numpy())


def test_a_server_without_texture_space_says_so(tmp_path):
    from portrait_rig.client import Client
    from portrait_rig.texture_space import TextureSpace
    from tests.support.server_process import ServerProcess

    with ServerProcess("--model", "demo", env={"PORTRAIT_RIG_HOME": str(tmp_path)}) as server, \
            Client(server.host, server.port, timeout=60.0) as client:
        header, payload = client.fetch_texture()
    assert header["components"] == 0 and TextureSpace.from_wire(header, payload) is None
