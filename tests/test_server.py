"""The render server end to end: a real server subprocess (preview backend, demo head) on an
ephemeral port, driven through real sockets with ``portrait_rig.client``; then the render
worker's scheduling on its own, with a recording backend."""

from __future__ import annotations

import io
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from portrait_rig import protocol
from portrait_rig.client import Client, Frame, Pong, ServerError, Superseded
from portrait_rig.face_data import FaceData
from portrait_rig.face_source import load_face_data
from portrait_rig.params import RigParams

from tests.support.server_process import REPO, ServerProcess

TOKEN = "correct horse battery staple"
W, H = 96, 64                     # not square: catches swapped axes


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--backend", "preview", "--model", "demo", "--token", TOKEN) as proc:
        yield proc


@pytest.fixture
def client(server):
    with Client(server.host, server.port, token=TOKEN, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="module")
def demo():
    return load_face_data("demo")


def smile(i: float = 1.0) -> dict:
    return {"expression": [0.5 * i, -0.3], "pose": {"jaw": [0.1 * i, 0.0, 0.0],
                                                    "global": [0.0, 0.2, 0.0]}}


def as_array(frame: Frame, channels: int) -> np.ndarray:
    return np.frombuffer(frame.pixels, np.uint8).reshape(frame.height, frame.width, channels)


def decode(frame: Frame) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(bytes(frame.pixels))))


def raw_send(client: Client, data: bytes) -> None:
    client._sock.sendall(data)


def frame_message(header: dict) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body


# ---------------------------------------------------------------------------- handshake

def test_hello_describes_server(client, demo):
    hello = client.hello
    assert hello["protocol"] == protocol.PROTOCOL_VERSION
    assert hello["default_backend"] == "preview"
    assert "preview" in [b["name"] for b in hello["backends"]]
    assert all(b["description"] for b in hello["backends"])
    assert hello["face_model"] == demo.summary()
    assert hello["limits"]["max_frame_side"] == protocol.MAX_FRAME_SIDE
    assert set(hello["formats"]) == set(protocol.FRAME_FORMATS)


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + " "])
def test_wrong_or_missing_token_is_refused(server, token):
    with pytest.raises(ServerError) as err:
        Client(server.host, server.port, token=token, timeout=10.0).connect()
    assert err.value.code == protocol.E_UNAUTHORIZED


