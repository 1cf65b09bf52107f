"""Animation renders through the render server: what to ask for each frame, parameters read
ahead of time, and requests pipelined so that the server is not idle between frames.

Blender renders an animation one frame at a time: it evaluates the scene at the frame, calls
the engine's ``render()``, composites and writes the file, then moves on. Asking the server
for a frame only inside ``render()`` would leave it idle during everything else. So a
``SequenceJob`` (one per render job, ``render_init`` to ``render_complete`` /
``render_cancel``) keeps up to ``lookahead`` batch requests in flight::

    render_pre of frame f (main thread)             render() of frame f
    -------------------------------------------     -------------------------------------------
    scene.frame_set(g) for the coming frames g      read f's request from the render's own
    whose requests are not known yet, read them,    depsgraph; if the request in flight for f
    frame_set(f) back; send batch requests for      is the same, wait for its reply (else send
    f, f+step, ... until lookahead are in flight    one now); the engine writes the pixels

The server queues them and groups consecutive ones into one backend call (``batch_size`` in
its replies), so a GPU backend renders batches back to back. What is sent ahead is a guess
that ``render()`` checks: every frame is rendered from the parameters its own depsgraph gives,
so read-ahead can cost a wasted request, never a wrong frame.

When to send ahead. ``render_init`` does not tell a single frame (F12, ``-f 5``) from an
animation (``-a``), so requests are sent ahead from the second frame of a job on: a
single-frame render never asks for frames nobody will write.

Main thread only. ``frame_set`` may only run on Blender's main thread, which is where
background renders (``blender -b scene.blend -a``, ``bpy.ops.render.render()`` from scripts or
the ``bpy`` module) run their handlers. Renders started from the user interface (F12,
Ctrl+F12) run on a render thread: there each frame is requested inside ``render()`` and
waited for (the server idles while Blender writes the frame), and latent smoothing sees no
neighbouring frames.

Resuming. With Output > Overwrite off Blender skips frames whose file exists; the read-ahead
skips them too.

Failures. A frame that fails or is cancelled is never written: the engine reports an error,
which makes Blender discard the frame and stop the sequence; scripts calling
``bpy.ops.render.render`` get a RuntimeError. ``blender -b ... -a`` would still exit with
status 0, so when no Python code started the render, the ``render_cancel`` handler ends the
process with status 1. A failure while reading ahead only stops the read-ahead: ``render()``
then requests each frame itself and reports what fails for that frame.

Shots. Every request carries a ``shot`` (docs/protocol.md, "Shots"): the id
"<scene>/<camera>" (a camera switch starts a new shot), the scene's noise seed and the frame
number; with latent smoothing on, also the parameters of up to two frames either side of the
same shot (frames of the scene's range, rendered or skipped).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field

import bpy
from bpy.app.handlers import persistent

from ..portrait_rig import client as wire
from ..portrait_rig.params import Lighting, RigParams
from ..portrait_rig.protocol import SHOT_RADIUS
from . import app_handlers, compat, preferences, properties, rig_builder, scene_reader

ENGINE_ID = "PORTRAIT_RIG"           # the RenderEngine's bl_idname
POLL_S = 0.05                        # Esc (test_break) is checked this often while waiting
STALL_S = 30.0                       # a reply that started arriving must finish within this
CONNECT_TIMEOUT_S = 5.0
CLIENT_NAME = "Blender Portrait Rig render"


class RenderFailure(Exception):
    """A frame cannot be rendered (no server, server error, bad scene); for the user."""


class UserCancelled(Exception):
    """The user cancelled the render (Esc) while a frame was being waited for."""


@dataclass(frozen=True)
class PassInfo:
    """An extra pass: the protocol's name and how Blender registers it."""
    wire: str            # name in render requests / frame replies
    name: str            # Blender pass name (compositor socket)
    channels: int
    chan_id: str
    kind: str            # register_pass type: 'VECTOR', 'COLOR' or 'VALUE'
    prop: str            # switch on ViewLayer.portrait_rig_passes


PASSES = (
    PassInfo("normal", "Normal", 3, "XYZ", 'VECTOR', "use_pass_normal"),
    PassInfo("albedo", "Albedo", 3, "RGB", 'COLOR', "use_pass_albedo"),
    PassInfo("shading", "Shading", 3, "RGB", 'COLOR', "use_pass_shading"),
    PassInfo("mask", "Mask", 1, "X", 'VALUE', "use_pass_mask"),
)


