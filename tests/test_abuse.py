"""The server as an attacker or a careless client would drive it, on loopback: clients that
never read, hostile names for files, malformed and oversized messages, work before the
handshake, connection storms and SIGTERM in the middle of renders. Every test runs a real
server subprocess and talks to it through real sockets; counts are bounded so each test
stays within seconds on two cores (``bench/bench_abuse.py`` runs the same at full scale).
"""

from __future__ import annotations

import io
import json
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from portrait_rig import protocol
from portrait_rig.client import Client, Frame, Preview, ServerError

from tests.support.server_process import ServerProcess

TOKEN = "abuse-suite-token"
HAVE_PROC = Path("/proc/self/status").exists()


# ---------------------------------------------------------------------------- raw sockets

def message(header: dict, payload: bytes = b"") -> bytes:
    if payload:
        header = dict(header, payload_bytes=len(payload))
    body = json.dumps(header, allow_nan=True).encode()
    return struct.pack(">I", len(body)) + body + payload


def raw_message(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Raw:
    """A socket speaking the wire format by hand (no client-side checks)."""

    def __init__(self, server, token: str | None = TOKEN, hello: bool = True,
                 rcvbuf: int | None = None, source: str | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:          # before connecting, so the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(30)
        self.sock.connect((server.host, server.port))
        self.peer = "%s:%d" % self.sock.getsockname()[:2]
        if hello:
            greeting = {"type": "hello", "protocol": 1, "client": "abuse"}
            if token is not None:
                greeting["token"] = token
            self.sock.sendall(message(greeting))
            reply, _ = self.recv()
            assert reply["type"] == "hello", reply

    @classmethod
    def around(cls, sock: socket.socket) -> "Raw":
        """A Raw on an accepted socket (the server's side of a fake server)."""
        raw = cls.__new__(cls)
        raw.sock = sock
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("closed")
            got += k
        return bytes(buf)

    def recv(self) -> tuple[dict, bytes]:
        (n,) = struct.unpack(">I", self.recv_exact(4))
        header = json.loads(self.recv_exact(n))
        return header, self.recv_exact(header.get("payload_bytes", 0))

    def recv_until_closed(self) -> list[dict]:
        """Headers of every reply until the server closes the connection (within the
        socket's timeout: a connection still open then fails the test)."""
        replies = []
        try:
            while True:
                replies.append(self.recv()[0])
        except socket.timeout:
            raise AssertionError(f"the server kept the connection open; got {replies}") \
                from None
        except (ConnectionError, OSError):
            return replies

    def close(self) -> None:
        self.sock.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def settle(read, quiet_s: float = 1.5, limit_s: float = 60.0):
    """Poll ``read()`` until it stops changing for ``quiet_s`` (or ``limit_s`` passes);
    returns the last value. Waits for the server to finish what it will do, asserts nothing."""
    last, since, end = read(), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.25)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def wait_until(condition, limit_s: float = 60.0) -> bool:
    """Poll ``condition()`` until it holds or ``limit_s`` passes; returns its last value."""
    end = time.monotonic() + limit_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.25)
    return condition()


def log_lines(server, peer: str, needle: str = "") -> int:
    return sum(1 for line in server.log().splitlines()
               if line.startswith(peer + " ") and needle in line)


def ping_works(server) -> bool:
    with Client(server.host, server.port, token=TOKEN, timeout=30.0) as other:
        return other.ping() >= 0.0


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--backend", "preview", "--model", "demo", "--token", TOKEN,
                       "--max-unsent", "1", "--write-timeout", "4") as proc:
        yield proc


# ---------------------------------------------------------------------------- memory

@pytest.mark.skipif(not HAVE_PROC, reason="reads the server's RSS from /proc")
def test_model_replies_to_a_client_that_never_reads_stay_bounded(server):
    """60 ``model`` requests (6 MB each) from a client that never reads: the server stops
    reading from it once 1 MiB is unsent, instead of buffering 360 MB."""
    before = rss_kib(server.proc.pid)
    hog = Raw(server, rcvbuf=4096)
    hog.send(b"".join(message({"type": "model", "id": i}) for i in range(60)))
    settle(lambda: log_lines(server, hog.peer, "type=model"))
    grown_mib = (rss_kib(server.proc.pid) - before) / 1024
    assert log_lines(server, hog.peer, "type=model") < 10
    assert grown_mib < 64, f"the server grew by {grown_mib:.0f} MiB"
    assert ping_works(server)                           # everyone else is still served
    hog.close()


