"""Operators: add a rig, connect / disconnect the live link, start or stop a local server,
apply expression presets, fit the rig to a photo."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from ..portrait_rig import client as wire
from ..portrait_rig import face_source
from ..portrait_rig.face_data import FaceData
from . import live_link, photo_fit, preferences, presets, rig_builder, tasks

MODEL_TIMEOUT_S = 30.0     # FLAME's arrays are ~30 MiB: generous even off this machine


def fetch_server_model(host: str, port: int, token: str = "") -> FaceData:
    """The face model the server renders with (blocking: from a worker thread, or where no
    user waits)."""
    if (error := preferences.network_error(host)) is not None:
        raise ValueError(error)
    with wire.Client(host, port, token=token or None, timeout=MODEL_TIMEOUT_S,
                     client_name="Blender Portrait Rig") as client:
        header, payload = client.fetch_model()
    return FaceData.from_wire(header, payload)


def face_model_loader(prefs):
    """A function that loads the face model chosen in the preferences without touching bpy
    (for a worker thread): the preferences are read here, on the main thread."""
    if prefs.face_source == 'SERVER':
        host, port = prefs.server_address()
        if (error := preferences.network_error(host)) is not None:
            raise ValueError(error)
        token = prefs.token
        return lambda: fetch_server_model(host, port, token)
    path = bpy.path.abspath(prefs.face_file)
    if not path:
        raise ValueError("No model file set (Preferences > Add-ons > Portrait Rig)")
    return lambda: face_source.load_face_data(path)


def add_rig_task(name: str):
    """The Add Portrait Rig task (``tasks``): the face model from a worker thread, then the
    rig built in slices in the context current then. Returns the armature."""
    prefs = preferences.get()
    counts = prefs.shape_key_count, prefs.expression_key_count
    face = yield tasks.Wait(face_model_loader(prefs), text="loading the face model")
    rig = yield from rig_builder.build_rig_steps(bpy.context, face, name=name,
                                                 n_shape=counts[0], n_expression=counts[1])
    return rig


def active_rig(context):
    obj = context.active_object
    return rig_builder.find_rig(obj) if obj is not None else None


class PORTRAIT_RIG_OT_add_rig(tasks.TaskOperator, bpy.types.Operator):
    """Add a face rig built from the face model chosen in the add-on's preferences"""
    bl_idname = "portrait_rig.add_rig"
    bl_label = "Add Portrait Rig"
    bl_options = {'REGISTER', 'UNDO'}
    errors = (OSError, ValueError, wire.ServerError)       # RigError is a ValueError

    name: StringProperty(name="Name", default="Portrait Rig")

    @classmethod
    def poll(cls, context):
        return context.mode == 'OBJECT'

    def invoke(self, context, event):
        return self.start_modal(context)

    def task(self, context):
        return add_rig_task(self.name)

    def finish(self, context, rig):
        for obj in context.selected_objects:
            obj.select_set(False)
        rig.location = context.scene.cursor.location
        rig.select_set(True)
        context.view_layer.objects.active = rig
        settings = context.scene.portrait_rig
        if settings.rig is None:
            settings.rig = rig
        self.report({'INFO'}, f"Added '{rig.name}': {rig[rig_builder.PROP_SHAPE_COUNT]} identity "
                              f"and {rig[rig_builder.PROP_EXPRESSION_COUNT]} expression keys")
        return {'FINISHED'}


class PORTRAIT_RIG_OT_connect(bpy.types.Operator):
    """Connect to the render server set in the add-on's preferences"""
    bl_idname = "portrait_rig.connect"
    bl_label = "Connect"

    def execute(self, context):
        try:
            live_link.start_from_preferences(context.scene)
        except ValueError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        live_link.request_resend(context.scene)
        return {'FINISHED'}


class PORTRAIT_RIG_OT_disconnect(bpy.types.Operator):
    """Close the connection to the render server"""
    bl_idname = "portrait_rig.disconnect"
    bl_label = "Disconnect"

    @classmethod
    def poll(cls, context):
        return live_link.is_running()

    def execute(self, context):
        live_link.stop()
        return {'FINISHED'}


class PORTRAIT_RIG_OT_start_server(bpy.types.Operator):
    """Start the local render server command from the preferences (runs beside Blender)"""
    bl_idname = "portrait_rig.start_server"
    bl_label = "Start Local Server"

    @classmethod
    def poll(cls, context):
        return preferences.server_process() is None

    def execute(self, context):
        try:
            process = preferences.start_server(preferences.get().server_command)
        except (OSError, ValueError, RuntimeError) as exc:
            self.report({'ERROR'}, f"Local server: {exc}")
            return {'CANCELLED'}
        self.report({'INFO'}, f"Local server started (pid {process.pid})")
        return {'FINISHED'}