def enabled_passes(view_layer) -> tuple[PassInfo, ...]:
    """The extra passes switched on for ``view_layer`` (View Layer properties > Passes)."""
    settings = getattr(view_layer, "portrait_rig_passes", None)
    if settings is None:
        return ()
    return tuple(info for info in PASSES if getattr(settings, info.prop))


# ---------------------------------------------------------------------------- one frame

@dataclass(frozen=True)
class RenderSpec:
    """Everything that decides the server's answer for one frame (one ``render`` request
    without its id and shot neighbours). ``key`` compares two specs exactly."""
    frame: int
    params: RigParams
    width: int
    height: int
    backend: str | None
    format: str                      # "rgb8", or "rgba8" for a transparent film
    passes: tuple[str, ...]          # protocol pass names
    shot: dict                       # {"id", "seed", "frame", "smooth"}
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "key", json.dumps(
            [self.params.to_dict(), self.width, self.height, self.backend, self.format,
             self.passes, self.shot], separators=(",", ":")))


def render_size(scene) -> tuple[int, int]:
    """The rendered frame size: resolution times percentage, as Blender computes it."""
    r = scene.render
    return (r.resolution_x * r.resolution_percentage // 100,
            r.resolution_y * r.resolution_percentage // 100)


def render_rig(scene):
    """The rig the scene renders: the one chosen in the Portrait Rig settings when it is in
    the scene, else the scene's only rig."""
    chosen = scene.portrait_rig.rig
    if chosen is not None and scene.objects.get(chosen.name) == chosen:
        return chosen
    rigs = [obj for obj in scene.objects if properties.is_rig(obj)]
    if len(rigs) == 1:
        return rigs[0]
    if not rigs:
        raise RenderFailure(f"scene '{scene.name}' has no Portrait Rig to render "
                            "(Add > Portrait Rig)")
    raise RenderFailure(f"scene '{scene.name}' has {len(rigs)} Portrait Rigs: choose the one "
                        "to render in Render Properties > Portrait Rig")


def render_view_layer(scene):
    """The view layer read-ahead reads (the first one that renders)."""
    if scene.render.use_single_layer:
        return bpy.context.view_layer if bpy.context.scene == scene else scene.view_layers[0]
    return next((layer for layer in scene.view_layers if layer.use), scene.view_layers[0])


def read_spec(scene, depsgraph, view_layer) -> RenderSpec:
    """The request for ``scene`` (the original scene) as ``depsgraph`` evaluates it, with the
    passes of ``view_layer``. Raises RenderFailure when the scene cannot be rendered."""
    settings = scene.portrait_rig
    evaluated = depsgraph.scene_eval
    rig = render_rig(scene)
    try:
        params = scene_reader.read_params(
            rig, evaluated, include_lights=settings.lighting == 'WORLD_LAMPS',
            appearance=rig.portrait_rig.to_dict(), depsgraph=depsgraph)
    except (scene_reader.SceneReadError, rig_builder.RigError) as exc:
        raise RenderFailure(str(exc)) from None
    if settings.lighting == 'DEFAULT':
        params.lighting = Lighting()
    options = scene.portrait_rig_render
    frame = evaluated.frame_current
    width, height = render_size(scene)
    return RenderSpec(
        frame=frame, params=params, width=width, height=height,
        backend=settings.backend or None,
        format="rgba8" if scene.render.film_transparent else "rgb8",
        passes=tuple(info.wire for info in enabled_passes(view_layer)),
        shot={"id": f"{scene.name}/{evaluated.camera.name}", "seed": options.seed,
              "frame": frame, "smooth": options.smooth})


def read_frames(scene, frames, each) -> None:
    """Evaluate ``scene`` at each of ``frames`` (frame_set) and call ``each(spec)`` with its
    RenderSpec; then return the scene to its frame. Main thread only (frame_set)."""
    current, subframe = scene.frame_current, scene.frame_subframe
    view_layer = render_view_layer(scene)
    try:
        for g in frames:
            scene.frame_set(g)
            each(read_spec(scene, view_layer.depsgraph, view_layer))
    finally:
        scene.frame_set(current, subframe=subframe)


def sequence_frames(scene) -> range:
    """The frames an animation render of ``scene`` visits (range and step)."""
    return range(scene.frame_start, scene.frame_end + 1, max(scene.frame_step, 1))


def output_exists(scene, frame: int) -> bool:
    """True when Blender will skip ``frame`` because Overwrite is off and its file exists
    (Blender's own test: the frame's output path exists)."""
    r = scene.render
    if r.use_overwrite or r.is_movie_format:
        return False
    return os.path.exists(r.frame_path(frame=frame))


def neighbour_frames(scene, frame: int) -> list[int]:
    """Up to SHOT_RADIUS frames of the scene's sequence on each side of ``frame``."""
    frames = sequence_frames(scene)
    if frame not in frames:
        return []
    index = frames.index(frame)
    lo, hi = max(index - SHOT_RADIUS, 0), min(index + SHOT_RADIUS + 1, len(frames))
    return [frames[i] for i in range(lo, hi) if i != index]


# ---------------------------------------------------------------------------- the wire

@dataclass
class FrameStats:
    frame: int
    batch_size: int
    render_ms: float          # the backend call that rendered it (shared by its batch)
    total_ms: float           # server time from request read to reply ready
    waited_ms: float          # how long render() blocked for it


class Pipeline:
    """Batch requests in flight on one connection and their replies. No bpy: runs on
    whichever thread renders. Every wait is bounded (``timeout`` seconds without any reply
    while requests are in flight) and checks ``should_stop`` every POLL_S."""

    def __init__(self, host: str, port: int, token: str = "", timeout: float = 300.0):
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.client: wire.Client | None = None
        self.in_flight: dict[int, tuple[object, str]] = {}   # frame -> (request id, spec key)
        self._frames: dict[object, int] = {}                  # request id -> frame
        self._done: dict[object, object] = {}                 # request id -> Frame | error
        self.requests = 0
        self.stats: list[FrameStats] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self) -> wire.Client:
        if self.client is None:
            client = wire.Client(self.host, self.port, token=self.token or None,
                                 timeout=CONNECT_TIMEOUT_S, client_name=CLIENT_NAME)
            try:
                client.connect()
            except wire.ServerError as exc:
                raise RenderFailure(f"the render server at {self.address} refused the "
                                    f"connection: {exc.message}") from None
            except OSError as exc:                      # refused, timed out, unreachable
                raise RenderFailure(
                    f"no render server at {self.address} ({exc}). Start one "
                    "(portrait-rig-server) or set its address in Preferences > Add-ons > "
                    "Portrait Rig") from None
            self.client = client
        return self.client

    def pending(self, frame: int) -> str | None:
        """The spec key of the request in flight for ``frame``, if any."""
        entry = self.in_flight.get(frame)
        return entry[1] if entry else None

    def submit(self, spec: RenderSpec, neighbors: list[dict] = ()) -> object:
        """Send a batch request for ``spec``; replaces any request in flight for its frame
        (whose reply will be dropped). Returns the request id."""
        client = self.connect()
        shot = dict(spec.shot, neighbors=list(neighbors)) if neighbors else spec.shot
        try:
            rid = client.send_render(spec.params, spec.width, spec.height,
                                     backend=spec.backend, format=spec.format,
                                     passes=spec.passes, mode="batch", shot=shot)
        except OSError as exc:
            raise self._lost(exc) from None
        self.forget(spec.frame)
        self.in_flight[spec.frame] = (rid, spec.key)
        self._frames[rid] = spec.frame
        self.requests += 1
        return rid

    def forget(self, frame: int) -> None:
        entry = self.in_flight.pop(frame, None)
        if entry is not None:
            self._frames.pop(entry[0], None)
            self._done.pop(entry[0], None)

    def wait(self, frame: int, should_stop) -> wire.Frame:
        """The reply to the request in flight for ``frame``. Raises UserCancelled when
        ``should_stop()`` turns true, RenderFailure on an error reply, a lost connection or
        ``timeout`` seconds without any reply."""
        rid = self.in_flight[frame][0]
        started = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        if should_stop():                               # also when the reply is already here
            raise UserCancelled()
        while rid not in self._done:
            try:
                ready = self.client.poll(POLL_S)
            except OSError as exc:
                raise self._lost(exc) from None
            if ready:
                self._receive()
                deadline = time.monotonic() + self.timeout
            elif should_stop():
                raise UserCancelled()
            elif time.monotonic() > deadline:
                raise RenderFailure(f"no reply from the render server at {self.address} for "
                                    f"{self.timeout:g} s (Render Properties > Portrait Rig > "
                                    "Timeout)")
        reply = self._done.pop(rid)
        del self.in_flight[frame], self._frames[rid]
        if isinstance(reply, wire.ServerError):
            where = f" ({reply.field})" if reply.field else ""
            raise RenderFailure(f"the render server could not render frame {frame}: "
                                f"{reply.message}{where}")
        timings = reply.timings
        self.stats.append(FrameStats(frame, int(reply.header.get("batch_size", 1)),
                                     float(timings.get("render", 0.0)),
                                     float(timings.get("total", 0.0)),
                                     (time.perf_counter() - started) * 1e3))
        return reply

    def _receive(self) -> None:
        try:
            reply = self.client.receive(timeout=STALL_S)
        except wire.ServerError as exc:
            if exc.id is None:                          # about the connection itself
                raise RenderFailure(f"the render server at {self.address} failed: "
                                    f"{exc.message}") from None
            reply = exc
        except OSError as exc:                          # ConnectionError, TimeoutError
            raise self._lost(exc) from None
        rid = reply.id if isinstance(reply, (wire.Frame, wire.ServerError)) else None
        if rid in self._frames:                         # replies to replaced requests drop
            self._done[rid] = reply

    def _lost(self, exc: BaseException) -> RenderFailure:
        self.close()
        return RenderFailure(f"lost the connection to the render server at {self.address}: "
                             f"{exc}")

    def close(self) -> None:
        """Close the connection; the server drops what is still queued for it."""
        if self.client is not None:
            self.client.close()
            self.client = None
        self.in_flight.clear()
        self._frames.clear()
        self._done.clear()


