"""Live link: stream the live rig's parameters to the render server, show the frames.

Threads and ownership::

    main thread (bpy)                          worker thread (socket, never bpy)
    -----------------                          ---------------------------------
    depsgraph_update_post / frame_change_post
      read_params(rig) -> RigParams
      changed? -> LatestSlot.put(job)  ----->  takes the newest job, send_render(mode="live")
                                               receive() -> Frame
    bpy.app.timers: drain_frames()     <-----  queue.Queue.put((frame, round trip ms))
      newest frame -> image "Portrait Rig"
      tag Image Editors for redraw

The handlers only compare parameters and fill a one-value slot (latest wins), so they never
block; connecting, reconnecting (back-off 0.5 s doubling to 10 s) and waiting for frames all
happen on the worker, so a dead or slow server cannot freeze Blender. The server itself
drops live requests that a newer one replaced before they started.

Timers do not run without Blender's event loop (``bpy`` as a module, ``blender -b``): there
the caller drives ``drain_frames`` itself.

One rig streams at a time (``Scene.portrait_rig.rig``): the server renders one head per frame.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import bpy
from bpy.app.handlers import persistent

from ..portrait_rig import client as wire
from ..portrait_rig.params import Lighting, RigParams
from . import app_handlers, image_output, preferences, rig_builder, scene_reader

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
CONNECT_TIMEOUT_S = 3.0        # a blackholed host costs the worker this much, never the UI
RECEIVE_POLL_S = 0.01          # how long the worker listens before it looks for newer params
IDLE_POLL_S = 0.25             # the worker's wake-up period when nothing is in flight
RENDER_TIMEOUT_S = 120.0       # no reply for this long: drop the connection and reconnect
MAX_IN_FLIGHT = 4              # live requests beyond the server's latest-wins safety margin
TIMER_INTERVAL_S = 1.0 / 120.0
FRAME_FORMAT = "rgba8"         # raw pixels in Blender's RGBA layout (see image_output)

# States shown in the panel.
DISCONNECTED, CONNECTING, CONNECTED, ERROR = "Disconnected", "Connecting", "Connected", "Error"


@dataclass(frozen=True)
class RenderJob:
    """One live request: immutable, built on the main thread, sent by the worker."""
    params: RigParams
    width: int
    height: int
    backend: str | None


class LatestSlot:
    """A one-value mailbox: ``put`` replaces what is pending, ``take`` empties it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._value = None
        self._ready = threading.Event()

    def put(self, value) -> None:
        with self._lock:
            self._value = value
            self._ready.set()

    def take(self):
        with self._lock:
            value, self._value = self._value, None
            self._ready.clear()
            return value

    def wait(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def wake(self) -> None:
        self._ready.set()


class LinkStatus:
    """What the worker reports, read by the UI. All access under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.state = DISCONNECTED
        self.error = ""
        self.hello: dict = {}
        self.retry_in = 0.0
        self.version = 0             # bumped on every change so the UI redraws only then

    def set(self, state: str, error: str | None = None, **fields) -> None:
        with self._lock:
            self.state = state
            if error is not None:
                self.error = error
            for name, value in fields.items():
                setattr(self, name, value)
            self.version += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"state": self.state, "error": self.error, "hello": self.hello,
                    "retry_in": self.retry_in, "version": self.version}


class LinkWorker(threading.Thread):
    """Owns the connection. Touches no bpy data: jobs come in through ``slot``, frames leave
    through ``frames`` as ``(Frame, round trip ms)``, state through ``status``."""

    def __init__(self, host: str, port: int, token: str | None):
        super().__init__(name=f"Portrait Rig live link {host}:{port}", daemon=True)
        self.host, self.port, self.token = host, port, token
        self.slot = LatestSlot()
        self.frames: queue.Queue = queue.Queue()
        self.status = LinkStatus()
        self._stopping = threading.Event()
        self._last_job: RenderJob | None = None
        self._progressive: set = set()
        self._default_backend = None

    def stop(self) -> None:
        self._stopping.set()
        self.slot.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self.stopping:
            self.status.set(CONNECTING, retry_in=0.0)
            client = wire.Client(self.host, self.port, token=self.token or None,
                                 timeout=CONNECT_TIMEOUT_S, client_name="Blender Portrait Rig")
            try:
                hello = client.connect()
            except (OSError, wire.ServerError) as exc:      # TimeoutError is an OSError
                client.close()
                self.status.set(ERROR, _describe(exc, self.host, self.port), retry_in=backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2.0, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_MIN_S
            self.status.set(CONNECTED, "", hello=hello)
            # Progressive backends (diffusion) stream x0 previews of a live frame, so the
            # artist sees the edit after one sampler step instead of after all of them.
            self._progressive = {b.get("name") for b in hello.get("backends", [])
                                 if isinstance(b, dict) and b.get("previews")}
            self._default_backend = hello.get("default_backend")
            if self._last_job is not None and self.slot.take() is None:
                self.slot.put(self._last_job)               # re-render after a reconnect
            try:
                self._serve(client)
            except (OSError, wire.ServerError) as exc:
                if not self.stopping:
                    self.status.set(ERROR, _describe(exc, self.host, self.port),
                                    retry_in=BACKOFF_MIN_S)
                    self._stopping.wait(BACKOFF_MIN_S)
            finally:
                client.close()
        self.status.set(DISCONNECTED, "")

    def _serve(self, client: wire.Client) -> None:
        in_flight: dict[object, tuple[int, float]] = {}   # request id -> (send order, time)
        sent = failed = 0              # send order of the newest request, of the last failure
        while not self.stopping:
            if len(in_flight) < MAX_IN_FLIGHT and (job := self.slot.take()) is not None:
                backend = job.backend or self._default_backend
                rid = client.send_render(job.params, job.width, job.height, backend=job.backend,
                                         format=FRAME_FORMAT, mode="live",
                                         previews=backend in self._progressive)
                sent += 1
                in_flight[rid] = (sent, time.perf_counter())
                self._last_job = job
            if not in_flight and self.slot.wait(IDLE_POLL_S):
                continue
            try:
                # Idle, this is a probe: the server sends nothing unasked, so a reply here is
                # an error about the connection, and a closed socket shows up at once.
                reply = client.receive(timeout=RECEIVE_POLL_S if in_flight else 1e-3)
            except TimeoutError:
                oldest = min((t for _, t in in_flight.values()), default=time.perf_counter())
                if time.perf_counter() - oldest > RENDER_TIMEOUT_S:
                    raise TimeoutError(f"no frame within {RENDER_TIMEOUT_S:g} s") from None
                continue
            except wire.ServerError as exc:
                if exc.id not in in_flight:
                    raise                                   # about the connection itself
                failed = in_flight.pop(exc.id)[0]
                self.status.set(CONNECTED, _describe(exc, self.host, self.port))
                continue
            if isinstance(reply, wire.Preview):
                if reply.id in in_flight:                   # the request's frame follows
                    self.frames.put((reply, (time.perf_counter() - in_flight[reply.id][1]) * 1e3))
                continue
            order, start = in_flight.pop(getattr(reply, "id", None), (0, 0.0))
            if isinstance(reply, wire.Frame) and order:
                self.frames.put((reply, (time.perf_counter() - start) * 1e3))
                if order > failed and self.status.error:
                    # Only a newer request's frame clears an error: an older one in flight
                    # says nothing about the parameters that failed.
                    self.status.set(CONNECTED, "")


def _describe(exc: BaseException, host: str, port: int) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"No server at {host}:{port} (connection refused)"
    if isinstance(exc, wire.ServerError):
        where = f" ({exc.field})" if exc.field else ""
        return f"Server: {exc.message}{where}"
    return str(exc) or type(exc).__name__


# ----------------------------------------------------------------------------------------
# Main-thread state

class _Session:
    """What the main thread keeps about the current link."""

    def __init__(self, worker: LinkWorker):
        self.worker = worker
        self.last_key: tuple | None = None       # last job handed over, to skip repeats
        self.local_error = ""                    # main-thread failures (read_params)
        self.fps = 0.0
        self.last_frame_ms = 0.0
        self.server_ms = 0.0
        self.frames_shown = 0
        self._last_shown = 0.0
        self.status_version = -1

    def frame_shown(self, round_trip_ms: float, server_ms: float) -> None:
        now = time.perf_counter()
        if self._last_shown:
            rate = 1.0 / max(now - self._last_shown, 1e-6)
            self.fps = rate if not self.fps else 0.8 * self.fps + 0.2 * rate
        self._last_shown = now
        self.last_frame_ms, self.server_ms = round_trip_ms, server_ms
        self.frames_shown += 1


_session: _Session | None = None
_start_error = ""                         # why the last start() refused, shown while stopped


def is_running() -> bool:
    return _session is not None


def status() -> dict:
    """For the panel: state, error, fps, last frame ms, backends, address."""
    if _session is None:
        return {"state": DISCONNECTED, "error": _start_error, "fps": 0.0,
                "last_frame_ms": 0.0, "server_ms": 0.0, "frames": 0, "address": "",
                "retry_in": 0.0}
    snap = _session.worker.status.snapshot()
    worker = _session.worker
    return {"state": snap["state"], "error": _session.local_error or snap["error"],
            "fps": _session.fps, "last_frame_ms": _session.last_frame_ms,
            "server_ms": _session.server_ms, "frames": _session.frames_shown,
            "address": f"{worker.host}:{worker.port}", "retry_in": snap["retry_in"]}


def backends() -> list[tuple[str, str]]:
    """(name, description) of the connected server's backends; empty when not connected."""
    if _session is None:
        return []
    out = []
    for entry in _session.worker.status.snapshot()["hello"].get("backends", []):
        if isinstance(entry, dict) and entry.get("name"):
            out.append((str(entry["name"]), str(entry.get("description", ""))))
        elif isinstance(entry, str):
            out.append((entry, ""))
    return out


def start(host: str, port: int, token: str = "") -> None:
    """Start (or restart) the link to ``host:port``. Returns at once; the worker connects.
    Raises ValueError when the network policy forbids the host."""
    global _session, _start_error
    if (error := preferences.network_error(host)) is not None:
        _start_error = error
        _tag_redraw(('VIEW_3D',))
        raise ValueError(error)
    stop()
    _start_error = ""
    worker = LinkWorker(host, port, token)
    _session = _Session(worker)
    worker.start()
    if not bpy.app.timers.is_registered(drain_frames):
        bpy.app.timers.register(drain_frames, first_interval=TIMER_INTERVAL_S, persistent=True)


def start_from_preferences(scene=None) -> None:
    """Connect with the add-on preferences' host, port and token unless already connected
    that way; picks the active rig as the live rig when the scene has none."""
    prefs = preferences.get()
    host, port = prefs.server_address()
    worker = _session.worker if _session is not None else None
    if worker is None or (worker.host, worker.port, worker.token) != (host, port, prefs.token):
        start(host, port, prefs.token)
    if scene is not None:
        settings = scene.portrait_rig
        if settings.rig is None:
            active = bpy.context.view_layer.objects.active if bpy.context.view_layer else None
            rig = rig_builder.find_rig(active) if active is not None else None
            if rig is not None:
                settings.rig = rig


def stop(join_timeout: float = 0.0) -> None:
    """Stop the link. The worker exits on its own within its connect / poll timeouts;
    ``join_timeout`` > 0 waits for it (used when the add-on is disabled)."""
    global _session
    session, _session = _session, None
    if session is not None:
        session.worker.stop()
        if join_timeout > 0:
            session.worker.join(join_timeout)
    if bpy.app.timers.is_registered(drain_frames):
        bpy.app.timers.unregister(drain_frames)
    _tag_redraw(('VIEW_3D',))


def request_resend(scene=None) -> None:
    """Send the current parameters again (settings outside RigParams changed)."""
    if _session is not None:
        _session.last_key = None
        if scene is not None:
            sync(scene)


# ----------------------------------------------------------------------------------------
# Handlers (main thread; must stay cheap and never block)

def sync(scene, depsgraph=None) -> None:
    """Hand the live rig's current parameters to the worker when they changed."""
    session = _session
    if session is None:
        return
    settings = scene.portrait_rig
    rig = settings.rig
    if not settings.live or rig is None:
        return
    try:
        params = scene_reader.read_params(
            rig, scene, include_lights=settings.lighting == 'WORLD_LAMPS',
            appearance=rig.portrait_rig.to_dict())
    except Exception as exc:              # a broken scene must not break the handler chain
        session.local_error = f"Reading the rig failed: {exc}"
        return
    session.local_error = ""
    if settings.lighting == 'DEFAULT':
        params.lighting = Lighting()
    key = (params.to_json(), settings.width, settings.height, settings.backend)
    if key == session.last_key:
        return
    session.last_key = key
    session.worker.slot.put(RenderJob(params, settings.width, settings.height,
                                      settings.backend or None))


@persistent
def on_depsgraph_update_post(scene, depsgraph):
    if _session is None:
        return
    # Our own frames (and image edits) change no rig.
    if any(not isinstance(update.id, bpy.types.Image) for update in depsgraph.updates):
        sync(scene, depsgraph)


@persistent
def on_frame_change_post(scene, depsgraph=None):
    sync(scene, depsgraph)


@persistent
def on_load_post(*_args):
    """A new file: its scenes decide again whether to stream; the connection stays."""
    if _session is not None:
        _session.last_key = None


HANDLERS = (
    (bpy.app.handlers.depsgraph_update_post, on_depsgraph_update_post),
    (bpy.app.handlers.frame_change_post, on_frame_change_post),
    (bpy.app.handlers.load_post, on_load_post),
)


# ----------------------------------------------------------------------------------------
# Frames -> image (timer on the main thread)

def drain_frames() -> float | None:
    """Show the newest frame the worker received (older ones are dropped) and refresh the
    status display. The timer function; call it directly where timers do not run.
    Returns the timer interval, or None once the link is stopped."""
    session = _session
    if session is None:
        return None
    newest = None
    while True:
        try:
            newest = session.worker.frames.get_nowait()
        except queue.Empty:
            break
    areas = []
    if newest is not None:
        frame, round_trip_ms = newest
        image_output.write_frame(frame)
        session.frame_shown(round_trip_ms, float(frame.timings.get("total", 0.0)))
        areas.append('IMAGE_EDITOR')
    version = session.worker.status.snapshot()["version"]
    if newest is not None or version != session.status_version:
        session.status_version = version
        areas.append('VIEW_3D')           # the sidebar's status line
    if areas:
        _tag_redraw(tuple(areas))
    return TIMER_INTERVAL_S


def _tag_redraw(area_types: tuple[str, ...]) -> None:
    wm = getattr(bpy.context, "window_manager", None)
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in area_types:
                area.tag_redraw()


def register():
    app_handlers.add(HANDLERS)


def unregister():
    stop(join_timeout=CONNECT_TIMEOUT_S + 1.0)
    app_handlers.remove(HANDLERS)
    if bpy.app.timers.is_registered(drain_frames):
        bpy.app.timers.unregister(drain_frames)
    global _start_error
    _start_error = ""