def _raw_exchange(server, messages: list[dict]) -> list[dict]:
    """Send messages on a fresh socket and read until the server closes it (a socket
    timeout fails the test); returns the replies' headers."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"".join(frame_message(m) for m in messages))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    replies = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        replies.append(json.loads(data[4:4 + n]))
        data = data[4 + n + replies[-1].get("payload_bytes", 0):]
    return replies


def test_version_mismatch_is_refused_and_closed(server):
    replies = _raw_exchange(server, [{"type": "hello", "protocol": 2, "token": TOKEN},
                                     {"type": "ping", "id": 1}])
    assert [r["code"] for r in replies] == [protocol.E_VERSION]


def test_request_before_hello_is_refused_and_closed(server):
    replies = _raw_exchange(server, [{"type": "ping", "id": 1}, {"type": "ping", "id": 2}])
    assert [r["code"] for r in replies] == [protocol.E_UNAUTHORIZED]


def test_non_loopback_without_token_refuses_to_start():
    # parse_args refuses before anything binds, so nothing ever listens publicly.
    run = subprocess.run([sys.executable, "-m", "server", "--host", "0.0.0.0", "--port", "0"],
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "without a token" in run.stderr and "--token" in run.stderr
    assert "listening" not in run.stdout


# ---------------------------------------------------------------------------- data

def test_model_arrays_equal_face_source(client, demo):
    header, payload = client.fetch_model()
    received = FaceData.from_wire(header, payload)
    for name, array in demo.arrays().items():
        np.testing.assert_array_equal(received.arrays()[name], array, err_msg=name)
    assert received.meta() == demo.meta()


def test_vertices_equal_local_face_model(client, demo):
    from server.renderer.face_model import FaceModel

    params = RigParams.from_dict(smile())
    reply = client.vertices(params)
    got = np.frombuffer(reply.data, np.float32).reshape(reply.count, 3)
    want = FaceModel(demo).pose_params([params])[0][0].numpy()
    assert reply.count == demo.n_vertices
    np.testing.assert_allclose(got, want, atol=1e-6)
    rest = np.frombuffer(client.vertices({}).data, np.float32).reshape(-1, 3)
    assert np.abs(got - rest).max() > 1e-3          # the pose really moved the mesh


# ---------------------------------------------------------------------------- frames

def test_formats_decode_to_the_same_image(client):
    rgb = client.render(smile(), W, H, format="rgb8")
    rgba = client.render(smile(), W, H, format="rgba8")
    png = client.render(smile(), W, H, format="png")
    jpeg = client.render(smile(), W, H, format="jpeg", quality=95)
    assert (rgb.width, rgb.height, len(rgb.pixels)) == (W, H, W * H * 3)
    assert len(rgba.pixels) == W * H * 4

    rgb_px, rgba_px = as_array(rgb, 3), as_array(rgba, 4)
    png_px, jpeg_px = decode(png), decode(jpeg)
    assert png_px.shape == (H, W, 4) and jpeg_px.shape == (H, W, 3)
    np.testing.assert_array_equal(rgba_px[..., :3], rgb_px)
    np.testing.assert_array_equal(png_px, rgba_px)
    assert np.abs(jpeg_px.astype(int) - rgb_px).mean() < 4.0
    # A face is drawn: the alpha mask covers part of the frame, not all of it.
    coverage = (rgba_px[..., 3] > 0).mean()
    assert 0.05 < coverage < 0.95
    assert {"queue", "render", "pack", "total"} <= set(rgb.timings)
    assert rgb.timings["total"] >= rgb.timings["render"]


def test_passes_have_the_requested_layout(client):
    names = list(protocol.PASSES)
    frame = client.render(smile(), W, H, format="rgba8", passes=names)
    assert list(frame.passes) == names
    for name, (channels, floats) in frame.passes.items():
        assert channels == protocol.PASSES[name]
        assert len(floats) == W * H * channels, name
        assert np.isfinite(np.asarray(floats)).all(), name
    mask = np.asarray(frame.passes["mask"][1]).reshape(H, W)
    alpha = as_array(frame, 4)[..., 3]
    assert ((mask > 0.5) == (alpha > 127)).mean() > 0.99
    # Interpolated unit normals: length 1 on smooth patches, a little less across creases.
    normal = np.asarray(frame.passes["normal"][1]).reshape(H, W, 3)[mask > 0.5]
    length = np.linalg.norm(normal, axis=-1)
    assert np.median(length) > 0.98 and length.max() < 1.001
    assert (np.asarray(frame.passes["normal"][1]).reshape(H, W, 3)[mask == 0] == 0).all()


def test_parameters_change_the_frame(client):
    a = as_array(client.render({}, W, H), 3)
    b = as_array(client.render(smile(), W, H), 3)
    assert np.abs(a.astype(int) - b).max() > 0


# ---------------------------------------------------------------------------- errors

class Witness(threading.Thread):
    """A second client rendering continuously while another misbehaves."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.client = Client(server.host, server.port, token=TOKEN, timeout=30.0)
        self.client.connect()
        self.stop, self.frames, self.errors = threading.Event(), 0, []

    def run(self):
        while not self.stop.is_set():
            try:
                frame = self.client.render({}, 32, 32)
                self.frames += frame.width == 32
            except Exception as exc:  # noqa: BLE001 - recorded, asserted on
                self.errors.append(exc)
                return

    def finish(self) -> int:
        self.stop.set()
        self.join(30)
        self.client.close()
        assert not self.errors, self.errors
        return self.frames


def expect_error(client: Client, code: str, rid=None) -> ServerError:
    with pytest.raises(ServerError) as err:
        reply = client.receive()
        pytest.fail(f"expected {code}, got {reply}")
    assert err.value.code == code, err.value
    assert err.value.id == rid
    return err.value


def test_malformed_messages_get_errors_and_others_keep_rendering(server, client):
    witness = Witness(server)
    witness.start()
    frames_before = witness.frames

    body = b'{"type": "render", "id": 1, '                      # truncated JSON
    raw_send(client, struct.pack(">I", len(body)) + body)
    expect_error(client, protocol.E_BAD_MESSAGE)

    client.send({"type": "teleport", "id": 2})
    assert expect_error(client, protocol.E_BAD_MESSAGE, 2).field == "type"

    client.send_render({"pose": {"jaw": [0.1, 0.0]}}, W, H, id=3)
    err = expect_error(client, protocol.E_BAD_PARAMS, 3)
    assert err.field == "pose.jaw" and "pose.jaw" in err.message

    client.send_render({"shape": [0.0] * 1000}, W, H, id=4)
    assert expect_error(client, protocol.E_BAD_PARAMS, 4).field == "shape"

    client.send_render({}, W, H, backend="no-such-backend", id=5)
    assert "no-such-backend" in expect_error(client, protocol.E_UNKNOWN_BACKEND, 5).message

    client.send_render({}, protocol.MAX_FRAME_SIDE + 1, H, id=6)
    assert expect_error(client, protocol.E_TOO_LARGE, 6).field == "width"

    client.send_render({}, W, H, format="webp", id=7)
    assert expect_error(client, protocol.E_BAD_MESSAGE, 7).field == "format"

    # Framing still intact: the same connection renders.
    assert client.render({}, W, H).width == W

    # An oversized header length cannot be trusted: error, then the connection closes.
    raw_send(client, struct.pack(">I", protocol.MAX_HEADER_BYTES + 1))
    expect_error(client, protocol.E_TOO_LARGE)
    with pytest.raises(ConnectionError):
        client.receive()

    time.sleep(0.2)
    assert witness.finish() > frames_before


