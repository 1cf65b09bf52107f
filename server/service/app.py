"""The render server: an asyncio TCP listener, its connections, the render lanes and the
fit queue.

``RenderServer`` ties together the face model arrays (``FaceData``, shared with the Blender
rig through the ``model`` message), the ``Scheduler`` of the device (one lane per backend),
the ``FitService`` and the connections. The event loop only parses, frames and writes; see
``server/service/scheduler.py`` for the queues and docs/security.md for the limits.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field

from portrait_rig import __version__, protocol

from server import paths
from server.service.connection import Connection
from server.service.fitting import FitError, FitService
from server.service.inverting import InvertService
from server.service.jobs import RequestError
from server.service.scheduler import Scheduler

# How long a client should wait for one frame before giving up (``hello.backends[*].
# reply_timeout``): progressive backends run tens of network evaluations per frame, minutes
# on a CPU, and their first request may load a checkpoint of a gigabyte.
REPLY_TIMEOUT_S = 60.0
PROGRESSIVE_REPLY_TIMEOUT_S = 900.0


@dataclass
class ServerConfig:
    host: str = protocol.DEFAULT_HOST
    port: int = protocol.DEFAULT_PORT
    backend: str = "preview"           # default backend of render requests
    model: str = "demo"                # face model source for load_face_data
    device: str = "cpu"
    token: str | None = None
    rate: float = 240.0                # messages per second per connection, sustained
    burst: int = 120                   # ... and at once
    max_queued_batch: int = 64         # queued batch/vertices requests per connection
    max_batch: int = 8                 # requests grouped into one backend call
    max_unsent: int = 16 << 20         # unsent reply bytes above which a connection is
                                       # neither read from nor rendered for
    write_timeout: float = 30.0        # ... and after which, unread, it is dropped
    idle_timeout: float = 600.0        # seconds without a request before a connection closes
    max_connections_per_address: int = 64
    max_frame_bytes: int = 256 << 20   # reply payload of one render request, at most
    max_batch_bytes: int = 128 << 20   # reply payloads grouped into one backend call, at
                                       # most (one request alone may reach max_frame_bytes)
    shutdown_grace: float = 5.0        # seconds to let renders in progress finish or stop
    allowed_folders: tuple[str, ...] = ()   # more folders requests may name files in
    log_requests: bool = True
    # backend name -> constructor options (``--option NAME.KEY=VALUE``; values may be strings)
    backend_options: dict[str, dict] = field(default_factory=dict)
    cluster: str | None = None             # Ray cluster address ("auto"): see server.cluster
    deca_model: str | None = None          # fit: DECA's deca_model.tar (FLAME face models)
    landmark_embedding: str | None = None  # fit: FLAME landmark embedding file


class RenderServer:
    def __init__(self, config: ServerConfig, face_data, scheduler: Scheduler,
                 backends: list[dict], states: dict | None = None):
        self.config = config
        self.face_data = face_data
        self.scheduler = scheduler
        self.backends = [dict(b, reply_timeout=PROGRESSIVE_REPLY_TIMEOUT_S if b.get("previews")
                              else REPLY_TIMEOUT_S) for b in backends]
        self.states = states or {}          # name -> server.backends.check.BackendState
        self.backend_names = tuple(b["name"] for b in backends)
        self.connections: set[Connection] = set()
        self._per_address: Counter = Counter()
        self._server: asyncio.base_events.Server | None = None
        self._model_header, self._model_buffers = face_data.to_wire()
        self._model_nbytes = sum(buf.nbytes for buf in self._model_buffers)
        self.texture_option = config.backend_options.get("diffusionrig", {}).get(
            "texture", "auto")
        self.fit_service = FitService(face_data, config.deca_model, config.landmark_embedding,
                                      self.texture_option, log=self.log)
        self._texture_lock = threading.Lock()
        self._texture = None                    # FlameTexture, or False: the server has none
        self.invert_service = InvertService(config.backend_options, config.device)
        self.stopped_cleanly = True     # False when a lane or a fit outlived the shutdown
        self.cluster = None             # a server.cluster.ClusterPool behind the lanes, if any

    # ------------------------------------------------------------------ replies
    def hello_reply(self) -> dict:
        cfg = self.config
        reply = {"type": "hello", "protocol": protocol.PROTOCOL_VERSION,
                 "server": "portrait-rig", "server_version": __version__,
                 "backends": [dict(b, **self.states[b["name"]].to_wire())
                              if b["name"] in self.states else b for b in self.backends],
                 "default_backend": cfg.backend,
                 "device": cfg.device, "face_model": self.face_data.summary(),
                 "formats": list(protocol.FRAME_FORMATS), "passes": dict(protocol.PASSES),
                 "limits": {"max_header_bytes": protocol.MAX_HEADER_BYTES,
                            "max_hello_bytes": protocol.MAX_HELLO_BYTES,
                            "max_header_depth": protocol.MAX_HEADER_DEPTH,
                            "max_client_payload": protocol.MAX_CLIENT_PAYLOAD,
                            "max_frame_side": protocol.MAX_FRAME_SIDE,
                            "max_frame_bytes": cfg.max_frame_bytes,
                            "max_batch_bytes": cfg.max_batch_bytes,
                            "rate": cfg.rate, "burst": cfg.burst,
                            "max_queued_batch": cfg.max_queued_batch,
                            "max_batch": cfg.max_batch,
                            "max_queued_fits": self.fit_service.max_per_owner,
                            "max_unsent": cfg.max_unsent,
                            "write_timeout": cfg.write_timeout,
                            "idle_timeout": cfg.idle_timeout,
                            "max_connections_per_address": cfg.max_connections_per_address}}
        if self.cluster is not None:                           # a cluster's workers
            reply["workers"] = self.cluster.workers()
        return reply

    def model_message(self, rid) -> list:
        """The ``model`` reply: header, then the arrays' own buffers (no copy)."""
        header = dict(self._model_header, type="model", id=rid)
        return [protocol.encode_header(header, self._model_nbytes), *self._model_buffers]

    def texture_message(self, rid, components: int) -> list:
        """The ``texture`` reply (docs/protocol.md): the texture space the ``diffusionrig``
        backend samples, its mean and first ``components`` directions; no arrays when the
        server has none for its face model. Blocking: the first call reads the file."""
        from server.renderer.texture import choose_texture

        with self._texture_lock:
            if self._texture is None:
                self._texture = choose_texture(self.texture_option,
                                               self.face_data.n_triangles) or False
            texture = self._texture
            if not texture:
                header, buffers = {"size": 0, "components": 0, "source": "", "arrays": []}, []
            else:
                texture.check_triangles(self.face_data.n_triangles)
                header, buffers = texture.client_space(components).to_wire()
        nbytes = sum(buf.nbytes for buf in buffers)
        return [protocol.encode_header(dict(header, type="texture", id=rid), nbytes), *buffers]

    @staticmethod
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (port 0 picks a free one)."""
        self._server = await asyncio.start_server(self._accept, self.config.host,
                                                  self.config.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _accept(self, reader, writer) -> None:
        host = writer.get_extra_info("peername")[0]
        cap = self.config.max_connections_per_address
        if self._per_address[host] >= cap:
            await _refuse_connection(writer, protocol.E_TOO_MANY_CONNECTIONS,
                                     f"{cap} connections from this address are open already; "
                                     "close one (or ask for a higher "
                                     "--max-connections-per-address)")
            self.log(f"{host} refused: over {cap} connections")
            return
        self._per_address[host] += 1
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            self._per_address[host] -= 1
            if not self._per_address[host]:
                del self._per_address[host]

    async def shutdown(self) -> None:
        """Stop accepting; answer queued requests and fits ``shutting_down``; cancel the
        renders in progress (progressive backends stop between steps) and wait for them up to
        ``shutdown_grace`` s; answer whatever is still open ``shutting_down``; then flush and
        close every connection. Sets ``stopped_cleanly`` to whether every lane and fit ended
        (the process must not wait for one that did not: see ``server/cli.py``)."""
        if self._server is not None:
            self._server.close()
        error = RequestError(protocol.E_SHUTTING_DOWN, "the server is shutting down")
        for job in self.scheduler.stop():
            job.answer(None, error)
        for fit in self.fit_service.stop():
            fit.answer(None, FitError(protocol.E_SHUTTING_DOWN, str(error)))
        finished = await asyncio.to_thread(self.scheduler.join, self.config.shutdown_grace)
        for job in self.scheduler.running():
            job.answer(None, error)                 # does nothing for jobs answered already
        if not finished:
            self.log(f"shutdown: renders still running after {self.config.shutdown_grace:g} s "
                     "are abandoned (their requests were answered)")
        self.stopped_cleanly = finished and not self.fit_service.busy()
        for _ in range(3):
            await asyncio.sleep(0)                  # run the deliveries the lanes posted
        await asyncio.gather(*(conn.close() for conn in list(self.connections)),
                             return_exceptions=True)


def check_backends(config: ServerConfig) -> dict:
    """Every backend's ``BackendState`` for ``config``. Raises ValueError for an unknown
    backend, options that do not parse (a typo fails now, not at the first frame) and a
    default backend that cannot run."""
    from server.backends import BACKEND_NAMES, backend_options, spec
    from server.backends.check import check_backend

    for name, given in config.backend_options.items():
        backend_options(spec(name).name, given)
    spec(config.backend)
    states = {name: check_backend(name, config.backend_options.get(name, {}))
              for name in BACKEND_NAMES}
    default = states[config.backend]
    if default.state != "ready":
        raise ValueError(f"the default backend {config.backend!r} cannot run: {default.reason} "
                         "(portrait-rig-server --check lists what every backend needs)")
    return states


async def _refuse_connection(writer, code: str, message: str) -> None:
    """Answer a connection that is not served with one ``error``, then close it."""
    writer.write(protocol.encode_header({"type": "error", "id": None, "code": code,
                                         "message": message}))
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 5.0)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        writer.transport.abort()


def build_server(config: ServerConfig) -> RenderServer:
    """Check every backend, load the face model, build the default backend and warm it up,
    start the lanes. Blocks until they are ready; raises what prevented it."""
    if config.cluster:
        from server.cluster import build_cluster_server
        return build_cluster_server(config)
    from portrait_rig.face_source import load_face_data

    from server.backends import create_backend, describe_backends
    from server.backends.base import BackendUnavailable
    from server.backends.check import check_backend

    states = check_backends(config)
    log = RenderServer.log
    for state in states.values():
        if state.state != "ready":
            log(f"backend {state.name}: unavailable: {state.reason}")

    def factory(name, face_model, device):
        # Built on first use, on the backend's lane. A backend that cannot be built is refused
        # with what to do; the lane keeps that answer until a file it reads changes, and then
        # the files are checked again here.
        state = states[name]
        if state.state == "unavailable":
            state = states[name] = check_backend(name, config.backend_options.get(name, {}))
            if state.state == "unavailable":
                raise BackendUnavailable(f"backend {name!r} is unavailable: {state.reason}")
        state.state = "loading"
        try:
            backend = create_backend(name, face_model, device,
                                     **config.backend_options.get(name, {}))
        except Exception as exc:
            state.state, state.reason = "unavailable", f"{type(exc).__name__}: {exc}"
            raise BackendUnavailable(f"backend {name!r} could not start: {state.reason}") \
                from exc
        state.state = "ready"
        log(f"backend {name}: {backend.summary()}")
        return backend

    def files(name):                    # option values that name files: watched for changes
        return [value for value in config.backend_options.get(name, {}).values()
                if isinstance(value, str)]

    paths.allow_folders(config.allowed_folders)
    face_data = load_face_data(paths.face_model_source(config.model))
    scheduler = Scheduler(face_data, config.device, config.backend, factory,
                          max_queued_batch=config.max_queued_batch, max_batch=config.max_batch,
                          max_batch_bytes=config.max_batch_bytes, backend_files=files)
    scheduler.start()
    return RenderServer(config, face_data, scheduler, list(describe_backends()), states)
