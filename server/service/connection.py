"""One client connection: read and validate messages, answer them, log one line per request.

Runs on the event loop. Rendering, vertex posing and encoding happen on the render worker
(``server/service/scheduler.py``); this side only parses headers, queues jobs and writes the finished
buffers. Error policy (docs/protocol.md, "Errors"): a broken length prefix or a failed
handshake closes the connection; anything else is answered with an ``error`` and the
connection keeps going.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
import traceback

from portrait_rig import protocol
from portrait_rig.params import MAX_TEXTURE

from server.service.fitting import FitError
from server.service.frame_codec import encode_frame
from server.service.inverting import parse_invert
from server.service.jobs import RequestError, parse_render, parse_vertices, request_id
from server.service.scheduler import QueueFull

HELLO_TIMEOUT = 10.0
DISCARD_CHUNK = 1 << 16


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
    except (ValueError, UnicodeDecodeError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _id_of(header) -> object:
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None


class Connection:
    def __init__(self, app, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.app = app
        self.reader, self.writer = reader, writer
        self.transport = writer.transport
        self.loop = asyncio.get_running_loop()
        host, port = writer.get_extra_info("peername")[:2]
        self.peer = f"{host}:{port}"
        self.client_name = ""
        self.bucket = TokenBucket(app.config.rate, app.config.burst)
        self.closed = False
        self._draining = False

    # ------------------------------------------------------------------ main loop
    async def serve(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=self.app.config.output_high_water)
        registered = False
        try:
            await self._handshake()
            self.app.worker.register(self)
            registered = True
            while True:
                message = await self._read_message()
                if message is not None:
                    self._dispatch(*message)
        except _Close:
            pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                                    # the client went away
        finally:
            if registered:
                for job in self.app.worker.unregister(self):
                    self._log_job(job, "dropped")   # nobody is left to answer
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()                         # flushes what is buffered, then closes
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            self.transport.abort()

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
        if nbytes and header["type"] not in protocol.CLIENT_PAYLOAD_TYPES:
            await self._discard(nbytes)
            self.send_error(_id_of(header), protocol.E_BAD_MESSAGE,
                            f"{header['type']!r} messages carry no payload in protocol "
                            f"v{protocol.PROTOCOL_VERSION}", "payload_bytes")
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
            message = await asyncio.wait_for(self._read_message(), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            await self._refuse(protocol.E_UNAUTHORIZED, f"no hello within {HELLO_TIMEOUT:g} s")
        if message is None:
            await self._refuse(None, "")
        header = message[0]
        if header["type"] != "hello":
            await self._refuse(protocol.E_UNAUTHORIZED,
                               f"the first message must be 'hello', got {header['type']!r}")
        token = self.app.config.token
        if token is not None:
            given = header.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(
                    given.encode("utf-8"), token.encode("utf-8")):
                await self._refuse(protocol.E_UNAUTHORIZED, "missing or wrong token")
        version = header.get("protocol")
        if version != protocol.PROTOCOL_VERSION:
            await self._refuse(protocol.E_VERSION,
                               f"protocol: the server speaks version "
                               f"{protocol.PROTOCOL_VERSION}, the client asked for {version!r}")
        self.client_name = str(header.get("client", ""))[:200]
        self.send_header(self.app.hello_reply())
        self._log_request(None, "hello", "ok", 0.0, extra=f"client={self.client_name!r}")

    async def _refuse(self, code: str | None, message: str) -> None:
        if code is not None:
            self._log_request(None, "hello", code, 0.0)
            self.send_error(None, code, message)
        try:
            await asyncio.wait_for(self.writer.drain(), 5.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        raise _Close

    # ------------------------------------------------------------------ requests
    def _dispatch(self, header: dict, payload: bytes = b"") -> None:
        kind = header["type"]
        received = time.perf_counter()
        if not self.bucket.take():
            self._fail(_id_of(header), kind, RequestError(
                protocol.E_RATE_LIMITED, f"more than {self.app.config.rate:g} messages/s "
                f"(burst {self.app.config.burst}) on this connection"), received)
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
                                   f"type: unknown message type {kind!r} (expected ping, "
                                   "model, texture, render, vertices, fit, invert or identities)",
                                   "type")
            handler(header, received)
        except RequestError as exc:
            self._fail(_id_of(header), kind, exc, received)
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the connection
            self.app.log("".join(traceback.format_exception(exc)).rstrip())
            self._fail(_id_of(header), kind, RequestError(
                protocol.E_INTERNAL, f"{type(exc).__name__}: {exc}"), received)

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
        job = parse_render(header, self.app.backend_names, self.app.config.backend,
                           data.n_shape, data.n_expression)
        self._submit(job, received)

    def _vertices(self, header: dict, received: float) -> None:
        data = self.app.face_data
        self._submit(parse_vertices(header, data.n_shape, data.n_expression), received)

    def _fit(self, header: dict, payload: bytes, received: float) -> None:
        rid = request_id(header)
        if not payload:
            raise RequestError(protocol.E_BAD_MESSAGE, "payload: a fit request carries the "
                               "photo (PNG or JPEG bytes) as its payload", "payload")
        asyncio.ensure_future(self._run_fit(rid, payload, received))

    async def _run_fit(self, rid, payload: bytes, received: float) -> None:
        """Fit on a worker thread (seconds of CPU work; the event loop keeps serving)."""
        try:
            reply = await asyncio.to_thread(self.app.fit_service.fit, payload)
        except FitError as exc:
            self._fail(rid, "fit", RequestError(exc.code, str(exc), exc.field), received)
            return
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the connection
            self.app.log("".join(traceback.format_exception(exc)).rstrip())
            self._fail(rid, "fit", RequestError(protocol.E_INTERNAL,
                                                f"{type(exc).__name__}: {exc}"), received)
            return
        self.send_header({"type": "fit", "id": rid, **reply})
        self._log_request(rid, "fit", "ok", received, extra=f"method={reply['method']}")

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
            superseded = self.app.worker.submit(job)
        except QueueFull as exc:
            raise RequestError(protocol.E_QUEUE_FULL, str(exc)) from None
        if superseded is not None:
            self.send_header({"type": "superseded", "id": superseded.id, "by": job.id})
            self._log_job(superseded, "superseded")

    def _job_done(self, job, buffers, error) -> None:
        """Called on the worker thread: hand the reply to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, job, buffers, error)
        except RuntimeError:
            pass                                    # the loop is gone: shutting down

    def _job_preview(self, job, buffers) -> None:
        """Called on the worker thread with an encoded ``preview`` message: send it (in order,
        before the job's final reply, which is posted the same way later)."""
        try:
            self.loop.call_soon_threadsafe(self.send, buffers)
        except RuntimeError:
            pass                                    # the loop is gone: shutting down

    def _deliver(self, job, buffers, error) -> None:
        if self.closed:
            self._log_job(job, "dropped")
        elif error is not None:
            self._fail(job.id, job.kind, error, job.received, job)
        else:
            self.send(buffers)
            self._log_job(job, "ok" if job.superseded_by is None else "superseded")

    def _fail(self, rid, kind: str, error: RequestError, received: float, job=None) -> None:
        self.send_error(rid, error.code, str(error), error.field)
        if job is not None:
            self._log_job(job, error.code)
        else:
            self._log_request(rid, kind, error.code, received)

    # ------------------------------------------------------------------ output
    def send(self, buffers) -> None:
        if self.closed or self.transport.is_closing():
            return
        for buf in buffers:
            self.transport.write(buf)
        if not self._draining and \
                self.transport.get_write_buffer_size() > self.app.config.output_high_water:
            # The client reads slower than we render: stop rendering for it until it catches up.
            self._draining = True
            self.app.worker.set_blocked(self, True)
            asyncio.ensure_future(self._wait_drained())

    async def _wait_drained(self) -> None:
        try:
            await self.writer.drain()
        except ConnectionError:
            pass
        finally:
            self._draining = False
            self.app.worker.set_blocked(self, False)

    def send_header(self, header: dict) -> None:
        self.send([protocol.encode_header(header)])

    def send_error(self, rid, code: str, message: str, field: str | None = None) -> None:
        header = {"type": "error", "id": rid, "code": code, "message": message}
        if field is not None:
            header["field"] = field
        self.send_header(header)

    # ------------------------------------------------------------------ logging
    def _log_job(self, job, status: str) -> None:
        size = f"{job.width}x{job.height}" if job.kind == "render" else "-"
        extra = f"mode={job.mode} format={job.format}" if job.kind == "render" else ""
        self._log_request(job.id, job.kind, status, job.received, job.backend or "-", size,
                          extra)

    def _log_request(self, rid, kind: str, status: str, received: float, backend: str = "-",
                     size: str = "-", extra: str = "") -> None:
        if not self.app.config.log_requests:
            return
        ms = (time.perf_counter() - received) * 1e3 if received else 0.0
        line = (f"{self.peer} id={rid if rid is not None else '-'} type={kind} "
                f"backend={backend} size={size} status={status} ms={ms:.2f}")
        self.app.log(f"{line} {extra}".rstrip())
