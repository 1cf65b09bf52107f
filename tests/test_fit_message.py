"""The ``fit`` message: a photo sent to the real server, rig parameters back."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from portrait_rig import protocol  # noqa: E402
from portrait_rig.client import Client, ServerError  # noqa: E402
from portrait_rig.params import RigParams  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402


def encoded(array, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client():
    with ServerProcess("--backend", "preview", "--model", "demo") as server, \
            Client(server.host, server.port, timeout=30.0) as c:
        yield c


def test_a_photo_comes_back_as_rig_parameters(client):
    photo = skimage_data.astronaut()
    reply = client.fit(encoded(photo, "JPEG"))
    params = RigParams.from_dict(reply["params"])          # a valid rig, as the add-on reads it
    assert reply["type"] == "fit" and reply["method"] == "optimisation"
    assert params.camera.type == "orthographic" and 6 < params.camera.scale < 9
    assert len(params.shape) == 14 and len(params.expression) == 14
    assert max(abs(a) for a in params.pose.global_) < 0.3 and params.lighting.sh[0][0] > 0
    assert reply["landmark_error"] < 3.5 and reply["aligned_size"] == 256
    assert reply["photo_size"] == [512, 512] and len(reply["albedo_gain"]) == 3
    left, top, right, bottom = reply["face_box"]
    landmarks = np.array(reply["landmarks"])
    assert landmarks.shape == (68, 2)
    assert (landmarks[:, 0] > left - 10).all() and (landmarks[:, 0] < right + 10).all()
    assert client.ping() < 5.0                            # the connection serves on


def test_fit_errors_name_the_problem(client):
    with pytest.raises(ServerError) as error:
        client.fit(encoded(np.full((120, 160, 3), 90, np.uint8)))
    assert error.value.code == protocol.E_NO_FACE and "no face found" in error.value.message

    client.send({"type": "fit", "id": "junk"}, b"\x89PNG but not really")
    with pytest.raises(ServerError) as error:
        client.receive()
    assert (error.value.code, error.value.id, error.value.field) == \
        (protocol.E_BAD_MESSAGE, "junk", "payload")

    client.send({"type": "fit", "id": "empty"})
    with pytest.raises(ServerError) as error:
        client.receive()
    assert (error.value.code, error.value.field) == (protocol.E_BAD_MESSAGE, "payload")

    # other messages still refuse payloads
    client.send({"type": "ping", "id": "p"}, b"x")
    with pytest.raises(ServerError) as error:
        client.receive()
    assert error.value.field == "payload_bytes"
    assert client.ping() < 5.0
