"""Exemplar styles (the server's ``dualstylegan`` backend): the rig's style settings, the
gallery of exemplar thumbnails and the "Style" sidebar panel.

* ``Object.portrait_rig_style`` (``PortraitRigStyle``): family, exemplar, structure and colour
  weights, an optional weight per W+ layer, a sampled style's seed, a style image. Plain
  properties, so they are keyframed and driven like any other; ``to_dict`` gives the
  ``appearance.style_*`` fields (docs/protocol.md) that ``properties.PortraitRigAppearance``
  sends with every frame, live and in renders (shot smoothing blends them on the server).
* The gallery: each exemplar's own reconstruction, rendered by the server on request
  (``appearance.style_reconstruct``), one exemplar after the other on a background
  connection; the first frame's ``info.style`` names the families and the exemplar count.
  Thumbnails become icon previews (``bpy.utils.previews``), shown by ``template_icon_view``.

Threads: ``GalleryLoader`` owns its socket and touches no bpy data; it hands results to the
main thread through a queue that the ``drain_gallery`` timer empties (the caller pumps it
where no event loop runs, as for the live link).
"""

from __future__ import annotations

import queue
import random
import threading
import time

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, FloatProperty, FloatVectorProperty, \
    IntProperty, StringProperty

from ..portrait_rig import client as wire
from ..portrait_rig.params import MAX_STYLE_WEIGHT, RigParams
from . import live_link, preferences
from .panel import SidebarSection, wrapped

BACKEND = "dualstylegan"
LAYERS = 18                            # W+ layers of the official (1024) style networks
STRUCTURE_LAYERS = 7
THUMBNAIL_SIZE = 96
MAX_THUMBNAILS = 512
IN_FLIGHT = 8                          # thumbnail requests pipelined on the connection
RECEIVE_POLL_S = 0.25
THUMBNAIL_TIMEOUT_S = 300.0            # the first one loads the style on the server
TIMER_INTERVAL_S = 0.1
DOWNLOAD_HINT = ("Styles come from github.com/williamyang1991/DualStyleGAN (Pretrained "
                 "Models): put a style's folder (generator.pt, exstyle_code.npy, sampler.pt) "
                 "in the server's dualstylegan folder, ~/.portrait_rig/dualstylegan/<style>/, "
                 "and encoder.pt beside them for photos and style images")


def _settings_changed(self, context) -> None:
    live_link.request_resend(context.scene if context else None)


# ----------------------------------------------------------------------------------------
# Gallery state (main thread) and the menus built from it

class Gallery:
    """Thumbnails received so far: family -> {index: (name, preview)}; the families and the
    server's default family as the first reply named them; progress and the last error."""

    def __init__(self):
        self.previews = None                   # bpy.utils.previews collection
        self.thumbnails: dict[str, dict[int, tuple[str, object]]] = {}
        self.counts: dict[str, int] = {}
        self.families: list[str] = []
        self.default_family = ""
        self.error = ""
        self.loader: GalleryLoader | None = None

    def family_of(self, style) -> str:
        return style.family or self.default_family


_gallery = Gallery()
_enum_cache: dict[str, list] = {}              # Blender keeps pointers into enum items


def gallery() -> Gallery:
    return _gallery


def _family_items(style) -> list:
    items = [("", "Server Default", "The style family the server uses by default", 0)]
    for i, name in enumerate(_gallery.families, start=1):
        items.append((name, name, f"Style family '{name}'", i))
    if style.family and style.family not in _gallery.families:
        items.append((style.family, style.family, "Not found on the server yet", len(items)))
    _enum_cache["family"] = items
    return items


def _exemplar_items(style) -> list:
    thumbnails = _gallery.thumbnails.get(_gallery.family_of(style), {})
    items = [(str(i), f"{i}: {name}", name, getattr(preview, "icon_id", 0), i)
             for i, (name, preview) in sorted(thumbnails.items())]
    _enum_cache["exemplar"] = items or [("0", "0", "Load the gallery to see the exemplars", 0, 0)]
    return _enum_cache["exemplar"]


def _family_enum(self, context):
    return _family_items(self)


def _get_family_menu(self) -> int:
    return next((item[3] for item in _family_items(self) if item[0] == self.family), 0)


def _set_family_menu(self, value: int) -> None:
    self.family = next((item[0] for item in _family_items(self) if item[3] == value), "")


def _exemplar_enum(self, context):
    return _exemplar_items(self)