def test_too_large_payload_is_skipped(client):
    header = frame_message({"type": "ping", "id": 1,
                            "payload_bytes": protocol.MAX_CLIENT_PAYLOAD + 1})
    raw_send(client, header + b"\0" * (protocol.MAX_CLIENT_PAYLOAD + 1))
    expect_error(client, protocol.E_TOO_LARGE)
    assert client.ping() < 5.0


# ---------------------------------------------------------------------------- scheduling

def test_live_requests_are_latest_wins(client):
    ids = [client.send_render(smile(i / 20), W, H, mode="live") for i in range(20)]
    replies = {}
    while len(replies) < len(ids):
        reply = client.receive()
        assert reply.id not in replies, f"request {reply.id} answered twice"
        replies[reply.id] = reply
    assert set(replies) == set(ids)
    superseded = [r for r in replies.values() if isinstance(r, Superseded)]
    assert superseded, "20 back-to-back live requests, none superseded"
    assert all(ids.index(r.by) > ids.index(r.id) for r in superseded)
    assert isinstance(replies[ids[-1]], Frame)
    with pytest.raises(TimeoutError):
        client.receive(timeout=0.3)                  # nothing answered twice, late


def turned(i: int) -> dict:
    return {"pose": {"global": [0.0, 0.08 * i - 0.4, 0.0]}}


def test_batch_requests_are_all_answered_in_order(client):
    ids = [client.send_render(turned(i), 48, 48, mode="batch") for i in range(12)]
    replies = [client.receive() for _ in ids]
    assert [r.id for r in replies] == ids
    assert all(isinstance(r, Frame) for r in replies)
    # Grouped or not, each request got its own head turn: every frame matches its own
    # parameters rendered alone (batched float maths may move a value by 1) and no other.
    alone = [as_array(client.render(turned(i), 48, 48), 3).astype(int) for i in (0, 11)]
    for reply, own, other in ((replies[0], *alone), (replies[-1], *alone[::-1])):
        got = as_array(reply, 3)
        assert np.abs(got - own).max() <= 2
        assert np.abs(got - other).mean() > 5


def test_batch_queue_limit(server, client):
    limit = client.hello["limits"]["max_queued_batch"]
    count = limit + 30
    messages = [frame_message({"type": "render", "id": i, "params": {}, "width": 16,
                               "height": 16}) for i in range(count)]
    raw_send(client, b"".join(messages))
    frames, full = [], []
    for _ in range(count):
        try:
            frames.append(client.receive().id)
        except ServerError as err:
            assert err.code == protocol.E_QUEUE_FULL, err
            full.append(err.id)
    assert full and len(frames) >= limit
    assert frames == sorted(frames) and sorted(frames + full) == list(range(count))


def test_a_client_that_does_not_read_is_not_rendered_ahead(server, client):
    # ~4 MiB frames, 96 MiB in all; alternating sizes keep each in its own backend call, so
    # each frame is sent as soon as it is rendered.
    count = 24
    ids = [client.send_render({}, 1024 - 8 * (i % 2), 1024, format="rgba8")
           for i in range(count)]
    peer = "%s:%d" % client._sock.getsockname()[:2]

    def rendered() -> int:
        return sum(1 for line in server.log().splitlines()
                   if line.startswith(peer + " ") and "status=ok" in line)

    # Wait until the server stops rendering for us (or has rendered everything).
    last, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline and last != (now := rendered()):
        last = now
        time.sleep(1.5)
    assert last < count // 2, f"{last} of {count} unread 4 MiB frames rendered ahead"
    # Reading resumes the rendering: everything arrives, in order.
    assert [client.receive().id for _ in ids] == ids