# ---------------------------------------------------------------------------- one job

class SequenceJob:
    """One render job of one scene: its connection, read-ahead and statistics."""

    def __init__(self, scene, read_ahead: bool):
        self.scene_name = scene.name
        self.read_ahead = read_ahead           # frame_set allowed (main thread)
        self.specs: dict[int, RenderSpec] = {}
        self.frames_started = 0
        self.pipeline: Pipeline | None = None
        self.failure: str | None = None        # set by the engine when a frame fails
        self.cancelled = False
        self.warned: set[str] = set()
        self.prefetch_hits = 0
        self.started = time.perf_counter()
        self.times_ms: dict[str, float] = {}   # where Blender's side spends its time

    def timed(self, name: str, since: float) -> float:
        """Add the milliseconds since ``since`` (perf_counter) to ``times_ms[name]``;
        returns now."""
        now = time.perf_counter()
        self.times_ms[name] = self.times_ms.get(name, 0.0) + (now - since) * 1e3
        return now

    def _pipeline(self, scene) -> Pipeline:
        if self.pipeline is None:
            prefs = preferences.get()
            host, port = prefs.server_address()
            if (error := preferences.network_error(host)) is not None:
                raise RenderFailure(error)
            self.pipeline = Pipeline(host, port, prefs.token,
                                     scene.portrait_rig_render.timeout)
        return self.pipeline

    # ------------------------------------------------------------ render_pre, main thread
    def before_frame(self, scene) -> None:
        """Read ahead and send the coming frames' requests (see the module notes)."""
        self.frames_started += 1
        if not self.read_ahead or self.failure or self.cancelled:
            return
        options = scene.portrait_rig_render
        frame = scene.frame_current
        frames = sequence_frames(scene)
        ahead: list[int] = []
        later: list[int] = []
        if self.frames_started >= 2 and options.lookahead > 0 and frame in frames:
            coming = [g for g in frames[frames.index(frame):] if not output_exists(scene, g)]
            ahead, later = coming[:options.lookahead], coming[options.lookahead:]
        needed = set(ahead)
        if options.smooth:
            for g in ahead or [frame]:
                needed.update(neighbour_frames(scene, g))
        missing = needed - self.specs.keys()
        if missing and ahead:
            missing.update(later[:options.lookahead])   # read the next stretch in one go
        try:
            pipeline = self._pipeline(scene) if ahead else None
            # Each request leaves as soon as it (and its smoothing window) is known, so the
            # server starts while the rest is read.
            self._read(scene, sorted(missing), lambda: self._send(scene, ahead, pipeline))
        except RenderFailure:
            # Reading ahead only saves time: stop it. render() reads and requests each frame
            # itself and reports what fails for that frame.
            self.read_ahead = False

    def _send(self, scene, frames: list[int], pipeline) -> None:
        """Submit the requests of ``frames`` (in order) not yet in flight, stopping at the
        first whose spec or smoothing window is still unknown."""
        for g in frames:
            spec = self.specs.get(g)
            if spec is None or (spec.shot["smooth"] and not self.window_known(scene, g)):
                return
            if pipeline.pending(g) != spec.key:
                pipeline.submit(spec, self.neighbours(scene, spec))

    def _read(self, scene, frames: list[int], after_each) -> None:
        """Read the specs of ``frames`` (``read_frames``), calling ``after_each()`` after
        each one."""
        start = time.perf_counter()
        if not frames:
            after_each()
            return

        def keep(spec: RenderSpec) -> None:
            self.specs[spec.frame] = spec
            after_each()
        try:
            read_frames(scene, frames, keep)
        finally:
            self.timed("read_ahead", start)

    def window_known(self, scene, frame: int) -> bool:
        return all(g in self.specs for g in neighbour_frames(scene, frame))

    def neighbours(self, scene, spec: RenderSpec) -> list[dict]:
        """The shot's neighbouring frames for latent smoothing, when all are known."""
        if not spec.shot["smooth"] or not self.window_known(scene, spec.frame):
            return []                          # no read-ahead here: no smoothing window
        known = [self.specs[g] for g in neighbour_frames(scene, spec.frame)]
        return [{"frame": s.frame, "params": s.params.to_dict()}
                for s in known if s.shot["id"] == spec.shot["id"]]

    # ------------------------------------------------------------ render()
    def render(self, scene, spec: RenderSpec, should_stop) -> wire.Frame:
        """The server's frame for ``spec`` (the request sent ahead when it matches)."""
        pipeline = self._pipeline(scene)
        self.specs[spec.frame] = spec
        if pipeline.pending(spec.frame) == spec.key:
            self.prefetch_hits += 1
        else:
            pipeline.submit(spec, self.neighbours(scene, spec))
        return pipeline.wait(spec.frame, should_stop)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()

    def summary(self) -> dict:
        """Figures of the job (for benchmarks, tests and the console)."""
        stats = self.pipeline.stats if self.pipeline else []
        return {"scene": self.scene_name, "frames": len(stats),
                "requests": self.pipeline.requests if self.pipeline else 0,
                "prefetch_hits": self.prefetch_hits,
                "frames_started": self.frames_started,
                "read_ahead": self.read_ahead, "times_ms": dict(self.times_ms),
                "failure": self.failure, "cancelled": self.cancelled,
                "seconds": time.perf_counter() - self.started,
                "per_frame": [vars(s) for s in stats]}