def _get_exemplar_menu(self) -> int:
    return self.exemplar if str(self.exemplar) in {i[0] for i in _exemplar_items(self)} else 0


def _set_exemplar_menu(self, value: int) -> None:
    self.exemplar = value


class PortraitRigStyle(bpy.types.PropertyGroup):
    """A rig's exemplar style (``appearance.style_*``)."""

    family: StringProperty(
        name="Family", default="", update=_settings_changed,
        description="Style family: a style folder on the server (empty: the server's default)")
    family_menu: EnumProperty(
        name="Family", items=_family_enum, get=_get_family_menu, set=_set_family_menu,
        description="Style family, as the gallery found them on the server")
    exemplar: IntProperty(
        name="Exemplar", default=0, min=0, max=1_000_000 - 1, update=_settings_changed,
        description="Exemplar number in the family's code file (the official style id)")
    exemplar_menu: EnumProperty(
        name="Exemplar", items=_exemplar_enum, get=_get_exemplar_menu, set=_set_exemplar_menu,
        description="Pick the exemplar from the gallery")
    structure: FloatProperty(
        name="Structure", default=0.75, min=0.0, max=MAX_STYLE_WEIGHT, soft_max=1.0,
        update=_settings_changed,
        description="How much of the exemplar's structure (face shape, layers 1-7) to take")
    colour: FloatProperty(
        name="Colour", default=1.0, min=0.0, max=MAX_STYLE_WEIGHT, soft_max=1.0,
        update=_settings_changed,
        description="How much of the exemplar's colours and texture (layers 8-18) to take")
    use_weights: BoolProperty(
        name="Per Layer", default=False, update=_settings_changed,
        description="Weight every W+ layer on its own instead of structure and colour")
    weights: FloatVectorProperty(
        name="Layer Weights", size=LAYERS, min=0.0, max=MAX_STYLE_WEIGHT, soft_max=1.0,
        default=[0.75] * STRUCTURE_LAYERS + [1.0] * (LAYERS - STRUCTURE_LAYERS),
        update=_settings_changed, description="Extrinsic style weight of each W+ layer")
    use_seed: BoolProperty(
        name="Random Style", default=False, update=_settings_changed,
        description="Draw the style from the family's sampler with a seed instead of an "
                    "exemplar")
    seed: IntProperty(
        name="Style Seed", default=0, min=0, max=2**31 - 1, update=_settings_changed,
        description="Seed of the sampled style")
    image: StringProperty(
        name="Style Image", subtype='FILE_PATH', default="", update=_settings_changed,
        description="An aligned portrait on the server used as a new exemplar (needs the "
                    "server's encoder.pt)")

    def to_dict(self) -> dict:
        """The ``appearance.style_*`` fields (image paths absolute, as for the others)."""
        return {"style_family": self.family or None,
                "style_exemplar": self.exemplar,
                "style_seed": self.seed if self.use_seed else None,
                "style_image": bpy.path.abspath(self.image) if self.image else None,
                "style_structure": round(self.structure, 6),
                "style_colour": round(self.colour, 6),
                "style_weights": [round(w, 6) for w in self.weights] if self.use_weights
                else None}


def style_fields(obj) -> dict:
    """``obj``'s style fields for ``appearance`` ({} for objects without style settings)."""
    style = getattr(obj, "portrait_rig_style", None)
    return style.to_dict() if style is not None else {}


# ----------------------------------------------------------------------------------------
# Loading the gallery

