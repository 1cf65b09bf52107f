"""Wire protocol v1: framing, the frame byte layout, the client's failure modes, and a client
written from docs/protocol.md alone talking to the real server."""

from __future__ import annotations

import json
import socket
import struct
import threading

import numpy as np
import pytest

from portrait_rig import protocol
from portrait_rig.client import Client
from server.service import frame_codec

from tests.support.server_process import ServerProcess


# ---------------------------------------------------------------------------- framing

def test_header_round_trip():
    wire = protocol.encode_header({"type": "render", "id": 3}, payload_bytes=12)
    (n,) = struct.unpack(">I", wire[:4])
    assert n == len(wire) - 4 == protocol.header_length(wire[:4])
    header, nbytes = protocol.decode_header(wire[4:], max_payload=12)
    assert header == {"type": "render", "id": 3, "payload_bytes": 12} and nbytes == 12


@pytest.mark.parametrize("prefix, code", [(0, protocol.E_BAD_MESSAGE),
                                          (protocol.MAX_HEADER_BYTES + 1, protocol.E_TOO_LARGE)])
def test_bad_header_length(prefix, code):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.header_length(struct.pack(">I", prefix))
    assert err.value.code == code


@pytest.mark.parametrize("body, code", [
    (b"{not json", protocol.E_BAD_MESSAGE),
    (b"[1, 2]", protocol.E_BAD_MESSAGE),
    (b'{"id": 1}', protocol.E_BAD_MESSAGE),
    (b'{"type": "ping", "payload_bytes": -1}', protocol.E_BAD_MESSAGE),
    (b'{"type": "ping", "payload_bytes": 101}', protocol.E_TOO_LARGE),
    (b"\xff\xfe", protocol.E_BAD_MESSAGE),
])
def test_bad_header_body(body, code):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_header(body, max_payload=100)
    assert err.value.code == code


def test_nan_is_not_sent():
    with pytest.raises(ValueError):
        protocol.encode_header({"type": "x", "v": float("nan")})


# ---------------------------------------------------------------------------- frame layout

def parse_as_documented(buffers) -> tuple[dict, bytes]:
    """Read one message the way docs/protocol.md section 2 describes."""
    wire = b"".join(bytes(b) for b in buffers)
    (n,) = struct.unpack(">I", wire[:4])
    header = json.loads(wire[4:4 + n].decode("utf-8"))
    payload = wire[4 + n:]
    assert len(payload) == header.get("payload_bytes", 0)
    return header, payload


@pytest.mark.parametrize("fmt", ["rgb8", "rgba8"])
def test_frame_layout_matches_the_spec(fmt):
    rng = np.random.default_rng(1)
    height, width = 3, 5                       # 45 RGB bytes: the first pass needs padding
    image = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    passes = {"depth": rng.random((height, width, 1), dtype=np.float32),
              "normal": rng.random((height, width, 3), dtype=np.float32)}
    buffers = frame_codec.encode_frame(
        {"type": "frame", "id": 9, "width": width, "height": height, "format": fmt},
        image, passes, ("normal", "depth"), fmt, finish_timings=lambda: {"total": 1.0})
    assert len(buffers) == 1                   # header and payload in one send buffer
    header, payload = parse_as_documented(buffers)

    channels = protocol.FRAME_FORMATS[fmt]
    assert header["image_bytes"] == width * height * channels
    pixels = np.frombuffer(payload[:header["image_bytes"]], np.uint8)
    np.testing.assert_array_equal(pixels.reshape(height, width, channels),
                                  image[..., :channels])
    assert [p["name"] for p in header["passes"]] == ["normal", "depth"]
    # Passes follow the frame after at most 3 bytes of padding, back to back.
    ends = [header["image_bytes"]] + [p["offset"] + p["nbytes"] for p in header["passes"]]
    assert header["passes"][0]["offset"] - ends[0] in range(4)
    assert [p["offset"] for p in header["passes"][1:]] == ends[1:-1]
    assert ends[-1] == len(payload)
    for entry in header["passes"]:
        assert entry["offset"] % 4 == 0 and entry["dtype"] == "float32"
        data = np.frombuffer(payload[entry["offset"]:entry["offset"] + entry["nbytes"]], "<f4")
        np.testing.assert_array_equal(data.reshape(height, width, entry["channels"]),
                                      passes[entry["name"]])
    assert header["timings"] == {"total": 1.0} and header["id"] == 9


def test_frame_encoder_rejects_mismatched_results():
    header = {"type": "frame", "id": 1, "width": 4, "height": 2, "format": "rgb8"}
    image = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(frame_codec.EncodeError, match="expected uint8"):
        frame_codec.encode_frame(header, image[:, :3], {}, (), "rgb8")
    with pytest.raises(frame_codec.EncodeError, match="pass 'mask'"):
        frame_codec.encode_frame(header, image, {}, ("mask",), "rgb8")
    with pytest.raises(frame_codec.EncodeError, match="pass 'mask'"):
        frame_codec.encode_frame(header, image, {"mask": np.zeros((2, 4, 3), np.float32)},
                                 ("mask",), "rgb8")


