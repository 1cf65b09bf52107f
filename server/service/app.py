"""The render server: an asyncio TCP listener, its connections and the device's render worker.

``RenderServer`` ties together the face model arrays (``FaceData``, shared with the Blender
rig through the ``model`` message), one ``RenderWorker`` per device and the connections. The
event loop only parses, frames and writes; see ``server/service/scheduler.py`` for the queues.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass, field

from portrait_rig import __version__, protocol

from server.service.connection import Connection
from server.service.fitting import FitService
from server.service.inverting import InvertService
from server.service.jobs import RequestError
from server.service.scheduler import RenderWorker


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
    output_high_water: int = 16 << 20  # unsent bytes above which a connection is not served
    shutdown_grace: float = 10.0       # seconds to let the render in progress finish
    log_requests: bool = True
    # backend name -> constructor options (``--option NAME.KEY=VALUE``; values may be strings)
    backend_options: dict[str, dict] = field(default_factory=dict)
    cluster: str | None = None             # Ray cluster address ("auto"): see server.cluster
    deca_model: str | None = None          # fit: DECA's deca_model.tar (FLAME face models)
    landmark_embedding: str | None = None  # fit: FLAME landmark embedding file


class RenderServer:
    def __init__(self, config: ServerConfig, face_data, worker: RenderWorker,
                 backends: list[dict], states: dict | None = None):
        self.config = config
        self.face_data = face_data
        self.worker = worker
        self.backends = backends
        self.states = states or {}          # name -> server.backends.check.BackendState
        self.backend_names = tuple(b["name"] for b in backends)
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._model_header, self._model_buffers = face_data.to_wire()
        self._model_nbytes = sum(buf.nbytes for buf in self._model_buffers)
        self.texture_option = config.backend_options.get("diffusionrig", {}).get(
            "texture", "auto")
        self.fit_service = FitService(face_data, config.deca_model, config.landmark_embedding,
                                      self.texture_option)
        self._texture_lock = threading.Lock()
        self._texture = None                    # FlameTexture, or False: the server has none
        self.invert_service = InvertService(config.backend_options, config.device)

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
                            "max_client_payload": protocol.MAX_CLIENT_PAYLOAD,
                            "max_frame_side": protocol.MAX_FRAME_SIDE,
                            "rate": cfg.rate, "burst": cfg.burst,
                            "max_queued_batch": cfg.max_queued_batch,
                            "max_batch": cfg.max_batch}}
        if self.worker.executor is not None:                  # a cluster's workers
            reply["workers"] = self.worker.executor.workers()
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
                                               self.face_data.n_faces) or False
            texture = self._texture
            if not texture:
                header, buffers = {"size": 0, "components": 0, "source": "", "arrays": []}, []
            else:
                texture.check_faces(self.face_data.n_faces)
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
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    async def shutdown(self) -> None:
        """Stop accepting, answer queued requests with ``shutting_down``, let the render in
        progress finish and deliver (up to ``shutdown_grace`` s), then close every connection."""
        if self._server is not None:
            self._server.close()
        error = RequestError(protocol.E_SHUTTING_DOWN, "the server is shutting down")
        for job in self.worker.stop():
            job.done(job, None, error)
        finished = await asyncio.to_thread(self.worker.join, self.config.shutdown_grace)
        if not finished:
            self.log(f"shutdown: a render still running after {self.config.shutdown_grace:g} s "
                     "is abandoned")
        await asyncio.sleep(0)           # run the deliveries the worker posted
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


def build_server(config: ServerConfig) -> RenderServer:
    """Check every backend, load the face model, build the default backend on the worker
    thread and warm it up. Blocks until the worker is ready; raises what prevented it."""
    if config.cluster:
        from server.cluster import build_cluster_server
        return build_cluster_server(config)
    from portrait_rig.face_source import load_face_data

    from server.backends import create_backend, describe_backends
    from server.backends.base import BackendUnavailable

    states = check_backends(config)
    log = RenderServer.log
    for state in states.values():
        if state.state != "ready":
            log(f"backend {state.name}: unavailable: {state.reason}")

    def factory(name, face_model, device):
        # Built on first use. A backend that could not be built keeps its error and is not
        # rebuilt on every request; ``--check`` says how to fix it.
        state = states[name]
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

    from server.paths import face_model_source
    face_data = load_face_data(face_model_source(config.model))
    worker = RenderWorker(face_data, config.device, config.backend, factory,
                          max_queued_batch=config.max_queued_batch, max_batch=config.max_batch)
    worker.start()
    return RenderServer(config, face_data, worker, list(describe_backends()), states)