# ---------------------------------------------------------------------------- jobs

_jobs: dict[str, SequenceJob] = {}
_last_summary: dict | None = None


def job_for(scene) -> SequenceJob:
    """The current job of ``scene`` (created when the render started without render_init,
    which happens for scenes rendered through another scene's compositor)."""
    job = _jobs.get(scene.name)
    if job is None:
        job = _jobs[scene.name] = SequenceJob(scene, read_ahead=False)
    return job


def last_summary() -> dict | None:
    """``SequenceJob.summary()`` of the last finished render job."""
    return _last_summary


def _ours(scene) -> bool:
    return scene is not None and scene.render.engine == ENGINE_ID


@persistent
def on_render_init(scene, *_args):
    if _ours(scene):
        _finish_jobs()
        is_main = threading.current_thread() is threading.main_thread()
        _jobs[scene.name] = SequenceJob(scene, read_ahead=is_main)


@persistent
def on_render_pre(scene, *_args):
    job = _jobs.get(scene.name) if _ours(scene) else None
    if job is not None:
        job.before_frame(scene)


@persistent
def on_render_end(scene, *_args):
    failure = _finish_jobs()
    if failure and _nobody_waits():
        # ``blender -b file.blend -a`` (or ``-f``): Blender discards the failed frame and
        # stops, but its exit status would still be 0. Scripts (bpy.ops.render.render)
        # get the error as an exception instead and are not ended here.
        import sys
        print(f"Portrait Rig: render failed: {failure}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def _finish_jobs() -> str | None:
    """Close every job and keep the summary of the one that started first. Returns the
    first failure message, if any."""
    global _last_summary
    jobs = list(_jobs.values())
    _jobs.clear()
    for job in jobs:
        job.close()
    if jobs:
        _last_summary = jobs[0].summary()
    return next((job.failure for job in jobs if job.failure), None)


def _nobody_waits() -> bool:
    """True when a background render was started by Blender's command line rather than by
    Python code: no Python frame called into the render (the handler's caller is C)."""
    import sys
    if not bpy.app.background or compat.is_module():
        return False
    return sys._getframe(1).f_back is None   # the handler's frame has no Python caller


HANDLERS = (
    (bpy.app.handlers.render_init, on_render_init),
    (bpy.app.handlers.render_pre, on_render_pre),
    (bpy.app.handlers.render_complete, on_render_end),
    (bpy.app.handlers.render_cancel, on_render_end),
)


def register():
    app_handlers.add(HANDLERS)


def unregister():
    app_handlers.remove(HANDLERS)
    _finish_jobs()
