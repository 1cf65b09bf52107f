"""Blocking client for the render server's wire protocol v1 (docs/protocol.md).

Standard library only (no numpy): the Blender add-on imports it. Typical use::

    with Client("127.0.0.1", 7865) as client:          # connects and says hello
        frame = client.render(params, 512, 512)        # RigParams or its dict
        rgb = frame.pixels                             # 512*512*3 bytes, rows top to bottom

Interactive use pipelines live requests: ``send_render(..., mode="live")`` returns the request
id at once and ``receive()`` returns replies as they come - a ``Frame``, a ``Superseded`` (the
request was replaced by a newer live one and will not get a frame), a ``Preview`` (with
``previews=True``: an intermediate image of a progressive backend, before the request's
``Frame``), a ``Vertices``, a ``Pong`` or a ``Message`` (anything else, e.g. the model);
``error`` replies raise ``ServerError`` carrying the request id. One thread may send while
another receives; two threads must not receive at once.

Every blocking call honours ``timeout`` and raises ``TimeoutError`` instead of hanging; a
broken or closed connection raises ``ConnectionError`` - unless the client was made with
``reconnect=True``: then it connects again by itself after a server restart (see
``Client``).
"""

from __future__ import annotations

import array
import itertools
import select
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from . import protocol


class ServerError(Exception):
    """An ``error`` reply. ``code`` is a protocol E_* code, ``id`` the request's id (None for
    errors about no particular request), ``field`` the offending field when the server named
    one (for ``bad_params`` the path inside ``params``, e.g. ``pose.jaw``)."""

    def __init__(self, code: str, message: str, id=None, field: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.id, self.field = code, message, id, field


@dataclass
class Frame:
    """A rendered frame.

    ``pixels``: for rgb8/rgba8 the raw rows, top to bottom, 3 or 4 bytes per pixel (sRGB,
    alpha = face mask); for png/jpeg the file's bytes. ``passes`` maps a pass name to
    ``(channels, floats)`` where ``floats`` is a float32 memoryview of height*width*channels
    values, rows top to bottom. ``timings`` are the server's milliseconds per stage
    (``queue``, the backend's stages, ``render``, ``pack``, ``total``).
    """
    id: object
    width: int
    height: int
    format: str
    backend: str
    pixels: memoryview
    passes: dict[str, tuple[int, memoryview]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    header: dict = field(default_factory=dict, repr=False)


@dataclass
class Preview(Frame):
    """An intermediate image of live request ``id`` after ``step`` of ``steps`` sampler steps
    (the frame's layout, without passes); the request's ``Frame`` follows unless it is
    superseded."""
    step: int = 0
    steps: int = 0


@dataclass
class Superseded:
    """Live request ``id`` was replaced by the newer live request ``by`` before it started (or,
    streaming previews, while it rendered)."""
    id: object
    by: object


@dataclass
class Vertices:
    """Posed vertices: ``data`` is a float32 memoryview of count*3 values (x, y, z per vertex,
    model frame, metres)."""
    id: object
    count: int
    data: memoryview


@dataclass
class Pong:
    id: object


@dataclass
class Message:
    """Any other reply: the header and its raw payload (e.g. ``model``)."""
    header: dict
    payload: bytearray


def _floats(view: memoryview) -> memoryview:
    """Little-endian float32 bytes as a float memoryview (swapped on big-endian hosts)."""
    if sys.byteorder == "little":
        return view.cast("f")
    values = array.array("f", bytes(view))
    values.byteswap()
    return memoryview(values)


@dataclass
class _Sent:
    """A request still owed its final reply, kept to be sent again after a reconnect."""
    data: bytes
    payload: bytes
    live: bool


class Client:
    """One connection to a render server. ``timeout`` (seconds) bounds every blocking call;
    a blocking ``render`` waits at least as long as the backend's ``reply_timeout``.

    With ``reconnect=True`` a lost connection (the server restarted) is opened again by the
    next call that needs it: connection attempts back off from 0.5 s to 10 s, each success
    says hello afresh (``hello`` is replaced) and sends again the requests still waiting for
    their reply - the newest live request and every other request; older live requests are
    answered ``Superseded`` by the client itself. ``shutting_down`` errors of requests that
    will be sent again are not reported. ``state`` is ``"connected"``, ``"reconnecting"``
    or ``"closed"``; ``reconnects`` counts the reconnections. Without it, a lost connection
    raises ``ConnectionError`` and stays closed. A reconnecting client is driven from one
    thread (the reconnect replaces the socket that another thread would be using).
    """

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0

    def __init__(self, host: str = protocol.DEFAULT_HOST, port: int = protocol.DEFAULT_PORT,
                 token: str | None = None, timeout: float = 10.0,
                 client_name: str = "portrait-rig client", reconnect: bool = False):
        self.host, self.port, self.token = host, port, token
        self.timeout = timeout
        self.client_name = client_name
        self.reconnect = reconnect
        self.reconnects = 0
        self.hello: dict | None = None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: deque = deque()     # replies read while waiting for another one
        self._send_lock = threading.Lock()
        self._prefix = bytearray(4)
        self._open: dict[object, _Sent] = {}    # with reconnect: requests owed a reply
        self._closed = True                     # closed by the caller (or never opened)
        self._backoff = self.BACKOFF_MIN_S
        self._retry_at = 0.0

    # ------------------------------------------------------------------ connection
    @property
    def state(self) -> str:
        if self._sock is not None:
            return "connected"
        return "closed" if self._closed or not self.reconnect else "reconnecting"

    def connect(self) -> dict:
        """Open the connection and exchange ``hello``; returns the server's hello."""
        self._closed = False
        try:
            return self._open_connection(self.timeout)
        except BaseException:
            self._closed = True
            raise

    def _open_connection(self, timeout: float) -> dict:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except socket.timeout:
            raise TimeoutError(f"no connection to {self.host}:{self.port} "
                               f"within {timeout:g} s") from None
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port} (is "
                                  f"portrait-rig-server running?): {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        hello = {"type": "hello", "protocol": protocol.PROTOCOL_VERSION,
                 "client": self.client_name}
        if self.token is not None:
            hello["token"] = self.token
        try:
            self._send_raw(protocol.encode_header(hello))
            header, _ = self._read_message(timeout)
        except BaseException:
            self._drop()
            raise
        if header.get("type") == "error":
            self._drop()
            raise ServerError(str(header.get("code")), str(header.get("message")),
                              header.get("id"), header.get("field"))
        if header.get("type") != "hello":
            self._drop()
            raise ConnectionError(f"expected a hello reply, got {header.get('type')!r}")
        self.hello = header
        return header

    def close(self) -> None:
        """Close the connection (and stop reconnecting)."""
        self._closed = True
        self._open.clear()
        self._drop()

    def _drop(self) -> None:
        """Close the socket after a failure (a client with ``reconnect`` opens a new one)."""
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _reconnect(self, deadline: float) -> None:
        """Connect again before ``deadline`` (time.monotonic()), backing off between tries,
        and send the open requests again. Raises ConnectionError when the client does not
        reconnect, TimeoutError when the deadline passes first."""
        if not self.reconnect or self._closed:
            raise ConnectionError("not connected")
        while self._sock is None:
            now = time.monotonic()
            if self._retry_at > now:
                time.sleep(max(min(self._retry_at, deadline) - now, 0.0))
                if self._retry_at > time.monotonic():
                    raise TimeoutError(f"reconnecting to {self.host}:{self.port}: the "
                                       "server is not back yet") from None
            try:
                self._open_connection(self.timeout)
            except (OSError, ServerError):
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2.0, self.BACKOFF_MAX_S)
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"reconnecting to {self.host}:{self.port}: the "
                                       "server is not back yet") from None
                continue
            self.reconnects += 1
            self._backoff = self.BACKOFF_MIN_S
            self._resend()

    def _resend(self) -> None:
        live = [rid for rid, sent in self._open.items() if sent.live]
        for rid in live[:-1]:                      # replaced by the newest live request
            del self._open[rid]
            self._pending.append(Superseded(rid, live[-1]))
        try:
            for sent in list(self._open.values()):
                self._send_raw(sent.data, sent.payload)
        except OSError:
            self._drop()                            # tried again on the next call

    def __enter__(self) -> "Client":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def next_id(self) -> int:
        return next(self._ids)

    def send(self, header: dict, payload: bytes = b"") -> None:
        """Send one message; only ``protocol.CLIENT_PAYLOAD_TYPES`` (``fit``, ``invert``)
        carry a ``payload``. With ``reconnect``, a request sent while the connection is down is
        kept and goes out once it is back."""
        data = protocol.encode_header(header, len(payload))
        if self.reconnect and not self._closed and "id" in header \
                and header.get("type") != "hello":
            live = header.get("type") == "render" and header.get("mode") == "live"
            self._open[header["id"]] = _Sent(data, bytes(payload), live)
            if self._sock is None:
                if time.monotonic() >= self._retry_at:
                    try:
                        self._reconnect(time.monotonic())   # sends it when it connects
                    except (OSError, ServerError):
                        pass
                return
        if self._sock is None:
            raise ConnectionError("not connected")
        try:
            self._send_raw(data, payload)
        except OSError:
            if not (self.reconnect and not self._closed):
                raise
            self._drop()                            # sent again after reconnecting

    def _send_raw(self, data: bytes, payload: bytes = b"") -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
                if payload:
                    self._sock.sendall(payload)
            except socket.timeout:
                self._drop()
                raise TimeoutError(f"sending to {self.host}:{self.port} timed out after "
                                   f"{self.timeout:g} s; connection closed") from None
            except OSError as exc:
                self._drop()
                raise ConnectionError(f"sending to {self.host}:{self.port} failed: {exc}") \
                    from None

    def send_render(self, params, width: int, height: int, *, backend: str | None = None,
                    format: str = "rgb8", quality: int | None = None, passes=(),
                    mode: str = "batch", id=None, shot: dict | None = None,
                    previews: bool = False) -> object:
        """Queue a ``render`` request without waiting; returns its id. ``params`` is a
        ``RigParams`` or its dict; ``passes`` names extras from ``protocol.PASSES``;
        ``mode="live"`` makes it latest-wins (see the module notes); ``shot`` places the
        frame in a sequence (docs/protocol.md, "Shots"); ``previews`` (live only) streams
        ``Preview`` images while a progressive backend renders."""
        rid = self.next_id() if id is None else id
        header = {"type": "render", "id": rid, "params": _params_dict(params),
                  "width": width, "height": height, "format": format,
                  "passes": list(passes), "mode": mode}
        if backend is not None:
            header["backend"] = backend
        if quality is not None:
            header["quality"] = quality
        if shot is not None:
            header["shot"] = shot
        if previews:
            header["previews"] = True
        self.send(header)
        return rid

    def render(self, params, width: int, height: int, *, timeout: float | None = None,
               **options) -> Frame:
        """Render one frame and wait for it (options as ``send_render``) up to ``timeout``
        (default ``reply_timeout(backend)``). Raises ServerError for an error reply, or with
        code ``superseded`` when a newer live request sent meanwhile (from another thread)
        replaced it."""
        if timeout is None:
            timeout = self.reply_timeout(options.get("backend"))
        reply = self._wait_for(self.send_render(params, width, height, **options), timeout)
        if isinstance(reply, Superseded):
            raise ServerError("superseded", f"request {reply.id} was replaced by {reply.by}",
                              reply.id)
        return reply

    def reply_timeout(self, backend: str | None = None) -> float:
        """How long ``render`` waits for a frame of ``backend`` (default: the server's
        default backend): the client's ``timeout`` or, when longer, the backend's
        ``reply_timeout`` from the hello (minutes for diffusion on a CPU)."""
        hello = self.hello or {}
        name = backend or hello.get("default_backend")
        for entry in hello.get("backends", []):
            if isinstance(entry, dict) and entry.get("name") == name:
                value = entry.get("reply_timeout")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return max(self.timeout, float(value))
        return self.timeout

    def vertices(self, params) -> Vertices:
        """Posed vertices of the server's face model for ``params``."""
        rid = self.next_id()
        self.send({"type": "vertices", "id": rid, "params": _params_dict(params)})
        return self._wait_for(rid)

    def fetch_model(self) -> tuple[dict, bytearray]:
        """The face model's arrays: ``(header, payload)`` for ``FaceData.from_wire``."""
        rid = self.next_id()
        self.send({"type": "model", "id": rid})
        reply = self._wait_for(rid)
        return reply.header, reply.payload

    def fetch_texture(self, components: int = protocol.TEXTURE_COMPONENTS
                      ) -> tuple[dict, bytearray]:
        """The server's texture space (mean and the first ``components`` directions): ``(header,
        payload)`` for ``portrait_rig.texture_space.TextureSpace.from_wire`` (None when the
        server has none). The first request makes the server read the file: seconds."""
        rid = self.next_id()
        self.send({"type": "texture", "id": rid, "components": components})
        reply = self._wait_for(rid, max(60.0, self.timeout))
        return reply.header, reply.payload

    def fit(self, photo: bytes, timeout: float | None = None) -> dict:
        """Fit the server's face model to a portrait photo (PNG or JPEG bytes) and wait for
        the ``fit`` reply: ``params`` (a RigParams dict framing the FFHQ-aligned crop with
        DECA's orthographic camera), ``method``, ``landmark_error``, ``albedo_gain``... (see
        docs/protocol.md). Fitting takes seconds: ``timeout`` defaults to
        max(60 s, the client's timeout). Raises ServerError ``no_face`` when the photo shows
        no face."""
        if not isinstance(photo, (bytes, bytearray, memoryview)) or not len(photo):
            raise ValueError("photo: expected the non-empty bytes of a PNG or JPEG file")
        if len(photo) > protocol.MAX_CLIENT_PAYLOAD:
            raise ValueError(f"photo: {len(photo)} bytes exceed the server's limit of "
                             f"{protocol.MAX_CLIENT_PAYLOAD}")
        rid = self.next_id()
        self.send({"type": "fit", "id": rid}, bytes(photo))
        reply = self._wait_for(rid, max(60.0, self.timeout) if timeout is None else timeout)
        return reply.header

    def send_invert(self, photo: bytes, name: str, *, method: str | None = None,
                    steps: int | None = None, space: str | None = None, seed: int | None = None,
                    previews: bool = False, format: str = "png", id=None) -> object:
        """Queue an ``invert`` request (docs/protocol.md, "Identities") without waiting;
        returns its id. The server stores the result as identity ``name``."""
        if not isinstance(photo, (bytes, bytearray, memoryview)) or not len(photo):
            raise ValueError("photo: expected the non-empty bytes of a PNG or JPEG file")
        if len(photo) > protocol.MAX_CLIENT_PAYLOAD:
            raise ValueError(f"photo: {len(photo)} bytes exceed the server's limit of "
                             f"{protocol.MAX_CLIENT_PAYLOAD}")
        rid = self.next_id() if id is None else id
        header = {"type": "invert", "id": rid, "name": name, "format": format}
        for key, value in (("method", method), ("steps", steps), ("space", space),
                           ("seed", seed)):
            if value is not None:
                header[key] = value
        if previews:
            header["previews"] = True
        self.send(header, bytes(photo))
        return rid

    def invert(self, photo: bytes, name: str, *, on_preview=None, timeout: float | None = None,
               **options) -> dict:
        """Invert a portrait photo into identity ``name`` and wait for the ``invert`` reply
        (``method``, ``roll``, ``shift``, ``metrics``...). ``on_preview(Preview)`` is called
        with each streamed preview (asking for them); options as ``send_invert``.
        ``timeout`` defaults to max(600 s, the client's timeout): inversion on a CPU takes
        minutes. Raises ServerError (``no_face``, ``invert_failed``, ``bad_message``)."""
        rid = self.send_invert(photo, name, previews=on_preview is not None, **options)
        reply = self._wait_for(rid, max(600.0, self.timeout) if timeout is None else timeout,
                               on_preview)
        return reply.header

    def identities(self) -> dict:
        """The server's identities, edit directions and personal models (the
        ``identities`` reply)."""
        rid = self.next_id()
        self.send({"type": "identities", "id": rid})
        return self._wait_for(rid).header

    def ping(self) -> float:
        """Round-trip time of a ping, in seconds."""
        rid = self.next_id()
        start = time.perf_counter()
        self.send({"type": "ping", "id": rid})
        self._wait_for(rid)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ replies
    def receive(self, timeout: float | None = None):
        """The next reply (see the module notes); ``timeout`` defaults to the client's."""
        if self._pending:
            return _raise_errors(self._pending.popleft())
        return _raise_errors(self._read_reply(self.timeout if timeout is None else timeout))

    def poll(self, timeout: float = 0.0) -> bool:
        """True when a reply can be read without waiting for the server: one is buffered or
        data is waiting on the socket (or the server closed it, which ``receive`` reports).
        Waits up to ``timeout`` seconds; lets a caller check for cancellation between waits
        while ``receive`` gets a long timeout for the message itself."""
        if self._pending:
            return True
        if self._sock is None:
            try:
                self._reconnect(time.monotonic() + timeout)
            except TimeoutError:
                return False
            if self._pending:
                return True
        readable, _, _ = select.select([self._sock], [], [], timeout)
        return bool(readable)

    def _wait_for(self, rid, timeout: float | None = None, on_preview=None):
        """Read replies until the one for ``rid`` (within ``timeout``, default the
        client's); others are kept for ``receive``. Previews of ``rid`` go to
        ``on_preview`` (or are dropped). A request whose wait times out is not sent again
        after a reconnect (nobody waits for it)."""
        mine = [r for r in self._pending if _reply_id(r) == rid]
        if mine:                                    # a blocking call wants the final reply
            self._pending = deque(r for r in self._pending if _reply_id(r) != rid)
            final = [r for r in mine if not isinstance(r, Preview)]
            if final:
                return _raise_errors(final[0])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                reply = self._read_reply(max(deadline - time.monotonic(), 1e-3))
            except TimeoutError:
                self._open.pop(rid, None)
                raise
            if _reply_id(reply) == rid and isinstance(reply, Preview):
                if on_preview is not None:
                    on_preview(reply)
                continue
            if _reply_id(reply) == rid:
                return _raise_errors(reply)
            if isinstance(reply, ServerError) and reply.id is None:
                raise reply                 # about the connection itself, not a request
            self._pending.append(reply)

    def _read_reply(self, timeout: float):
        """The next reply from the socket, reconnecting first when the client does and the
        connection is lost (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._sock is None:
                self._reconnect(deadline)
                if self._pending:                   # replies made up while reconnecting
                    return self._pending.popleft()
            try:
                header, payload = self._read_message(max(deadline - time.monotonic(), 1e-3))
            except (ConnectionError, TimeoutError):
                if self._sock is not None or not self.reconnect or self._closed:
                    raise                           # a plain timeout, or no reconnecting
                continue
            reply = self._reply(header, payload)
            if self.reconnect and isinstance(reply, ServerError) and \
                    reply.code in (protocol.E_SHUTTING_DOWN, protocol.E_IDLE_TIMEOUT) and \
                    (reply.id is None or reply.id in self._open):
                continue                # the connection is ending; its requests go again
            if not isinstance(reply, Preview):
                self._open.pop(_reply_id(reply), None)
            return reply

    def _reply(self, header: dict, payload: bytearray):
        kind = header["type"]
        if kind == "frame":
            return _frame(header, payload)
        if kind == "preview":
            frame = _frame(header, payload)
            return Preview(**vars(frame), step=int(header["step"]), steps=int(header["steps"]))
        if kind == "error":
            return ServerError(str(header.get("code")), str(header.get("message")),
                               header.get("id"), header.get("field"))
        if kind == "superseded":
            return Superseded(header.get("id"), header.get("by"))
        if kind == "vertices":
            return Vertices(header.get("id"), int(header["count"]),
                            _floats(memoryview(payload)))
        if kind == "pong":
            return Pong(header.get("id"))
        return Message(header, payload)

    def _read_message(self, timeout: float) -> tuple[dict, bytearray]:
        if self._sock is None:
            raise ConnectionError("not connected")
        self._sock.settimeout(timeout)
        self._recv_into(memoryview(self._prefix), start_of_message=True)
        try:
            length = protocol.header_length(self._prefix)
            body = bytearray(length)
            self._recv_into(memoryview(body))
            header, nbytes = protocol.decode_header(body, protocol.MAX_SERVER_PAYLOAD)
        except protocol.ProtocolError as exc:
            self._drop()
            raise ConnectionError(f"malformed message from the server: {exc}") from None
        payload = bytearray(nbytes)         # filled in place: no chunk joining
        if nbytes:
            self._recv_into(memoryview(payload))
        return header, payload

    def _recv_into(self, view: memoryview, start_of_message: bool = False) -> None:
        got = 0
        while got < len(view):
            try:
                n = self._sock.recv_into(view[got:])
            except socket.timeout:
                if start_of_message and got == 0:
                    # Nothing of the next message read: the connection is still usable.
                    raise TimeoutError(f"no reply from {self.host}:{self.port} within "
                                       f"{self._sock.gettimeout():g} s") from None
                self._drop()
                raise TimeoutError(f"{self.host}:{self.port} stalled in the middle of a "
                                   "message; connection closed") from None
            except OSError as exc:
                self._drop()
                raise ConnectionError(f"receiving from {self.host}:{self.port} failed: "
                                      f"{exc}") from None
            if n == 0:
                self._drop()
                raise ConnectionError(f"{self.host}:{self.port} closed the connection")
            got += n


def _params_dict(params) -> dict:
    return params.to_dict() if hasattr(params, "to_dict") else params


def _reply_id(reply):
    if isinstance(reply, Message):
        return reply.header.get("id")
    return getattr(reply, "id", None)


def _raise_errors(reply):
    if isinstance(reply, ServerError):
        raise reply
    return reply


def _frame(header: dict, payload: bytearray) -> Frame:
    view = memoryview(payload)
    passes = {}
    for entry in header.get("passes", []):
        start = int(entry["offset"])
        passes[entry["name"]] = (int(entry["channels"]),
                                 _floats(view[start: start + int(entry["nbytes"])]))
    return Frame(header.get("id"), int(header["width"]), int(header["height"]),
                 header["format"], header.get("backend", ""),
                 view[: int(header["image_bytes"])], passes,
                 dict(header.get("timings", {})), header)