def test_oversized_header_falls_back_to_two_buffers():
    message = frame_codec.MessageBuffer(3)
    message.payload[:] = [1, 2, 3]
    buffers = message.finish({"type": "x", "pad": "a" * (2 * frame_codec.HEADER_ROOM)})
    header, payload = parse_as_documented(buffers)
    assert len(buffers) == 2 and payload == b"\x01\x02\x03"


def test_vertices_layout():
    verts = np.arange(12, dtype=np.float64).reshape(4, 3)
    header, payload = parse_as_documented(
        frame_codec.encode_vertices({"type": "vertices", "id": 2}, verts))
    assert header["count"] == 4 and header["shape"] == [4, 3]
    np.testing.assert_array_equal(np.frombuffer(payload, "<f4").reshape(4, 3), verts)


# ---------------------------------------------------------------------------- client failures

@pytest.fixture
def silent_server():
    """A TCP listener that accepts and then says nothing (or hangs up on request)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        try:
            conn, _ = listener.accept()
            accepted.append(conn)
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    listener.close()
    thread.join(5)
    for conn in accepted:
        conn.close()


def test_client_times_out_instead_of_hanging(silent_server):
    port, _ = silent_server
    client = Client("127.0.0.1", port, timeout=0.3)
    with pytest.raises(TimeoutError, match="no reply"):
        client.connect()


def test_client_reports_a_connection_closed_mid_message(silent_server):
    port, accepted = silent_server
    client = Client("127.0.0.1", port, timeout=5.0)

    def reply_half_then_hang_up():
        while not accepted:
            threading.Event().wait(0.01)
        accepted[0].recv(65536)                 # the client's hello: read it, then answer
        body = b'{"type":"hello","protocol":1,"payload_bytes":100}'
        accepted[0].sendall(struct.pack(">I", len(body)) + body + b"\0" * 10)
        accepted[0].close()

    threading.Thread(target=reply_half_then_hang_up, daemon=True).start()
    with pytest.raises(ConnectionError, match="closed the connection"):
        client.connect()


def test_client_without_server():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]           # a port nobody listens on once closed
    with pytest.raises(ConnectionError, match="cannot connect"):
        Client("127.0.0.1", port, timeout=2.0).connect()


# ---------------------------------------------------------------------------- the spec suffices

@pytest.fixture(scope="module")
def server():
    with ServerProcess("--backend", "preview", "--model", "demo") as proc:
        yield proc


def _doc_client_frame(host: str, port: int, params: dict, width: int, height: int):
    """docs/protocol.md section 11, followed literally: raw socket, struct and json."""

    def send(sock, header):
        body = json.dumps(header).encode()
        sock.sendall(struct.pack(">I", len(body)) + body)

    def recv_exact(sock, n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("closed")
            got += k
        return buf

    def recv(sock):
        (n,) = struct.unpack(">I", recv_exact(sock, 4))
        header = json.loads(recv_exact(sock, n))
        return header, recv_exact(sock, header.get("payload_bytes", 0))

    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send(sock, {"type": "hello", "protocol": 1, "client": "spec test"})
        hello, _ = recv(sock)
        assert hello["type"] == "hello" and hello["protocol"] == 1
        send(sock, {"type": "render", "id": 1, "params": params, "width": width,
                    "height": height, "format": "rgb8", "passes": ["depth", "mask"]})
        return recv(sock)


def test_client_written_from_the_spec_gets_a_correct_frame(server):
    params = {"pose": {"global": [0.0, 0.3, 0.0]}, "expression": [1.0]}
    width, height = 80, 48
    frame, payload = _doc_client_frame(server.host, server.port, params, width, height)

    assert frame["type"] == "frame" and frame["id"] == 1
    assert (frame["width"], frame["height"], frame["format"]) == (width, height, "rgb8")
    assert frame["image_bytes"] == width * height * 3
    rgb = np.frombuffer(payload[:frame["image_bytes"]], np.uint8).reshape(height, width, 3)
    depth, mask = frame["passes"]
    assert (depth["name"], depth["channels"], mask["name"], mask["channels"]) == \
        ("depth", 1, "mask", 1)
    mask_px = np.frombuffer(payload[mask["offset"]:mask["offset"] + mask["nbytes"]],
                            "<f4").reshape(height, width)

    # The same request through the project's client gives the same bytes.
    with Client(server.host, server.port, timeout=30.0) as client:
        reference = client.render(params, width, height, passes=["depth", "mask"])
    np.testing.assert_array_equal(
        rgb, np.frombuffer(reference.pixels, np.uint8).reshape(height, width, 3))
    np.testing.assert_array_equal(mask_px.ravel(), np.asarray(reference.passes["mask"][1]))
    assert 0.0 < mask_px.mean() < 1.0           # the face covers part of the frame