def test_a_flood_of_bad_messages_from_a_non_reader_is_not_read_ahead(server):
    """Error replies count against the unsent bound like frames: a client that floods
    malformed messages and never reads is no longer read once its replies back up."""
    hog = Raw(server, rcvbuf=4096)
    hog.sock.settimeout(3.0)
    flood = message({"type": "teleport", "id": 1}) * 2000      # 2000 per send, ~50 KB
    sent = 0
    try:
        for _ in range(100):                                  # at most 200k messages
            hog.send(flood)
            sent += 2000
    except socket.timeout:
        pass                                                  # the server stopped reading
    answered = settle(lambda: log_lines(server, hog.peer, "type="))
    # Each error reply is ~150 bytes: 1 MiB unsent plus the kernel's socket buffers hold
    # well under 100k of them (the rest waits unread in the kernel, or was never sent).
    assert answered < 100_000, (answered, sent)
    assert ping_works(server)
    hog.close()


def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(server):
    hog = Raw(server, rcvbuf=4096)
    hog.send(b"".join(message({"type": "model", "id": i}) for i in range(4)))
    assert wait_until(lambda: f"{hog.peer} dropped: not reading" in server.log(), 30)
    replies = hog.recv_until_closed()                   # what was buffered, then the end
    assert len(replies) < 4
    hog.close()


def test_reply_size_limits_are_advertised_and_enforced(server):
    with Client(server.host, server.port, token=TOKEN, timeout=30.0) as client:
        limits = client.hello["limits"]
        side = protocol.MAX_FRAME_SIDE
        every_pass = list(protocol.PASSES)
        assert protocol.frame_reply_bytes(side, side, "rgba8", every_pass) > \
            limits["max_frame_bytes"]
        assert limits["max_batch_bytes"] > 0
        with pytest.raises(ServerError) as err:
            client.render({}, side, side, format="rgba8", passes=every_pass)
        assert err.value.code == protocol.E_TOO_LARGE and err.value.field == "passes"
        assert str(limits["max_frame_bytes"]) in err.value.message
        assert client.render({}, 64, 48, passes=every_pass).width == 64   # still serving


# ---------------------------------------------------------------------------- handshake

def test_only_a_small_hello_is_read_before_authentication(server):
    # A fit whose 32 MiB photo never comes: refused on its header, nothing more is read.
    raw = Raw(server, hello=False)
    raw.send(message({"type": "fit", "id": 1, "payload_bytes": protocol.MAX_CLIENT_PAYLOAD}))
    replies = raw.recv_until_closed()
    assert [r["code"] for r in replies] == [protocol.E_UNAUTHORIZED]
    assert "hello" in replies[0]["message"] and "no hello within" not in replies[0]["message"]
    # A header too large for a hello: refused on its length prefix.
    raw = Raw(server, hello=False)
    raw.send(struct.pack(">I", protocol.MAX_HEADER_BYTES))
    replies = raw.recv_until_closed()
    assert [r["code"] for r in replies] == [protocol.E_TOO_LARGE]
    assert str(protocol.MAX_HELLO_BYTES) in replies[0]["message"]


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_protocol_version_must_be_the_integer_1(server, version):
    raw = Raw(server, hello=False)
    raw.send(message({"type": "hello", "protocol": version, "token": TOKEN}))
    assert [r["code"] for r in raw.recv_until_closed()] == [protocol.E_VERSION]


def test_a_token_that_is_not_valid_utf8_is_refused(server):
    raw = Raw(server, hello=False)
    raw.send(raw_message(b'{"type": "hello", "protocol": 1, "token": "\\ud800"}'))
    assert [r["code"] for r in raw.recv_until_closed()] == [protocol.E_UNAUTHORIZED]
    assert ping_works(server)


def test_connections_per_address_are_capped_and_idle_ones_closed():
    with ServerProcess("--backend", "preview", "--model", "demo",
                       "--max-connections-per-address", "3", "--idle-timeout", "1") as proc:
        held = [Raw(proc, token=None) for _ in range(3)]
        extra = Raw(proc, token=None, hello=False)
        replies = extra.recv_until_closed()
        assert [r["code"] for r in replies] == [protocol.E_TOO_MANY_CONNECTIONS]
        assert "3" in replies[0]["message"]
        # Another address is counted apart (all of 127/8 is loopback on Linux).
        try:
            other = Raw(proc, token=None, source="127.0.0.2")
        except OSError:
            other = None
        # Held connections that stay silent are closed after the idle timeout, each told why.
        for raw in held:
            assert [r["code"] for r in raw.recv_until_closed()] == [protocol.E_IDLE_TIMEOUT]
        if other is not None:
            other.close()
        # Their slots are free again.
        with Client(proc.host, proc.port, timeout=30.0) as client:
            assert client.ping() >= 0.0