class PORTRAIT_RIG_OT_stop_server(bpy.types.Operator):
    """Stop the local render server started from Blender"""
    bl_idname = "portrait_rig.stop_server"
    bl_label = "Stop Local Server"

    @classmethod
    def poll(cls, context):
        return preferences.server_process() is not None

    def execute(self, context):
        preferences.stop_server()
        return {'FINISHED'}


class PORTRAIT_RIG_OT_expression_preset(bpy.types.Operator):
    """Set the rig's expression shape keys to a preset"""
    bl_idname = "portrait_rig.expression_preset"
    bl_label = "Expression Preset"
    bl_options = {'REGISTER', 'UNDO'}

    preset: EnumProperty(name="Preset", items=presets.ENUM_ITEMS)
    insert_keyframes: BoolProperty(
        name="Insert Keyframes", default=False,
        description="Key the expression shape keys at the current frame")

    @classmethod
    def poll(cls, context):
        return active_rig(context) is not None

    @classmethod
    def description(cls, context, properties):
        return presets.description(properties.preset)

    def invoke(self, context, event):
        if not self.properties.is_property_set("insert_keyframes"):
            self.insert_keyframes = context.scene.portrait_rig.insert_keyframes
        return self.execute(context)

    def execute(self, context):
        rig = active_rig(context)
        try:
            changed = presets.apply(rig, self.preset, insert_keyframes=self.insert_keyframes,
                                    frame=context.scene.frame_current)
        except ValueError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        self.report({'INFO'}, f"{presets.label(self.preset)}: {changed} keys set")
        return {'FINISHED'}


class PORTRAIT_RIG_OT_fit_to_photo(tasks.TaskOperator, bpy.types.Operator):
    """Fit the rig to a portrait photo on the render server: identity, expression, head and
    jaw pose, and optionally the light"""
    bl_idname = "portrait_rig.fit_to_photo"
    bl_label = "Fit Rig to Photo"
    bl_options = {'REGISTER', 'UNDO'}
    errors = (OSError, ValueError, wire.ServerError)        # TimeoutError is an OSError

    filepath: StringProperty(subtype='FILE_PATH', options={'SKIP_SAVE'})
    filter_image: BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    filter_folder: BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    set_light: BoolProperty(
        name="Set Light", default=True,
        description="Make the scene's World the photo's fitted light")
    use_as_reference: BoolProperty(
        name="Use as Reference Photo", default=True,
        description="Also make the photo the rig's appearance reference (DiffusionRig)")
    modal: BoolProperty(default=False, options={'HIDDEN', 'SKIP_SAVE'})

    @classmethod
    def poll(cls, context):
        return active_rig(context) is not None and context.mode in {'OBJECT', 'POSE'}

    def invoke(self, context, event):
        self.modal = True                 # the file browser's execute then runs modal
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        if self.modal:
            return self.start_modal(context)
        return super().execute(context)

    def task(self, context):
        return photo_fit.fit_task(active_rig(context).name, bpy.path.abspath(self.filepath),
                                  light=self.set_light, use_as_reference=self.use_as_reference)

    def finish(self, context, result):
        reply, counts = result
        self.report({'INFO'}, photo_fit.describe(reply, counts))
        return {'FINISHED'}


class PORTRAIT_RIG_OT_cancel_tasks(bpy.types.Operator):
    """Cancel the Portrait Rig operations running in the background"""
    bl_idname = "portrait_rig.cancel_tasks"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return bool(tasks.running())

    def execute(self, context):
        tasks.cancel_all()
        return {'FINISHED'}


CLASSES = (
    PORTRAIT_RIG_OT_add_rig,
    PORTRAIT_RIG_OT_connect,
    PORTRAIT_RIG_OT_disconnect,
    PORTRAIT_RIG_OT_start_server,
    PORTRAIT_RIG_OT_stop_server,
    PORTRAIT_RIG_OT_expression_preset,
    PORTRAIT_RIG_OT_fit_to_photo,
    PORTRAIT_RIG_OT_cancel_tasks,
)


def draw_add_menu(self, context):
    self.layout.operator(PORTRAIT_RIG_OT_add_rig.bl_idname, icon='USER')


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_add.append(draw_add_menu)


def unregister():
    bpy.types.VIEW3D_MT_add.remove(draw_add_menu)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
