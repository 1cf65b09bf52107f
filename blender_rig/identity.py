"""Identity from Photo: a portrait photo becomes the rig's StyleGAN identity and its pose.

The render server inverts the photo into a named identity (the ``invert`` message, with
previews) and fits the face model to it (``fit``, as *Fit Rig to Photo*); then the rig gets

* the fit (``photo_fit.apply_fit``): identity and expression keys, head and jaw rotation,
  optionally the light;
* the photo's framing (the ``invert`` reply's ``roll`` and ``shift``): the head is rolled about
  the camera's viewing axis so that its roll relative to the camera is the photo's, and the
  rig is moved across the view, at its depth, until its root lands at ``shift`` (frame widths
  from the centre, x right, y down) - the stylerig backend renders both through StyleGAN3's
  input transform, so the first frame shows the photo's framing;
* ``appearance.identity`` = the name, and the live link's backend ``stylerig``.

Threads, as in the live link: the network work runs on a worker thread (never bpy); a timer
(``drain``) on the main thread shows the previews in the image "Portrait Rig Identity" and
applies the results, so Blender never waits for the server. One photo at a time.

*Refresh Edits* asks the server for its edit directions (``identities``) on the same worker
and lists them as the rig's edit sliders (``appearance.edits``), which can be keyframed.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from pathlib import Path

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty

from ..portrait_rig import client as wire
from ..portrait_rig.rotations import axis_angle_to_matrix, roll_matrix, split_roll
from . import image_output, photo_fit, preferences, rig_builder, scene_reader
from .operators import active_rig
from .panel import RigSection
from .transforms import as_matrix, matrix_to_quaternion, rotation_part

PREVIEW_IMAGE = "Portrait Rig Identity"
TIMER_INTERVAL_S = 0.1
INVERT_TIMEOUT_S = 3600.0
METHOD_ITEMS = (
    ('auto', "Auto", "The server's encoder when it has one, else optimisation"),
    ('encoder', "Encoder", "The photo encoder only (fast)"),
    ('optimisation', "Optimisation", "Optimise the latent against the photo (slow, close)"),
)

_status = {"state": "idle", "message": "", "step": 0, "steps": 0, "name": ""}
_task: "_Task | None" = None


class _Task:
    """One job on a worker thread; results come back through ``events``."""

    def __init__(self, work, on_event):
        self.events: queue.Queue = queue.Queue()
        self.on_event = on_event
        self.client = None
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True,
                                       name="portrait-rig-identity")

    def _run(self, work) -> None:
        try:
            work(self)
        except Exception as exc:  # noqa: BLE001 - reported on the main thread
            if self.cancelled.is_set():
                message = "cancelled"
            elif isinstance(exc, (wire.ServerError, ValueError, OSError, TimeoutError)):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}"
            self.events.put(("error", message))
        finally:
            self.events.put(("end", None))

    def connect(self) -> wire.Client:
        prefs = preferences.get()
        host, port = prefs.server_address()
        if (error := preferences.network_error(host)) is not None:
            raise ValueError(error)
        self.client = wire.Client(host, port, token=prefs.token or None, timeout=30.0,
                                  client_name="Blender Portrait Rig (identity)")
        self.client.connect()
        return self.client

    def cancel(self) -> None:
        self.cancelled.set()
        if self.client is not None:
            self.client.close()                 # the server stops the inversion it serves


def status() -> dict:
    return dict(_status)


def is_running() -> bool:
    return _task is not None


def _start(work, on_event, message: str) -> None:
    global _task
    if _task is not None:
        raise ValueError("the server is still working on the last photo")
    _task = _Task(work, on_event)
    _status.update(state="running", message=message, step=0, steps=0)
    _task.thread.start()
    if not bpy.app.timers.is_registered(drain):
        bpy.app.timers.register(drain, first_interval=TIMER_INTERVAL_S)


def drain() -> float | None:
    """Timer: handle what the worker sent; keeps running while a task is active."""
    global _task
    task = _task
    if task is None:
        return None
    while True:
        try:
            kind, value = task.events.get_nowait()
        except queue.Empty:
            return TIMER_INTERVAL_S
        if kind == "end":
            _task = None
            if _status["state"] == "running":
                _status.update(state="done")
            return None
        if kind == "error":
            _status.update(state="error", message=value)
            continue
        try:
            task.on_event(kind, value)
        except Exception as exc:  # noqa: BLE001 - the scene changed under us, etc.
            _status.update(state="error", message=f"{type(exc).__name__}: {exc}")


def cancel() -> None:
    if _task is not None:
        _task.cancel()


# ---------------------------------------------------------------------------- identity

def identity_from_photo(rig, scene, photo: Path, name: str, *, method: str = "auto",
                        steps: int = 0, light: bool = True) -> None:
    """Start inverting and fitting ``photo`` for ``rig`` (module notes); returns at once."""
    data = Path(photo).read_bytes()
    rig_name, scene_name = rig.name, scene.name
    options = {"method": method, "format": "rgb8"}
    if steps:
        options["steps"] = steps

    def work(task: _Task) -> None:
        with task.connect() as client:
            reply = client.invert(data, name, timeout=INVERT_TIMEOUT_S, **options,
                                  on_preview=lambda p: task.events.put(("preview", p)))
            task.events.put(("inverted", reply))
            task.events.put(("fitted", client.fit(data, timeout=photo_fit.FIT_TIMEOUT_S)))

    replies = {}

    def on_event(kind: str, value) -> None:
        if kind == "preview":
            image_output.write_frame(value, PREVIEW_IMAGE)
            _status.update(step=value.step, steps=value.steps,
                           message=f"inverting: step {value.step} of {value.steps}")
            return
        replies[kind] = value
        if kind == "inverted":
            _status.update(message=f"inverted ({value['method']}); fitting the rig")
            return
        rig_obj, target = bpy.data.objects.get(rig_name), bpy.data.scenes.get(scene_name)
        if rig_obj is None or target is None:
            raise ValueError(f"the rig '{rig_name}' or scene '{scene_name}' is gone")
        inverted = replies["inverted"]
        photo_fit.apply_fit(rig_obj, target, value, light=light)
        placed = apply_frame(rig_obj, target, inverted["roll"], inverted["shift"])
        rig_obj.portrait_rig.identity = name
        target.portrait_rig.backend = "stylerig"     # the backend that renders identities
        metrics = inverted.get("metrics") or {}
        _status.update(state="done", message=(
            f"identity '{name}' ({inverted['method']}, PSNR {metrics.get('psnr', 0):.1f} dB), "
            f"roll {math.degrees(inverted['roll']):.1f} deg"
            + ("" if placed else "; no scene camera: the position was not set")))

    _status["name"] = name
    _start(work, on_event, "sending the photo")


def apply_frame(rig, scene, roll: float, shift) -> bool:
    """Roll the head about the scene camera's viewing axis to ``roll`` (radians, counter-
    clockwise as displayed, its swing kept) and move the rig across the view until its root
    projects at ``shift`` (module notes). Returns False when there is no camera."""
    if scene.camera is None:
        return False
    arm_obj, _ = rig_builder.rig_parts(rig)
    bpy.context.view_layer.update()
    R_cam = rotation_part(as_matrix(scene.camera.matrix_world))
    R_arm = rotation_part(as_matrix(arm_obj.matrix_world))
    root = arm_obj.pose.bones[rig_builder.BONE_NAMES[0]]
    head = R_cam.T @ R_arm @ rotation_part(as_matrix(root.matrix))
    swing, _ = split_roll(head)
    head = roll_matrix(roll) @ axis_angle_to_matrix(swing)
    root.rotation_mode = 'QUATERNION'         # the root's rest frame is the armature's
    root.rotation_quaternion = matrix_to_quaternion(R_arm.T @ R_cam @ head).tolist()
    bpy.context.view_layer.update()

    params = scene_reader.read_params(arm_obj, scene)
    t = np.array(params.translation)
    render = scene.render
    width = render.resolution_x * render.pixel_aspect_x
    height = render.resolution_y * render.pixel_aspect_y
    side = max(width, height)
    ndc = np.array([shift[0] * 2 * side / width, -shift[1] * 2 * side / height])
    target = t.copy()
    if params.camera.type == "perspective":
        tan_y = math.tan(math.radians(params.camera.fov_y) / 2)
        depth = -t[2]
        target[:2] = ndc * depth * np.array([tan_y * width / height, tan_y])
    else:
        target[:2] = ndc / params.camera.scale - np.array([params.camera.tx, params.camera.ty])
    arm_obj.location = (np.array(arm_obj.location) + R_cam @ (target - t)).tolist()
    bpy.context.view_layer.update()
    return True


# ---------------------------------------------------------------------------- edits

def refresh_edits(rig) -> None:
    """Ask the server for its edit directions and list them as ``rig``'s sliders (kept
    values stay; directions the server no longer offers are removed). Returns at once."""
    rig_name = rig.name

    def work(task: _Task) -> None:
        with task.connect() as client:
            task.events.put(("listing", client.identities()))

    def on_event(kind: str, listing: dict) -> None:
        rig_obj = bpy.data.objects.get(rig_name)
        if rig_obj is None:
            raise ValueError(f"the rig '{rig_name}' is gone")
        set_edit_names(rig_obj, listing.get("edits", []))
        names = [i["name"] for i in listing.get("identities", [])]
        _status.update(state="done", message=f"{len(listing.get('edits', []))} edits; "
                                             f"identities: {', '.join(names) or 'none'}")

    _start(work, on_event, "asking the server for its edits")


def set_edit_names(rig, names) -> None:
    edits = rig.portrait_rig.edits
    for i in reversed(range(len(edits))):
        if edits[i].name not in names:
            edits.remove(i)
    have = {edit.name for edit in edits}
    for name in names:
        if name not in have:
            edits.add().name = name


def identity_name(path: str) -> str:
    """A server identity name from a photo's file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._-")[:64]
    return name or "photo"


