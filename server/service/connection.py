"""One client connection: read and validate messages, answer them, log one line per request.

Runs on the event loop. Rendering, vertex posing and encoding happen on the render lanes
(``server/service/scheduler.py``), fitting on the fit queue; this side only parses headers,
queues jobs and writes the finished buffers. Error policy (docs/protocol.md, "Errors"): a
broken length prefix or a failed handshake closes the connection; anything else is answered
with an ``error`` and the connection keeps going.

Memory per connection is bounded (docs/security.md): before the handshake only a small
``hello`` is read; afterwards, while the replies the client has not read exceed
``max_unsent`` bytes (every reply type counts, those still on their way from a lane too),
the connection is neither read from nor rendered for, and a client that reads nothing for
``write_timeout`` seconds is dropped. Each connection reads one message per turn of the
event loop, so a client that floods the server delays the others by one message at most.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import socket
import threading
import time
import traceback

from portrait_rig import protocol
from portrait_rig.params import MAX_TEXTURE

from server import paths
from server.service.fitting import FitError, FitJob
from server.service.jobs import (MAX_ID_LENGTH, RequestError, parse_render, parse_vertices,
                                 request_id)
from server.service.frame_codec import encode_frame
from server.service.inverting import parse_invert
from server.service.scheduler import QueueFull
from server.service.worker import answer_cancelled

HELLO_TIMEOUT = 10.0
DISCARD_CHUNK = 1 << 16
MAX_ERROR_MESSAGE = 1000          # characters of an error message (they may quote a request)
_PLAIN = re.compile(r"[A-Za-z0-9_.:@/+-]{1,64}")


class _Close(Exception):
    """The connection cannot continue (the reason was already sent to the client)."""


class TokenBucket:
    """``rate`` messages per second sustained, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _declared_payload(body: bytes) -> int:
    """``payload_bytes`` of a header that failed validation, when it can still be read
    (so the payload can be skipped and the stream stays in step); else 0."""
    try:
        value = json.loads(body).get("payload_bytes", 0)
    except Exception:  # noqa: BLE001 - anything unreadable declares nothing
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _id_of(header) -> object:
    """The request's id when it is a valid one (echoed in replies), else None."""
    rid = header.get("id") if isinstance(header, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    return rid if not isinstance(rid, str) or len(rid) <= MAX_ID_LENGTH else None


def shown(value) -> str:
    """A client-given value for one log line: plain words as they are, anything else quoted
    and escaped (no newline can forge a line) and cut short."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    return protocol.excerpt(value)


def _nbytes(buffers) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


class Connection:
    def __init__(self, app, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.app = app
        self.config = app.config
        self.reader, self.writer = reader, writer
        self.transport = writer.transport
        self.loop = asyncio.get_running_loop()
        host, port = writer.get_extra_info("peername")[:2]
        self.host = host
        self.peer = f"{host}:{port}"
        self.client_name = ""
        self.bucket = TokenBucket(self.config.rate, self.config.burst)
        self.closed = False
        self.open = 0                   # requests still owed a final reply
        self.last_read = self.loop.time()
        self._posted = 0                # reply bytes handed over by lanes, not yet written
        self._out_lock = threading.Lock()
        self._blocked = False           # unsent output over the bound
        self._room = asyncio.Event()    # set while the connection may be read from
        self._room.set()
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ main loop
    async def serve(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=self.config.max_unsent)
        registered = False
        try:
            await self._handshake()
            self.app.scheduler.register(self, client=self.host)
            registered = True
            self._spawn(self._watch_idle())
            while True:
                await self._room.wait()             # replies backed up: read nothing more
                message = await self._read_message()
                self.last_read = self.loop.time()
                if message is not None:
                    self._dispatch(*message)
                await asyncio.sleep(0)              # one message per connection per turn
        except _Close:
            pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                    # the client went away
        finally:
            if registered:
                for job in self.app.scheduler.unregister(self):
                    self._log_job(job, "dropped")   # nobody is left to answer
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._room.set()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.writer.close()                         # flushes what is buffered, then closes
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            self.transport.abort()

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_message(self) -> tuple[dict, bytes] | None:
        """Next header and its payload (empty except for ``CLIENT_PAYLOAD_TYPES``), or None
        after answering a malformed message that left the stream in step. Raises _Close when
        the stream cannot be trusted any more."""
        prefix = await self.reader.readexactly(4)
        try:
            length = protocol.header_length(prefix)
        except protocol.ProtocolError as exc:
            self._log_request(None, "?", exc.code, 0.0)
            self.send_error(None, exc.code, f"{exc}; closing the connection")
            raise _Close from None
        body = await self.reader.readexactly(length)
        try:
            header, nbytes = protocol.decode_header(body, protocol.MAX_CLIENT_PAYLOAD)
        except protocol.ProtocolError as exc:
            self._log_request(None, "?", exc.code, 0.0)
            self.send_error(None, exc.code, str(exc))
            await self._discard(_declared_payload(body))
            return None
        kind = header["type"]
        if nbytes and kind not in protocol.CLIENT_PAYLOAD_TYPES:
            await self._discard(nbytes)
            self._fail(_id_of(header), kind, RequestError(
                protocol.E_BAD_MESSAGE, f"{protocol.excerpt(kind)} messages carry no payload "
                f"in protocol v{protocol.PROTOCOL_VERSION}", "payload_bytes"), 0.0)
            return None
        if kind == "fit" and nbytes and (full := self.app.fit_service.room_for(self)):
            await self._discard(nbytes)             # no room: the photo is never held
            self._fail(_id_of(header), kind, RequestError(protocol.E_QUEUE_FULL, full), 0.0)
            return None
        return header, (await self.reader.readexactly(nbytes) if nbytes else b"")

    async def _discard(self, nbytes: int) -> None:
        while nbytes > 0:
            chunk = await self.reader.read(min(nbytes, DISCARD_CHUNK))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", nbytes)
            nbytes -= len(chunk)

    # ------------------------------------------------------------------ handshake
    async def _handshake(self) -> None:
        try:
            header = await asyncio.wait_for(self._read_hello(), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            await self._refuse(protocol.E_UNAUTHORIZED, f"no hello within {HELLO_TIMEOUT:g} s")
        token = self.config.token
        if token is not None:
            given = header.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(
                    given.encode("utf-8", "surrogatepass"), token.encode("utf-8")):
                await self._refuse(protocol.E_UNAUTHORIZED, "missing or wrong token")
        version = header.get("protocol")
        if type(version) is not int or version != protocol.PROTOCOL_VERSION:
            await self._refuse(protocol.E_VERSION,
                               f"protocol: the server speaks version "
                               f"{protocol.PROTOCOL_VERSION}, the client asked for "
                               f"{protocol.excerpt(version)}")
        self.client_name = str(header.get("client", ""))[:200]
        self.send_header(self.app.hello_reply())
        self._log_request(None, "hello", "ok", 0.0,
                          extra=f"client={protocol.excerpt(self.client_name)}")

    async def _read_hello(self) -> dict:
        """The first message, which must be a ``hello`` of at most MAX_HELLO_BYTES and no
        payload; nothing else is read before it is checked."""
        prefix = await self.reader.readexactly(4)
        try:
            length = protocol.header_length(prefix)
        except protocol.ProtocolError as exc:
            await self._refuse(exc.code, f"{exc}; closing the connection")
        if length > protocol.MAX_HELLO_BYTES:
            await self._refuse(protocol.E_TOO_LARGE, f"the first message (hello) is at most "
                               f"{protocol.MAX_HELLO_BYTES} bytes, got {length}")
        try:
            header, nbytes = protocol.decode_header(await self.reader.readexactly(length),
                                                    protocol.MAX_CLIENT_PAYLOAD)
        except protocol.ProtocolError as exc:
            await self._refuse(exc.code, str(exc))
        if header["type"] != "hello":
            await self._refuse(protocol.E_UNAUTHORIZED, f"the first message must be 'hello', "
                               f"got {protocol.excerpt(header['type'])}")
        if nbytes:
            await self._refuse(protocol.E_BAD_MESSAGE, "hello carries no payload")
        return header

    async def _refuse(self, code: str, message: str) -> None:
        self._log_request(None, "hello", code, 0.0)
        self.send_error(None, code, message)
        try:
            await asyncio.wait_for(self.writer.drain(), 5.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        raise _Close

    async def _watch_idle(self) -> None:
        """Close a connection that sent nothing for ``idle_timeout`` s and awaits nothing."""
        timeout = self.config.idle_timeout
        while not self.closed:
            await asyncio.sleep(max(self.last_read + timeout - self.loop.time(), 0.05))
            if self.loop.time() - self.last_read < timeout or self.open or self._blocked:
                continue
            self._log_request(None, "-", protocol.E_IDLE_TIMEOUT, 0.0)
            self.send_error(None, protocol.E_IDLE_TIMEOUT, f"no request for {timeout:g} s; "
                            "closing the connection (connect again when needed)")
            self.writer.close()                     # flushes, then ends the read loop
            return

    # ------------------------------------------------------------------ requests
    def _dispatch(self, header: dict, payload: bytes = b"") -> None:
        kind = header["type"]
        received = time.perf_counter()
        if not self.bucket.take():
            self._fail(_id_of(header), kind, RequestError(
                protocol.E_RATE_LIMITED, f"more than {self.config.rate:g} messages/s "
                f"(burst {self.config.burst}) on this connection"), received)
            return
        handler = {"ping": self._ping, "model": self._model, "render": self._render,
                   "vertices": self._vertices, "texture": self._texture,
                   "fit": lambda h, r: self._fit(h, payload, r),
                   "invert": lambda h, r: self._invert(h, payload, r),
                   "identities": self._identities}.get(kind)
        try:
            if handler is None:
                raise RequestError(protocol.E_BAD_MESSAGE,
                                   "hello: already received" if kind == "hello" else
                                   f"type: unknown message type {protocol.excerpt(kind)} "
                                   "(expected ping, model, texture, render, vertices, fit, invert or "
                                   "identities)", "type")
            handler(header, received)
        except RequestError as exc:
            self._fail(_id_of(header), kind, exc, received)
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the connection
            self.app.log("".join(traceback.format_exception(exc)).rstrip())
            self._fail(_id_of(header), kind, RequestError(
                protocol.E_INTERNAL, paths.redact(f"{type(exc).__name__}: {exc}")), received)

    def _ping(self, header: dict, received: float) -> None:
        self.send_header({"type": "pong", "id": _id_of(header)})
        self._log_request(_id_of(header), "ping", "ok", received)

    def _model(self, header: dict, received: float) -> None:
        self.send(self.app.model_message(_id_of(header)))
        self._log_request(_id_of(header), "model", "ok", received)

    def _texture(self, header: dict, received: float) -> None:
        components = header.get("components", protocol.TEXTURE_COMPONENTS)
        if isinstance(components, bool) or not isinstance(components, int) \
                or not 0 <= components <= MAX_TEXTURE:
            raise RequestError(protocol.E_BAD_MESSAGE, f"components: expected an integer in "
                               f"0..{MAX_TEXTURE}, got {components!r}", "components")
        asyncio.ensure_future(self._send_texture(_id_of(header), components, received))

    async def _send_texture(self, rid, components: int, received: float) -> None:
        """Read the texture space on a worker thread (the file is large; the loop serves)."""
        try:
            message = await asyncio.to_thread(self.app.texture_message, rid, components)
        except (OSError, ValueError) as exc:
            self._fail(rid, "texture", RequestError(protocol.E_INTERNAL, f"the server's "
                                                    f"texture space is unreadable: {exc}"),
                       received)
            return
        self.send(message)
        self._log_request(rid, "texture", "ok", received)

    def _render(self, header: dict, received: float) -> None:
        data = self.app.face_data
        job = parse_render(header, self.app.backend_names, self.config.backend,
                           data.n_shape, data.n_expression, self.config.max_frame_bytes)
        self._submit(job, received)

    def _vertices(self, header: dict, received: float) -> None:
        data = self.app.face_data
        self._submit(parse_vertices(header, data.n_shape, data.n_expression), received)

    def _fit(self, header: dict, payload: bytes, received: float) -> None:
        rid = request_id(header)
        if not payload:
            raise RequestError(protocol.E_BAD_MESSAGE, "payload: a fit request carries the "
                               "photo (PNG or JPEG bytes) as its payload", "payload")
        try:
            self.app.fit_service.submit(FitJob(self, rid, payload, self._fit_done, received))
        except FitError as exc:
            raise RequestError(exc.code, str(exc), exc.field) from None
        self.open += 1

    def _fit_done(self, job: FitJob, reply: dict | None, error: Exception | None) -> None:
        """Called on the fit thread (or the event loop at shutdown)."""
        self._post(self._deliver_fit, job, reply, error)

    def _deliver_fit(self, job: FitJob, reply: dict | None, error: Exception | None) -> None:
        self.open -= 1
        if self.closed:
            self._log_request(job.id, "fit", "dropped", job.received)
        elif isinstance(error, FitError):
            self._fail(job.id, "fit", RequestError(error.code, paths.redact(str(error)),
                                                   error.field), job.received)
        elif error is not None:
            self._fail(job.id, "fit", RequestError(
                protocol.E_INTERNAL, paths.redact(f"{type(error).__name__}: {error}")),
                job.received)
        else:
            self.send_header({"type": "fit", "id": job.id, **reply})
            self._log_request(job.id, "fit", "ok", job.received,
                              extra=f"method={reply['method']}")

    def _invert(self, header: dict, payload: bytes, received: float) -> None:
        request = parse_invert(header)
        if not payload:
            raise RequestError(protocol.E_BAD_MESSAGE, "payload: an invert request carries the "
                               "photo (PNG or JPEG bytes) as its payload", "payload")
        asyncio.ensure_future(self._run_invert(request, payload, received))

    async def _run_invert(self, request, payload: bytes, received: float) -> None:
        """Invert on a worker thread; previews are posted back to the event loop."""
        def on_preview(fields: dict, image) -> None:
            header = {"type": "preview", "id": request.id, "width": image.shape[1],
                      "height": image.shape[0], "format": request.format,
                      "backend": "stylerig", "mode": "invert", "timings": {}, **fields}
            buffers = encode_frame(header, image, {}, (), request.format)
            self.loop.call_soon_threadsafe(self.send, buffers)

        try:
            reply = await asyncio.to_thread(self.app.invert_service.invert, request, payload,
                                            on_preview, lambda: self.closed)
        except FitError as exc:
            self._fail(request.id, "invert", RequestError(exc.code, str(exc), exc.field),
                       received)
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the connection
            self.app.log("".join(traceback.format_exception(exc)).rstrip())
            self._fail(request.id, "invert", RequestError(protocol.E_INTERNAL,
                                                          f"{type(exc).__name__}: {exc}"),
                       received)
            return
        self.send_header({"type": "invert", "id": request.id, **reply})
        self._log_request(request.id, "invert", "ok", received,
                          extra=f"method={reply['method']} name={reply['name']}")

    def _identities(self, header: dict, received: float) -> None:
        self.send_header({"type": "identities", "id": _id_of(header),
                          **self.app.invert_service.listing()})
        self._log_request(_id_of(header), "identities", "ok", received)

    def _submit(self, job, received: float) -> None:
        job.owner, job.done, job.received = self, self._job_done, received
        if job.kind == "render" and job.previews:
            job.preview = self._job_preview
        try:
            superseded = self.app.scheduler.submit(job)
        except QueueFull as exc:
            raise RequestError(protocol.E_QUEUE_FULL, str(exc)) from None
        self.open += 1
        if superseded is not None:
            superseded.superseded_by = job.id
            answer_cancelled(superseded)

    def _job_done(self, job, buffers, error) -> None:
        """Called on a lane's thread (or the event loop): hand the reply to the event loop,
        counting its bytes as unsent from now on."""
        self._post(self._deliver, job, buffers, error, nbytes=_nbytes(buffers or ()))

    def _job_preview(self, job, buffers) -> None:
        """Called on a lane's thread with an encoded ``preview`` message: send it (in order,
        before the job's final reply, which is posted the same way later)."""
        self._post(self._deliver_preview, buffers, nbytes=_nbytes(buffers))

    def _post(self, callback, *args, nbytes: int = 0) -> None:
        if nbytes:
            with self._out_lock:
                self._posted += nbytes
                if self._over():
                    self.app.scheduler.set_blocked(self, True)
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass                                    # the loop is gone: shutting down

    def _deliver_preview(self, buffers) -> None:
        self.send(buffers, posted=True)

    def _deliver(self, job, buffers, error) -> None:
        self.open -= 1
        if self.closed:
            self._unpost(buffers)
            self._log_job(job, "dropped")
        elif error is not None:
            self._fail(job.id, job.kind, error, job.received, job)
        else:
            self.send(buffers, posted=True)
            self._log_job(job, "ok" if job.superseded_by is None else "superseded")

    def _fail(self, rid, kind: str, error: RequestError, received: float, job=None) -> None:
        self.send_error(rid, error.code, str(error), error.field)
        if job is not None:
            self._log_job(job, error.code)
        else:
            self._log_request(rid, kind, error.code, received)

    # ------------------------------------------------------------------ output
    def _over(self) -> bool:
        return self._posted + self.transport.get_write_buffer_size() > self.config.max_unsent

    def _unpost(self, buffers) -> None:
        if buffers:
            with self._out_lock:
                self._posted -= _nbytes(buffers)

    def send(self, buffers, posted: bool = False) -> None:
        """Write a reply (``posted``: counted as unsent since a lane handed it over)."""
        if posted:
            self._unpost(buffers)
        if self.closed or self.transport.is_closing():
            return
        for buf in buffers:
            self.transport.write(buf)
        with self._out_lock:
            over = self._over()
            if over and not self._blocked:
                # The client reads slower than we answer: read nothing and render nothing
                # for it until it catches up (or drop it if it stops reading).
                self._blocked = True
                self._room.clear()
                self.app.scheduler.set_blocked(self, True)
                self._spawn(self._wait_drained())
            elif not over and not self._blocked:
                self.app.scheduler.set_blocked(self, False)    # a lane's early block

    async def _wait_drained(self) -> None:
        timeout = self.config.write_timeout
        try:
            while not self.closed:
                size = self.transport.get_write_buffer_size()
                try:
                    await asyncio.wait_for(self.writer.drain(), timeout)
                except asyncio.TimeoutError:
                    if self.transport.get_write_buffer_size() < size:
                        continue                    # slow, but it reads
                    self.app.log(f"{self.peer} dropped: not reading ({size} bytes unsent "
                                 f"for {timeout:g} s)")
                    self.transport.abort()
                    return
                await asyncio.sleep(0.001)          # replies posted meanwhile get written
                with self._out_lock:
                    if not self._over():
                        self._blocked = False
                        self._room.set()
                        self.app.scheduler.set_blocked(self, False)
                        return
        except ConnectionError:
            pass

    def send_header(self, header: dict) -> None:
        self.send([protocol.encode_header(header)])

    def send_error(self, rid, code: str, message: str, field: str | None = None) -> None:
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[:MAX_ERROR_MESSAGE] + "..."
        header = {"type": "error", "id": rid, "code": code, "message": message}
        if field is not None:
            header["field"] = field[:200]
        self.send_header(header)

    # ------------------------------------------------------------------ logging
    def _log_job(self, job, status: str) -> None:
        size = f"{job.width}x{job.height}" if job.kind == "render" else "-"
        extra = f"mode={job.mode} format={job.format}" if job.kind == "render" else ""
        self._log_request(job.id, job.kind, status, job.received, job.backend or "-", size,
                          extra)

    def _log_request(self, rid, kind: str, status: str, received: float, backend: str = "-",
                     size: str = "-", extra: str = "") -> None:
        if not self.config.log_requests:
            return
        ms = (time.perf_counter() - received) * 1e3 if received else 0.0
        line = (f"{self.peer} id={shown(rid) if rid is not None else '-'} type={shown(kind)} "
                f"backend={backend} size={size} status={status} ms={ms:.2f}")
        self.app.log(f"{line} {extra}".rstrip())
