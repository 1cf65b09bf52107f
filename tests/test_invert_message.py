"""The ``invert`` and ``identities`` messages: a photo sent to the real server becomes a named
identity in its data folder, which the stylerig backend then renders (with edit sliders)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from portrait_rig import protocol  # noqa: E402
from portrait_rig.client import Client, ServerError  # noqa: E402
from portrait_rig.params import Appearance, RigParams  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402
from tests.support.stylegan_fixtures import (SMALL_SG3_R, random_generator,  # noqa: E402
                                             write_nvidia_pickle, write_stylerig_home)

STEPS = 6


def encoded(array, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    G, direction = write_stylerig_home(home, direction_seed=0)
    with ServerProcess("--backend", "stylerig", "--model", "demo", "--quiet",
                       env={"PORTRAIT_RIG_HOME": str(home)}) as server, \
            Client(server.host, server.port, timeout=60.0) as client:
        yield client, home, G, direction


def frame_of(client, appearance: dict) -> np.ndarray:
    params = RigParams(appearance=Appearance.from_dict(appearance))
    frame = client.render(params, 16, 16, format="rgb8")
    return np.frombuffer(frame.pixels, np.uint8).reshape(16, 16, 3)


def expected_frame(G, ws: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        image = G.synthesis(ws[None], noise_mode="const")
    return (image[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_a_photo_becomes_a_named_identity_that_renders(served):
    client, home, G, direction = served
    previews = []
    reply = client.invert(encoded(skimage_data.astronaut(), "JPEG"), "astronaut", steps=STEPS,
                          seed=1, on_preview=previews.append)
    assert reply["type"] == "invert" and reply["name"] == "astronaut"
    assert reply["method"] == "optimisation" and reply["steps"] == STEPS
    assert (reply["num_ws"], reply["w_dim"]) == (G.num_ws, G.w_dim)
    assert reply["generator"] == "generator.pkl" and reply["photo_size"] == [512, 512]
    assert -0.2 < reply["roll"] < 0.0                    # the astronaut tilts her head
    assert reply["shift"][1] < -0.1                       # her face is above the centre
    assert 5 < reply["metrics"]["psnr"] < 40 and reply["metrics"]["identity_distance"] > 0
    assert [p.step for p in previews] == list(range(1, STEPS))
    assert all(p.steps == STEPS and p.width == 256 and "pixel" in p.header["losses"]
               for p in previews)
    assert Image.open(io.BytesIO(previews[0].pixels)).size == (256, 256)

    folder = home / "identities" / "astronaut"
    record = json.loads((folder / "identity.json").read_text())
    assert record["roll"] == pytest.approx(reply["roll"], abs=1e-6)
    ws = torch.from_numpy(np.load(folder / "latent.npz")["w"])
    assert ws.shape == (G.num_ws, G.w_dim)
    assert Image.open(folder / "preview.png").size == (4 * 256, 256)

    listing = client.identities()
    assert [i["name"] for i in listing["identities"]] == ["astronaut"]
    assert listing["edits"] == ["age"] and listing["personal_models"] == []

    # the identity renders; an edit slider moves its latent before synthesis
    assert np.abs(frame_of(client, {"identity": "astronaut"}).astype(int)
                  - expected_frame(G, ws)).max() <= 1
    edited = frame_of(client, {"identity": "astronaut", "edits": {"age": 3.0}})
    assert np.abs(edited.astype(int) - expected_frame(G, ws + 3.0 * direction)).max() <= 1
    assert np.abs(edited.astype(int) - expected_frame(G, ws - 3.0 * direction)).max() > 8


def test_invert_and_identity_errors_name_the_problem(served):
    client = served[0]
    with pytest.raises(ServerError) as error:
        client.invert(encoded(np.full((120, 160, 3), 90, np.uint8)), "grey", steps=2)
    assert error.value.code == protocol.E_NO_FACE
    for fields, field in (({"name": "../etc"}, "name"), ({"steps": -1}, "steps"),
                          ({"method": "magic"}, "method"), ({"steps": 0}, "steps")):
        header = {"type": "invert", "id": field, "name": "x", **fields}
        client.send(header, encoded(skimage_data.astronaut()))
        with pytest.raises(ServerError) as error:
            client.receive(timeout=60)
        assert (error.value.code, error.value.field) == (protocol.E_BAD_MESSAGE, field)
    with pytest.raises(ServerError) as error:
        client.invert(encoded(skimage_data.astronaut()), "x", method="encoder")
    assert error.value.code == "invert_failed" and "encoder.pt" in error.value.message
    with pytest.raises(ServerError) as error:
        frame_of(client, {"identity": "nobody"})
    assert error.value.code == protocol.E_RENDER_FAILED and "no identity named" in \
        error.value.message
    with pytest.raises(ServerError) as error:
        frame_of(client, {"identity": "astronaut", "edits": {"beard": 1.0}})
    assert "no edit direction named 'beard'" in error.value.message
    assert client.ping() < 5.0


def test_an_encoder_file_of_the_wrong_kind_is_reported(tmp_path):
    G = random_generator(SMALL_SG3_R, seed=3)
    (tmp_path / "stylegan").mkdir()
    write_nvidia_pickle(tmp_path / "stylegan" / "generator.pkl", G)
    torch.save({"g_ema": {}, "latent_avg": torch.zeros(8)}, tmp_path / "stylegan" / "encoder.pt")
    with ServerProcess("--backend", "stylerig", "--model", "demo", "--quiet",
                       env={"PORTRAIT_RIG_HOME": str(tmp_path)}) as server, \
            Client(server.host, server.port, timeout=60.0) as client:
        with pytest.raises(ServerError) as error:
            client.invert(encoded(skimage_data.astronaut()), "x", steps=2)
        assert error.value.code == "invert_failed"
        assert "encoder.pt: not an encoder checkpoint" in error.value.message
        assert client.ping() < 5.0