def test_rate_limit(client):
    burst = client.hello["limits"]["burst"]
    count = 3 * burst
    raw_send(client, b"".join(frame_message({"type": "ping", "id": i}) for i in range(count)))
    answered, limited = set(), set()
    for _ in range(count):
        try:
            reply = client.receive()
            assert isinstance(reply, Pong)
            answered.add(reply.id)
        except ServerError as err:
            assert err.code == protocol.E_RATE_LIMITED, err
            limited.add(err.id)
    assert len(limited) >= burst and len(answered) >= burst
    assert answered | limited == set(range(count)) and not answered & limited
    time.sleep(0.5)                                  # the bucket refills
    assert client.ping() < 5.0


# ---------------------------------------------------------------------------- shutdown

def test_sigterm_answers_queued_requests_and_exits_cleanly():
    with ServerProcess("--backend", "preview", "--model", "demo") as proc:
        client = Client(proc.host, proc.port, timeout=30.0)
        client.connect()
        ids = [client.send_render(smile(i / 30), 256, 256) for i in range(30)]
        client.receive()                               # the worker is busy
        proc.proc.send_signal(signal.SIGTERM)
        answered = {ids[0]}
        with pytest.raises(ConnectionError):
            while True:
                try:
                    answered.add(client.receive().id)
                except ServerError as err:
                    assert err.code == protocol.E_SHUTTING_DOWN
                    answered.add(err.id)
        assert answered == set(ids)
        assert proc.proc.wait(10) == 0                 # bounded: exits, with status 0
        assert "shutting down" in proc.log()


# ---------------------------------------------------------------------------- the scheduler alone
# The scheduler in this process with recording backends: grouping, ordering, fairness, lanes
# and failure isolation, deterministically (jobs are queued before the lanes take any).

