"""Edit directions in the stylerig backend: W, W+ and StyleSpace files, applied where their
space says (before RigNet; on the style vectors), and ``appearance`` validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from portrait_rig.params import Appearance, ParamError, RigParams
from server.backends import create_backend
from server.backends.base import RenderRequest
from server.backends.directions import style_layers
from server.renderer.face_model import FaceModel
from tests.support.stylegan_fixtures import (SMALL_SG3_R, TINY_SG2, random_generator,
                                             write_nvidia_pickle)
from tests.support.stylerig_fixtures import write_random_rignet
from tests.support.synthetic_face import synthetic_face

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("directions")
    face = FaceModel(synthetic_face())
    G = random_generator(TINY_SG2, seed=1)
    write_nvidia_pickle(folder / "sg2.pkl", G)
    rng = np.random.RandomState(0)
    widths = [m.weight.shape[0] for _, m in style_layers(G)]
    files = folder / "edits"
    files.mkdir()
    np.save(files / "age_boundary.npy", rng.randn(1, G.w_dim).astype(np.float32))
    np.save(files / "boundary_smile.npy", rng.randn(G.num_ws, G.w_dim).astype(np.float32))
    style = np.zeros(sum(widths), np.float32)
    style[widths[0] + widths[1] + 2] = 1.5          # b4.conv1, b4.torgb, then b8.conv0: ch. 2
    np.save(files / "eyes.npy", style[None])
    np.save(files / "broken.npy", np.zeros(7, np.float32))
    write_random_rignet(folder / "rignet.safetensors", G, face.data.n_expression, seed=0)
    backend = create_backend("stylerig", face, "cpu", generator=str(folder / "sg2.pkl"),
                             rignet=str(folder / "rignet.safetensors"), directions=str(files),
                             framing="rig")
    return backend, G, files


def frame(backend, **appearance) -> np.ndarray:
    params = RigParams(appearance=Appearance(seed=4, **appearance))
    params.pose.jaw = [0.2, 0.0, 0.0]
    return backend.render([RenderRequest(params, SIZE, SIZE)])[0].image[..., :3].astype(int)


def test_latent_directions_move_the_identity_before_rignet(setup, tmp_path):
    from server import paths

    backend, G, files = setup
    paths.allow_folders([str(tmp_path)])          # requests name files only in allowed ones
    assert backend.directions.kinds == {"age": "w", "smile": "w+", "eyes": "s"}
    w = G.mapping(torch.from_numpy(np.random.RandomState(4).randn(1, G.z_dim)).float(),
                  truncation_psi=0.7)[0]
    age = torch.from_numpy(np.load(files / "age_boundary.npy"))[0]
    smile = torch.from_numpy(np.load(files / "boundary_smile.npy"))
    for edits, moved in (({"age": 1.5}, w + 1.5 * age), ({"smile": -2.0}, w - 2.0 * smile),
                         ({"age": 1.0, "smile": 0.5}, w + age + 0.5 * smile)):
        np.save(tmp_path / "moved.npy", moved.numpy())
        expected = frame(backend, latent_file=str(tmp_path / "moved.npy"))
        np.testing.assert_array_equal(frame(backend, edits=edits), expected)
    assert np.abs(frame(backend, edits={"age": 1.5}) - frame(backend)).max() > 2
    paths.allow_folders(())


def test_style_directions_shift_one_style_vector(setup):
    backend, G, _ = setup
    affine = backend.G.synthesis.b8.conv0.affine
    reference = frame(backend)
    edited = frame(backend, edits={"eyes": 2.0})
    assert np.abs(edited - reference).max() > 2
    with torch.no_grad():
        affine.bias[2] += 3.0                        # 2.0 x 1.5, through the bias (gain 1)
        try:
            shifted = frame(backend)
        finally:
            affine.bias[2] -= 3.0
    np.testing.assert_array_equal(edited, shifted)
    np.testing.assert_array_equal(frame(backend), reference)     # the hooks are gone


def test_unknown_directions_and_bad_appearance_are_refused(setup):
    backend = setup[0]
    with pytest.raises(ValueError, match="no edit direction named 'broken'"):
        frame(backend, edits={"broken": 1.0})
    for data, field in (({"edits": {"age": 1e9}}, "appearance.edits.age"),
                        ({"edits": {"../x": 1.0}}, "appearance.edits"),
                        ({"edits": [1, 2]}, "appearance.edits"),
                        ({"identity": "a/b"}, "appearance.identity"),
                        ({"identity": ".."}, "appearance.identity")):
        with pytest.raises(ParamError) as error:
            Appearance.from_dict(data)
        assert error.value.field == field
    appearance = Appearance.from_dict({"identity": "alice_2", "edits": {"age": 2}})
    assert appearance.to_dict()["edits"] == {"age": 2.0} and appearance.identity == "alice_2"


def test_sg3_style_layers_cover_every_synthesis_layer():
    G = random_generator(SMALL_SG3_R)
    layers = style_layers(G)
    assert [name for name, _ in layers] == G.synthesis.layer_names