# ---------------------------------------------------------------------------- malformed input

def expect_error(raw: Raw, code: str) -> dict:
    reply, _ = raw.recv()
    assert reply["type"] == "error" and reply["code"] == code, reply
    return reply


def test_hostile_headers_get_clear_errors_and_the_connection_stays_usable(server):
    raw = Raw(server)
    # Nesting too deep for the JSON parser's recursion, and deeper than any request needs.
    raw.send(raw_message(b'{"type": "ping", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    assert "nested" in expect_error(raw, protocol.E_BAD_MESSAGE)["message"]
    raw.send(message({"type": "ping", "id": 1, "x": json.loads("[" * 100 + "]" * 100)}))
    assert "nested" in expect_error(raw, protocol.E_BAD_MESSAGE)["message"]
    # Integers no float holds; numbers that are not finite.
    raw.send(raw_message(b'{"type": "render", "id": 2, "width": 8, "height": 8, '
                         b'"params": {"shape": [1' + b"0" * 400 + b']}}'))
    assert expect_error(raw, protocol.E_BAD_MESSAGE)["code"] != protocol.E_INTERNAL
    for number in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        raw.send(raw_message(b'{"type": "ping", "id": 3, "x": ' + number + b"}"))
        assert "finite" in expect_error(raw, protocol.E_BAD_MESSAGE)["message"]
    # Strings the error would echo: the reply stays small.
    raw.send(message({"type": "x" * 900_000, "id": 4}))
    assert len(expect_error(raw, protocol.E_BAD_MESSAGE)["message"]) < 1000
    raw.send(message({"type": "teleport", "id": "y" * 900_000}))
    reply = expect_error(raw, protocol.E_BAD_MESSAGE)
    assert reply["id"] is None and len(json.dumps(reply)) < 1000
    raw.send(message({"type": "ping", "id": 5}))
    assert raw.recv()[0] == {"type": "pong", "id": 5}
    raw.close()


def test_ids_types_and_client_names_cannot_forge_log_lines(server):
    forged = "127.0.0.1:1 id=1 type=render backend=preview size=8x8 status=ok ms=0.00"
    raw = Raw(server, hello=False)
    raw.send(message({"type": "hello", "protocol": 1, "token": TOKEN,
                      "client": "x\n" + forged}))
    assert raw.recv()[0]["type"] == "hello"
    raw.send(message({"type": "ping", "id": "1\n" + forged}))
    raw.send(message({"type": "ping\r\n" + forged, "id": 2}))
    raw.send(message({"type": "ping", "id": 3}))
    replies = [raw.recv()[0] for _ in range(3)]
    assert replies[-1] == {"type": "pong", "id": 3}
    time.sleep(0.2)
    assert not any(line.startswith(forged) for line in server.log().splitlines())
    raw.close()


def _noise_jpeg(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_the_fit_queue_is_bounded(server):
    photo = _noise_jpeg(900)                 # seconds of face detection, no face in it
    raw = Raw(server)
    raw.send(b"".join(message({"type": "fit", "id": i}, photo) for i in range(6)))
    codes = [raw.recv()[0].get("code") for _ in range(6)]
    assert codes.count(protocol.E_QUEUE_FULL) >= 3, codes
    assert set(codes) <= {protocol.E_QUEUE_FULL, protocol.E_NO_FACE, protocol.E_FIT_FAILED}
    raw.close()


# ---------------------------------------------------------------------------- files

@pytest.fixture(scope="module")
def diffusion_home(tmp_path_factory):
    from tests.support.diffusionrig_fixtures import write_checkpoint

    root = tmp_path_factory.mktemp("home")
    write_checkpoint(root / "diffusionrig" / "model.safetensors")
    rng = np.random.default_rng(0)
    (root / "latents").mkdir()
    np.save(root / "latents" / "alice.npy", rng.normal(size=64).astype(np.float32))
    (root / "photos").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "photos" / "alice.png")
    outside = tmp_path_factory.mktemp("outside")
    np.save(outside / "secret.npy", rng.normal(size=64).astype(np.float32))
    (root / "latents" / "link.npy").symlink_to(outside / "secret.npy")
    torch_like = outside / "secret.pt"
    torch_like.write_bytes(b"\x80secret bytes")
    allowed = tmp_path_factory.mktemp("shots")
    np.save(allowed / "bob.npy", rng.normal(size=64).astype(np.float32))
    return {"home": root, "outside": outside, "allowed": allowed}


@pytest.fixture(scope="module")
def diffusion_server(diffusion_home):
    with ServerProcess("--backend", "diffusionrig", "--model", "demo",
                       "--option", "diffusionrig.resolution=32",
                       "--option", "diffusionrig.steps=2",
                       "--allow-folder", str(diffusion_home["allowed"]),
                       env={"PORTRAIT_RIG_HOME": str(diffusion_home["home"])}) as proc:
        yield proc


def _appearance_error(client, **appearance) -> ServerError:
    with pytest.raises(ServerError) as err:
        client.render({"appearance": appearance}, 32, 32)
    return err.value


def test_client_files_are_names_inside_the_data_folder(diffusion_server, diffusion_home):
    home, outside = diffusion_home["home"], diffusion_home["outside"]
    with Client(diffusion_server.host, diffusion_server.port, timeout=120.0) as client:
        # Names inside the data folder's latents/ and photos/, and in an allowed folder.
        for appearance in ({"latent_file": "alice.npy"},
                           {"latent_file": str(home / "latents" / "alice.npy")},
                           {"reference_photo": "alice.png"},
                           {"latent_file": "bob.npy"},
                           {"latent_file": str(diffusion_home["allowed"] / "bob.npy")}):
            assert isinstance(client.render({"appearance": appearance}, 32, 32), Frame)
        hostile = [str(outside / "secret.npy"), str(outside / "nothing.npy"),
                   "../latents/alice.npy", "../diffusionrig/model.safetensors",
                   "~/secret.npy", "~root/x.npy", "link.npy", "/proc/self/environ",
                   f"/proc/{diffusion_server.proc.pid}/cmdline", str(outside / "secret.pt"),
                   "/etc/passwd", "missing.npy", "a\0b.npy", "latents/../alice.npy",
                   str(home / "latents" / ".." / "diffusionrig" / "model.safetensors")]
        messages = set()
        for name in hostile:
            err = _appearance_error(client, latent_file=name)
            assert err.code == protocol.E_RENDER_FAILED, (name, err)
            assert err.field == "appearance.latent_file", (name, err)
            messages.add(err.message)
        photo = _appearance_error(client, reference_photo=str(outside / "secret.npy"))
    assert len(messages) == 1, messages                 # one message: it reveals nothing
    text = messages.pop() + photo.message
    for secret in (str(outside), str(Path.home()), str(home), str(diffusion_server.proc.pid),
                   "secret", "\\x80", "symlink", "exist"):
        assert secret not in text, (secret, text)


def test_backend_errors_show_paths_relative_to_the_data_folder(diffusion_server,
                                                                diffusion_home):
    with Client(diffusion_server.host, diffusion_server.port, timeout=120.0) as client:
        err = _appearance_error(client, latent_file="alice.npy", personal_model="carol")
    assert "personal/carol" in err.message
    assert str(diffusion_home["home"]) not in err.message and str(Path.home()) not in err.message


def test_a_backend_that_failed_to_start_is_retried_only_when_its_files_change(tmp_path):
    from tests.support.stylegan_fixtures import TINY_SG2, random_generator, write_nvidia_pickle

    with ServerProcess("--backend", "preview", "--model", "demo",
                       "--option", "stylerig.rignet=none",
                       env={"PORTRAIT_RIG_HOME": str(tmp_path)}) as proc, \
            Client(proc.host, proc.port, timeout=120.0) as client:
        errors = []
        for _ in range(3):
            with pytest.raises(ServerError) as err:
                client.render({}, 16, 16, backend="stylerig")
            errors.append(err.value)
        assert {e.code for e in errors} == {protocol.E_BACKEND_UNAVAILABLE}
        assert len({e.message for e in errors}) == 1
        assert "generator" in errors[0].message and str(tmp_path) not in errors[0].message
        assert proc.log().count("backend 'stylerig' is unavailable") == 1       # one build
        assert "Traceback" not in proc.log()
        (tmp_path / "stylegan").mkdir()
        write_nvidia_pickle(tmp_path / "stylegan" / "generator.pkl",
                            random_generator(TINY_SG2, seed=1), repo="stylegan2-ada")
        frame = client.render({}, TINY_SG2.img_resolution, TINY_SG2.img_resolution,
                              backend="stylerig")
        assert frame.backend == "stylerig"


# ---------------------------------------------------------------------------- shutdown

def _answered_until_closed(client: Client, ids: list) -> dict:
    """{id: 'frame' | error code} of every final reply until the server closes."""
    answered = {}
    while True:
        try:
            reply = client.receive()
        except ServerError as err:
            answered[err.id] = err.code
            continue
        except (ConnectionError, TimeoutError):
            return answered
        if not isinstance(reply, Preview):
            answered[reply.id] = type(reply).__name__


def test_sigterm_during_a_long_diffusion_render_answers_everything_and_exits_0(tmp_path):
    from tests.support.diffusionrig_fixtures import write_checkpoint

    write_checkpoint(tmp_path / "diffusionrig" / "model.safetensors")
    (tmp_path / "latents").mkdir()
    np.save(tmp_path / "latents" / "z.npy", np.zeros(64, np.float32))
    params = {"appearance": {"latent_file": "z.npy"}}
    with ServerProcess("--backend", "diffusionrig", "--model", "demo",
                       "--option", "diffusionrig.resolution=32",
                       "--option", "diffusionrig.steps=1000", "--shutdown-grace", "20",
                       env={"PORTRAIT_RIG_HOME": str(tmp_path)}) as proc:
        client = Client(proc.host, proc.port, timeout=60.0)
        client.connect()
        live = client.send_render(params, 32, 32, mode="live", previews=True)
        queued = [client.send_render(params, 32, 32) for _ in range(3)]
        assert isinstance(client.receive(), Preview)          # the render is under way
        proc.proc.send_signal(signal.SIGTERM)
        answered = _answered_until_closed(client, [live, *queued])
        assert proc.proc.wait(30) == 0
        assert answered == {rid: protocol.E_SHUTTING_DOWN for rid in [live, *queued]}
        assert "terminate called" not in proc.log()
        assert "abandoned" not in proc.log()          # it stopped between steps, in time


def test_sigterm_during_a_render_that_outlasts_the_grace_exits_0():
    with ServerProcess("--backend", "preview", "--model", "demo",
                       "--shutdown-grace", "0.05") as proc:
        client = Client(proc.host, proc.port, timeout=60.0)
        client.connect()
        ids = [client.send_render({}, 4096, 4096 - i, format="rgba8") for i in range(4)]
        first = client.receive()
        assert isinstance(first, Frame)                       # the next one is rendering
        proc.proc.send_signal(signal.SIGTERM)
        answered = _answered_until_closed(client, ids)
        assert proc.proc.wait(30) == 0
        assert set(answered) == set(ids[1:])
        assert set(answered.values()) <= {"Frame", protocol.E_SHUTTING_DOWN}
        assert protocol.E_SHUTTING_DOWN in answered.values()


# ---------------------------------------------------------------------------- the client

def test_the_client_reconnects_after_a_server_restart():
    with ServerProcess("--backend", "preview", "--model", "demo") as first:
        port = first.port
        client = Client(first.host, port, timeout=30.0, reconnect=True)
        client.connect()
        assert client.render({}, 32, 32).width == 32 and client.state == "connected"
        first.terminate()
        with pytest.raises(TimeoutError, match="reconnecting"):   # nobody there yet
            client.render({}, 32, 32, timeout=1.0)
        assert client.state == "reconnecting"
        with ServerProcess("--backend", "preview", "--model", "demo",
                           "--port", str(port)) as second:
            live = client.send_render({}, 40, 24, mode="live")
            frame = client.receive()                        # re-sent after the fresh hello
            assert isinstance(frame, Frame) and frame.id == live and frame.width == 40
            assert client.state == "connected" and client.reconnects == 1
            assert client.hello["server_version"]
            assert client.render({}, 16, 16).width == 16
            second.terminate()


def test_the_client_waits_as_long_as_the_backend_needs():
    """A reply slower than the client's timeout but within the backend's ``reply_timeout``
    (from the hello) is waited for."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            fake = Raw.around(conn)
            fake.recv()
            conn.sendall(message({"type": "hello", "protocol": 1, "default_backend": "slow",
                                  "backends": [{"name": "slow", "reply_timeout": 30.0}]}))
            request, _ = fake.recv()
            time.sleep(1.0)
            conn.sendall(message({"type": "error", "id": request["id"], "code": "render_failed",
                                  "message": "slow but answered"}))

    threading.Thread(target=serve, daemon=True).start()
    client = Client("127.0.0.1", listener.getsockname()[1], timeout=0.2)
    client.connect()
    assert client.reply_timeout("slow") == 30.0 and client.reply_timeout("other") == 0.2
    with pytest.raises(ServerError, match="slow but answered"):
        client.render({}, 8, 8)                          # the default backend: "slow"
    client.close()
    listener.close()