class RecordingBackend:
    """Fills each frame with its request's ``appearance.seed``; seed 13 raises."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def warmup(self):
        pass

    def render(self, requests):
        from server.backends.base import RenderResult

        seeds = [r.params.appearance.seed for r in requests]
        self.calls.append(seeds)
        if 13 in seeds:
            raise RuntimeError("seed 13 is unlucky")
        return [RenderResult(np.full((r.height, r.width, 4), seed, np.uint8),
                             {name: np.zeros((r.height, r.width, protocol.PASSES[name]),
                                             np.float32) for name in r.passes})
                for r, seed in zip(requests, seeds)]


class BlockingBackend(RecordingBackend):
    """Renders once ``release`` is set; ``entered`` is set when a render begins."""

    def __init__(self):
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def render(self, requests):
        self.entered.set()
        assert self.release.wait(30)
        return super().render(requests)


def make_scheduler(backends: dict, **options):
    from tests.support.synthetic_face import synthetic_face

    from server.service.scheduler import Scheduler

    return Scheduler(synthetic_face(), "cpu", next(iter(backends)),
                     lambda name, *_: backends[name], **options)


def run_scheduler(jobs, max_batch=8, clients=None, on_answer=None, **options):
    """Queue ``jobs`` (their ``owner`` fields name connections; ``clients`` maps an owner to
    its client, default itself) before starting a scheduler with a RecordingBackend; returns
    the backend and {job id: (buffers, error)} once all are done. ``on_answer(job)`` is
    called with each answer."""
    backend = RecordingBackend()
    scheduler = make_scheduler({"rec": backend}, max_batch=max_batch, **options)
    replies, finished = {}, threading.Event()

    def done(job, buffers, error):
        if on_answer is not None:
            on_answer(job)
        replies[job.id] = (buffers, error)
        if len(replies) == len(jobs):
            finished.set()

    superseded = []
    for owner in dict.fromkeys(job.owner for job in jobs):
        scheduler.register(owner, client=(clients or {}).get(owner))
    for job in jobs:
        job.done = done
        old = scheduler.submit(job)
        if old is not None:
            superseded.append(old.id)
            replies[old.id] = ("superseded", None)
    scheduler.start(timeout=30)
    try:
        assert finished.wait(30), f"only {sorted(replies)} answered"
    finally:
        scheduler.stop()
        scheduler.join(5)
    return backend, replies, superseded


def job(rid, seed, owner="a", size=8, mode="batch", backend="rec", passes=()):
    from server.service.jobs import Job

    params = RigParams.from_dict({"appearance": {"seed": seed}})
    return Job("render", rid, params, owner=owner, width=size, height=size,
               backend=backend, mode=mode, passes=tuple(passes))


def test_worker_groups_compatible_requests_in_order():
    jobs = [job(i, i, size=8) for i in range(5)] + [job(5, 5, size=16), job(6, 6, size=8)]
    backend, replies, _ = run_scheduler(jobs, max_batch=4)
    # Groups: heads of the queue with equal keys, capped at max_batch, never reordered.
    assert backend.calls == [[0, 1, 2, 3], [4], [5], [6]]
    for rid in range(7):
        buffers, error = replies[rid]
        header, payload = parse_reply(buffers)
        assert error is None and header["id"] == rid
        assert set(payload) == {rid}                  # each request got its own frame


def test_worker_groups_across_connections_and_isolates_failures():
    jobs = [job(1, 1, owner="a"), job(2, 13, owner="b"), job(3, 3, owner="c")]
    backend, replies, _ = run_scheduler(jobs)
    assert backend.calls[0] == [1, 13, 3]             # one call for three connections
    assert sorted(backend.calls[1:]) == [[1], [3], [13]]   # retried one by one
    assert replies[2][1].code == protocol.E_RENDER_FAILED
    assert "unlucky" in str(replies[2][1])
    assert parse_reply(replies[1][0])[0]["type"] == "frame"
    assert parse_reply(replies[3][0])[0]["type"] == "frame"


def test_worker_live_slot_keeps_only_the_newest():
    jobs = [job(i, i, mode="live") for i in range(5)] + [job(9, 9, mode="batch")]
    backend, replies, superseded = run_scheduler(jobs)
    assert superseded == [0, 1, 2, 3]
    assert backend.calls == [[4], [9]]                # live before batch, stale never rendered


def test_a_batch_holds_at_most_max_batch_bytes_of_replies():
    # Frames of 32x32 with every pass are 60 KiB of reply each: 3 fit in 200 KB.
    every = list(protocol.PASSES)
    jobs = [job(i, i, size=32, passes=every) for i in range(7)]
    backend, replies, _ = run_scheduler(jobs, max_batch_bytes=200_000)
    assert backend.calls == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(error is None for _, error in replies.values())


def test_frames_of_a_batch_are_released_as_they_are_sent(monkeypatch):
    from server.service import worker

    events = []
    encode = worker.frame_codec.encode_frame

    def recording_encode(header, *args, **kwargs):
        events.append(("encode", header["id"]))
        return encode(header, *args, **kwargs)

    monkeypatch.setattr(worker.frame_codec, "encode_frame", recording_encode)
    run_scheduler([job(i, i) for i in range(3)],
                  on_answer=lambda answered: events.append(("answer", answered.id)))
    assert events == [("encode", 0), ("answer", 0), ("encode", 1), ("answer", 1),
                      ("encode", 2), ("answer", 2)]


def test_clients_get_turns_however_many_connections_they_open():
    # Client "storm" has 5 connections with 3 requests each, client "artist" one request:
    # with fair queuing the artist waits for at most one of the storm's renders.
    storm = [job(10 * c + i, 10 * c + i, owner=f"storm{c}", size=8 + c) for c in range(5)
             for i in range(3)]
    artist = job(99, 99, owner="artist", size=64)
    clients = {f"storm{c}": "127.0.0.2" for c in range(5)} | {"artist": "127.0.0.1"}
    backend, _, _ = run_scheduler(storm + [artist], max_batch=1, clients=clients)
    order = [seeds[0] for seeds in backend.calls]
    assert order.index(99) <= 1, order


def test_a_live_request_never_waits_behind_another_backends_render():
    slow, fast = BlockingBackend(), RecordingBackend()
    scheduler = make_scheduler({"rec": fast, "slow": slow})
    scheduler.register("batch-client")
    scheduler.register("artist")
    scheduler.start(timeout=30)
    answered = {}
    try:
        long_job = job(1, 1, owner="batch-client", backend="slow")
        long_job.done = lambda j, b, e: answered.setdefault(j.id, threading.Event()).set()
        scheduler.submit(long_job)
        assert slow.entered.wait(30)
        live = job(2, 2, owner="artist", mode="live")
        arrived = threading.Event()
        live.done = lambda j, b, e: arrived.set()
        scheduler.submit(live)
        assert arrived.wait(30), "the live request waited for the other backend"
        assert not slow.release.is_set() and fast.calls == [[2]]
    finally:
        slow.release.set()
        scheduler.stop()
        scheduler.join(5)


def parse_reply(buffers) -> tuple[dict, bytes]:
    wire = b"".join(bytes(b) for b in buffers)
    (n,) = struct.unpack(">I", wire[:4])
    return json.loads(wire[4:4 + n]), wire[4 + n:]