class GalleryLoader(threading.Thread):
    """Renders the exemplars' reconstructions of one family on its own connection. Results go
    to ``results``: ("info", family, families, count), ("thumb", family, index, name, rgba
    bytes), ("error", message), ("done",)."""

    def __init__(self, host: str, port: int, token: str | None, family: str,
                 size: int = THUMBNAIL_SIZE, limit: int = MAX_THUMBNAILS):
        super().__init__(name=f"Portrait Rig style gallery {host}:{port}", daemon=True)
        self.host, self.port, self.token = host, port, token
        self.family, self.size, self.limit = family, size, limit
        self.results: queue.Queue = queue.Queue()
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def params(self, index: int) -> RigParams:
        params = RigParams()
        params.appearance.style_family = self.family or None
        params.appearance.style_exemplar = index
        params.appearance.style_reconstruct = True
        return params

    def run(self) -> None:
        try:
            with wire.Client(self.host, self.port, token=self.token or None, timeout=10.0,
                             client_name="Blender Portrait Rig gallery") as client:
                self._load(client)
        except (OSError, wire.ServerError) as exc:
            if not self._stopping.is_set():
                self.results.put(("error", _describe(exc)))
        self.results.put(("done",))

    def _load(self, client: wire.Client) -> None:
        pending: dict[object, int] = {}
        count, sent, started = 1, 0, time.monotonic()
        while (sent < count or pending) and not self._stopping.is_set():
            while sent < count and len(pending) < IN_FLIGHT:
                rid = client.send_render(self.params(sent), self.size, self.size,
                                         backend=BACKEND, format="rgba8", mode="batch")
                pending[rid] = sent
                sent += 1
            try:
                frame = client.receive(timeout=RECEIVE_POLL_S)
            except TimeoutError:
                if time.monotonic() - started > THUMBNAIL_TIMEOUT_S:
                    raise TimeoutError(f"no thumbnail within {THUMBNAIL_TIMEOUT_S:g} s") \
                        from None
                continue
            index = pending.pop(getattr(frame, "id", None), None)
            if index is None or not isinstance(frame, wire.Frame):
                continue
            started = time.monotonic()
            style = frame.header.get("info", {}).get("style", {})
            if index == 0:
                count = min(int(style.get("exemplars", 1)), self.limit)
                self.results.put(("info", style.get("family", self.family),
                                  list(style.get("families", [])), count))
            self.results.put(("thumb", style.get("family", self.family), index,
                              style.get("name") or str(index), bytes(frame.pixels)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, wire.ServerError):
        return f"Server: {exc.message}"
    if isinstance(exc, ConnectionRefusedError):
        return "No render server (connection refused)"
    return str(exc) or type(exc).__name__


def load_gallery(family: str = "") -> GalleryLoader:
    """Start loading ``family``'s thumbnails ("" = the server's default family) with the
    add-on's connection preferences; stops a load in progress."""
    prefs = preferences.get()
    host, port = prefs.server_address()
    if (error := preferences.network_error(host)) is not None:
        raise ValueError(error)
    stop_gallery()
    _gallery.error = ""
    loader = GalleryLoader(host, port, prefs.token, family)
    _gallery.loader = loader
    loader.start()
    if not bpy.app.timers.is_registered(drain_gallery):
        bpy.app.timers.register(drain_gallery, first_interval=TIMER_INTERVAL_S)
    return loader


def stop_gallery() -> None:
    if _gallery.loader is not None:
        _gallery.loader.stop()
        _gallery.loader = None


def drain_gallery() -> float | None:
    """Timer: move the loader's results into previews. Returns the next interval, or None
    once the loader has finished and everything it sent is shown."""
    loader = _gallery.loader
    if loader is None:
        return None
    finished = False
    while True:
        try:
            item = loader.results.get_nowait()
        except queue.Empty:
            break
        kind = item[0]
        if kind == "info":
            _, family, families, count = item
            _gallery.families = families or _gallery.families
            if not loader.family:
                _gallery.default_family = family
            _gallery.counts[family] = count
            _gallery.thumbnails[family] = {}
        elif kind == "thumb":
            _, family, index, name, pixels = item
            _gallery.thumbnails.setdefault(family, {})[index] = (name, _preview(
                f"{family}/{index}", pixels, loader.size))
        elif kind == "error":
            _gallery.error = item[1]
        else:
            finished = True
    _redraw()
    if finished:
        _gallery.loader = None
        return None
    return TIMER_INTERVAL_S


def _preview(key: str, pixels: bytes, size: int):
    """An icon preview holding an rgba8 frame (rows top to bottom) as Blender's icons
    expect it: display values, rows bottom to top, opaque."""
    if _gallery.previews is None:
        return None
    preview = _gallery.previews.get(key) or _gallery.previews.new(key)
    rgba = np.frombuffer(pixels, np.uint8).reshape(size, size, 4)[::-1].astype(np.float32)
    rgba /= 255.0
    rgba[..., 3] = 1.0
    preview.image_size = (size, size)
    preview.image_pixels_float.foreach_set(rgba.ravel())
    return preview


def _redraw() -> None:
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == 'VIEW_3D':
                area.tag_redraw()


# ----------------------------------------------------------------------------------------
# Operators and panel

def _active_style(context):
    from .operators import active_rig
    rig = active_rig(context)
    return None if rig is None else rig.portrait_rig_style


class PORTRAIT_RIG_OT_style_gallery(bpy.types.Operator):
    bl_idname = "portrait_rig.style_gallery"
    bl_label = "Load Gallery"
    bl_description = ("Ask the server for a thumbnail of every exemplar of the family (each "
                      "exemplar's own reconstruction)")

    @classmethod
    def poll(cls, context):
        return _active_style(context) is not None

    def execute(self, context):
        try:
            load_gallery(_active_style(context).family)
        except ValueError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        return {'FINISHED'}


class PORTRAIT_RIG_OT_random_style(bpy.types.Operator):
    bl_idname = "portrait_rig.random_style"
    bl_label = "Random Style"
    bl_description = "Draw a new style from the family's sampler (a new style seed)"
    bl_options = {'REGISTER', 'UNDO'}

    @classmethod
    def poll(cls, context):
        return _active_style(context) is not None

    def execute(self, context):
        style = _active_style(context)
        style.seed = random.randrange(2**31)
        style.use_seed = True
        return {'FINISHED'}


class PORTRAIT_RIG_OT_use_style_backend(bpy.types.Operator):
    bl_idname = "portrait_rig.use_style_backend"
    bl_label = "Render with DualStyleGAN"
    bl_description = "Make the live link and renders use the server's dualstylegan backend"
    bl_options = {'REGISTER', 'UNDO'}

    def execute(self, context):
        context.scene.portrait_rig.backend = BACKEND
        return {'FINISHED'}


class VIEW3D_PT_portrait_rig_style(SidebarSection, bpy.types.Panel):
    bl_label = "Style"
    bl_options = {'DEFAULT_CLOSED'}

    @classmethod
    def poll(cls, context):
        return _active_style(context) is not None

    def draw(self, context):
        layout = self.layout
        style = _active_style(context)
        if context.scene.portrait_rig.backend != BACKEND:
            layout.operator("portrait_rig.use_style_backend", icon='BRUSH_DATA')
        layout.prop(style, "family_menu")
        family = _gallery.family_of(style)
        row = layout.row(align=True)
        row.operator("portrait_rig.style_gallery", icon='IMAGE_DATA')
        if _gallery.loader is not None:
            shown = len(_gallery.thumbnails.get(family, {}))
            row.label(text=f"{shown}/{_gallery.counts.get(family, '?')}")
        if _gallery.thumbnails.get(family):
            layout.template_icon_view(style, "exemplar_menu", show_labels=True, scale=5.0)
        col = layout.column()
        col.active = not style.use_seed and not style.image
        col.prop(style, "exemplar")
        name = _gallery.thumbnails.get(family, {}).get(style.exemplar, ("",))[0]
        if name:
            col.label(text=name, icon='IMAGE_REFERENCE')
        row = layout.row(align=True)
        row.prop(style, "use_seed", text="")
        sub = row.row(align=True)
        sub.active = style.use_seed
        sub.prop(style, "seed")
        row.operator("portrait_rig.random_style", text="", icon='FILE_REFRESH')
        layout.prop(style, "image")
        col = layout.column(align=True)
        col.active = not style.use_weights
        col.prop(style, "structure", slider=True)
        col.prop(style, "colour", slider=True)
        layout.prop(style, "use_weights")
        if style.use_weights:
            layout.column(align=True).prop(style, "weights", text="")
        if _gallery.error:
            wrapped(layout, _gallery.error, icon='ERROR')
        if _gallery.error or not _gallery.thumbnails:
            wrapped(layout, DOWNLOAD_HINT, icon='INFO')


CLASSES = (PortraitRigStyle, PORTRAIT_RIG_OT_style_gallery, PORTRAIT_RIG_OT_random_style,
           PORTRAIT_RIG_OT_use_style_backend, VIEW3D_PT_portrait_rig_style)


def register():
    import bpy.utils.previews

    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Object.portrait_rig_style = bpy.props.PointerProperty(type=PortraitRigStyle)
    _gallery.previews = bpy.utils.previews.new()


def unregister():
    import bpy.utils.previews

    stop_gallery()
    if bpy.app.timers.is_registered(drain_gallery):
        bpy.app.timers.unregister(drain_gallery)
    if _gallery.previews is not None:
        bpy.utils.previews.remove(_gallery.previews)
    _gallery.__init__()
    _enum_cache.clear()
    del bpy.types.Object.portrait_rig_style
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