# ---------------------------------------------------------------------------- UI

class PORTRAIT_RIG_OT_identity_from_photo(bpy.types.Operator):
    """Make the rig this photo's person: the server inverts the photo into a StyleGAN
    identity (watch the image 'Portrait Rig Identity') and fits the rig to it"""
    bl_idname = "portrait_rig.identity_from_photo"
    bl_label = "Identity from Photo"
    bl_options = {'REGISTER'}

    filepath: StringProperty(subtype='FILE_PATH', options={'SKIP_SAVE'})
    filter_image: BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    filter_folder: BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    name: StringProperty(name="Name", default="",
                         description="Identity name on the server (default: the file's name)")
    method: EnumProperty(name="Method", items=METHOD_ITEMS, default='auto')
    steps: IntProperty(name="Steps", default=0, min=0, max=5000,
                       description="Optimisation steps (0: the server's default)")
    set_light: BoolProperty(name="Set Light", default=True,
                            description="Make the scene's World the photo's fitted light")

    @classmethod
    def poll(cls, context):
        return active_rig(context) is not None and not is_running()

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        path = bpy.path.abspath(self.filepath)
        try:
            identity_from_photo(active_rig(context), context.scene, Path(path),
                                self.name or identity_name(path), method=self.method,
                                steps=self.steps, light=self.set_light)
        except (OSError, ValueError) as exc:
            self.report({'ERROR'}, f"Identity from photo: {exc}")
            return {'CANCELLED'}
        return {'FINISHED'}


