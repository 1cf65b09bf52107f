"""Operators: add a rig, connect / disconnect the live link, start or stop a local server,
apply expression presets, fit the rig to a photo."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from ..portrait_rig import client as wire
from ..portrait_rig import face_source
from ..portrait_rig.face_data import FaceData
from . import live_link, photo_fit, preferences, presets, rig_builder

MODEL_TIMEOUT_S = 30.0     # FLAME's arrays are ~30 MiB: generous even off this machine


def fetch_server_model(host: str, port: int, token: str = "") -> FaceData:
    """The face model the server renders with (blocking; user-initiated)."""
    if (error := preferences.network_error(host)) is not None:
        raise ValueError(error)
    with wire.Client(host, port, token=token or None, timeout=MODEL_TIMEOUT_S,
                     client_name="Blender Portrait Rig") as client:
        header, payload = client.fetch_model()
    return FaceData.from_wire(header, payload)


def load_face_model(prefs) -> FaceData:
    """The face model chosen in the preferences (blocking; user-initiated)."""
    if prefs.face_source == 'SERVER':
        host, port = prefs.server_address()
        return fetch_server_model(host, port, prefs.token)
    path = bpy.path.abspath(prefs.face_file)
    if not path:
        raise ValueError("No model file set (Preferences > Add-ons > Portrait Rig)")
    return face_source.load_face_data(path)


def active_rig(context):
    obj = context.active_object
    return rig_builder.find_rig(obj) if obj is not None else None


class PORTRAIT_RIG_OT_add_rig(bpy.types.Operator):
    """Add a face rig built from the face model chosen in the add-on's preferences"""
    bl_idname = "portrait_rig.add_rig"
    bl_label = "Add Portrait Rig"
    bl_options = {'REGISTER', 'UNDO'}

    name: StringProperty(name="Name", default="Portrait Rig")

    @classmethod
    def poll(cls, context):
        return context.mode == 'OBJECT'

    def execute(self, context):
        prefs = preferences.get()
        try:
            data = load_face_model(prefs)
            rig = rig_builder.build_rig(context, data, name=self.name,
                                        n_shape=prefs.shape_key_count,
                                        n_expression=prefs.expression_key_count)
        except (OSError, ValueError, wire.ServerError) as exc:   # RigError is a ValueError
            self.report({'ERROR'}, f"Face model: {exc}")
            return {'CANCELLED'}
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


class PORTRAIT_RIG_OT_fit_to_photo(bpy.types.Operator):
    """Fit the rig to a portrait photo on the render server: identity, expression, head and
    jaw pose, and optionally the light"""
    bl_idname = "portrait_rig.fit_to_photo"
    bl_label = "Fit Rig to Photo"
    bl_options = {'REGISTER', 'UNDO'}

    filepath: StringProperty(subtype='FILE_PATH', options={'SKIP_SAVE'})
    filter_image: BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    filter_folder: BoolProperty(default=True, options={'HIDDEN', 'SKIP_SAVE'})
    set_light: BoolProperty(
        name="Set Light", default=True,
        description="Make the scene's World the photo's fitted light")
    use_as_reference: BoolProperty(
        name="Use as Reference Photo", default=True,
        description="Also make the photo the rig's appearance reference (DiffusionRig)")

    @classmethod
    def poll(cls, context):
        return active_rig(context) is not None and context.mode in {'OBJECT', 'POSE'}

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {'RUNNING_MODAL'}

    def execute(self, context):
        rig = active_rig(context)
        path = bpy.path.abspath(self.filepath)
        try:
            with open(path, "rb") as fh:
                photo = fh.read()
            reply = photo_fit.request_fit(photo)
            counts = photo_fit.apply_fit(rig, context.scene, reply, light=self.set_light)
        except (OSError, ValueError, TimeoutError, wire.ServerError) as exc:
            self.report({'ERROR'}, f"Fit to photo: {exc}")
            return {'CANCELLED'}
        if self.use_as_reference:
            rig.portrait_rig.reference_photo = path
        self.report({'INFO'}, photo_fit.describe(reply, counts))
        return {'FINISHED'}


CLASSES = (
    PORTRAIT_RIG_OT_add_rig,
    PORTRAIT_RIG_OT_connect,
    PORTRAIT_RIG_OT_disconnect,
    PORTRAIT_RIG_OT_start_server,
    PORTRAIT_RIG_OT_stop_server,
    PORTRAIT_RIG_OT_expression_preset,
    PORTRAIT_RIG_OT_fit_to_photo,
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