class PORTRAIT_RIG_OT_refresh_edits(bpy.types.Operator):
    """List the server's latent edit directions as the rig's edit sliders"""
    bl_idname = "portrait_rig.refresh_edits"
    bl_label = "Refresh Edits"

    @classmethod
    def poll(cls, context):
        return active_rig(context) is not None and not is_running()

    def execute(self, context):
        try:
            refresh_edits(active_rig(context))
        except ValueError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        return {'FINISHED'}


class PORTRAIT_RIG_OT_cancel_identity(bpy.types.Operator):
    """Stop the photo inversion in progress"""
    bl_idname = "portrait_rig.cancel_identity"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return is_running()

    def execute(self, context):
        cancel()
        return {'FINISHED'}


class VIEW3D_PT_portrait_rig_identity(RigSection, bpy.types.Panel):
    bl_label = "Identity"
    bl_options = {'DEFAULT_CLOSED'}

    def draw(self, context):
        layout = self.layout
        row = layout.row(align=True)
        row.operator(PORTRAIT_RIG_OT_identity_from_photo.bl_idname, icon='IMAGE_DATA')
        if is_running():
            row.operator(PORTRAIT_RIG_OT_cancel_identity.bl_idname, text="", icon='CANCEL')
        info = status()
        if info["message"]:
            icon = {'error': 'ERROR', 'running': 'SORTTIME'}.get(info["state"], 'INFO')
            layout.label(text=info["message"], icon=icon)
        appearance = active_rig(context).portrait_rig
        layout.prop(appearance, "identity")
        row = layout.row()
        row.label(text="Edits")
        row.operator(PORTRAIT_RIG_OT_refresh_edits.bl_idname, text="", icon='FILE_REFRESH')
        col = layout.column(align=True)
        for edit in appearance.edits:
            col.prop(edit, "value", text=edit.name)


CLASSES = (PORTRAIT_RIG_OT_identity_from_photo, PORTRAIT_RIG_OT_refresh_edits,
           PORTRAIT_RIG_OT_cancel_identity, VIEW3D_PT_portrait_rig_identity)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    global _task
    cancel()
    _task = None
    if bpy.app.timers.is_registered(drain):
        bpy.app.timers.unregister(drain)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
