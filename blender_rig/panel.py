"""The 3D View sidebar tab "Portrait Rig": rig, connection, live frame, appearance and
expression presets."""

from __future__ import annotations

import textwrap

import bpy

from . import live_link, preferences, presets, rig_builder, tasks
from .image_output import IMAGE_NAME
from .operators import active_rig

STATE_ICONS = {live_link.DISCONNECTED: 'UNLINKED', live_link.CONNECTING: 'SORTTIME',
               live_link.CONNECTED: 'LINKED', live_link.ERROR: 'ERROR'}
WRAP_COLUMNS = 42


def wrapped(layout, text: str, icon: str = 'NONE') -> None:
    """``text`` as labels wrapped to the sidebar's width, the icon on the first."""
    for i, line in enumerate(textwrap.wrap(text, WRAP_COLUMNS) or [""]):
        layout.label(text=line, icon=icon if i == 0 else 'BLANK1')


class SidebarPanel:
    """A panel in the "Portrait Rig" tab of the 3D View's sidebar."""
    bl_space_type = 'VIEW_3D'
    bl_region_type = 'UI'
    bl_category = "Portrait Rig"


class SidebarSection(SidebarPanel):
    """A section of the tab's main panel."""
    bl_parent_id = "VIEW3D_PT_portrait_rig"


class RigSection(SidebarSection):
    """A section about the active rig, shown while there is one."""

    @classmethod
    def poll(cls, context):
        return active_rig(context) is not None


class VIEW3D_PT_portrait_rig(SidebarPanel, bpy.types.Panel):
    bl_label = "Portrait Rig"

    def draw(self, context):
        layout = self.layout
        col = layout.column(align=True)
        col.operator("portrait_rig.add_rig", icon='ADD')
        col.operator("portrait_rig.fit_to_photo", icon='IMAGE_DATA')
        for runner in tasks.running():            # long operations: progress and Cancel
            row = layout.row()
            row.label(text=runner.status(), icon='SORTTIME')
            row.operator("portrait_rig.cancel_tasks", text="", icon='CANCEL')
        rig = active_rig(context)
        if rig is not None:
            mesh = rig_builder.rig_mesh(rig)
            layout.label(text=f"{rig.name}: {rig.get('portrait_rig_model', '')}",
                         icon='ARMATURE_DATA')
            if mesh is None:
                layout.label(text="The rig's mesh is missing", icon='ERROR')


class VIEW3D_PT_portrait_rig_connection(SidebarSection, bpy.types.Panel):
    bl_label = "Server"

    def draw(self, context):
        layout = self.layout
        prefs = preferences.get()
        info = live_link.status()
        host, port = prefs.server_address()
        address = info["address"] or f"{host}:{port}"
        layout.label(text=f"{info['state']}: {address}", icon=STATE_ICONS[info["state"]])
        if info["error"]:
            text = info["error"]
            if info["state"] == live_link.ERROR and info["retry_in"]:
                text += f" (retry after {info['retry_in']:g} s)"
            wrapped(layout.box(), text, icon='ERROR')
        if info["state"] == live_link.CONNECTED and info["frames"]:
            layout.label(text=f"{info['fps']:.1f} fps, last frame {info['last_frame_ms']:.1f} ms "
                              f"(server {info['server_ms']:.1f} ms)", icon='TIME')
        row = layout.row(align=True)
        if live_link.is_running():
            row.operator("portrait_rig.disconnect", icon='UNLINKED')
        else:
            row.operator("portrait_rig.connect", icon='LINKED')
        if prefs.server_command:
            if preferences.server_process() is None:
                row.operator("portrait_rig.start_server", text="", icon='PLAY')
            else:
                row.operator("portrait_rig.stop_server", text="", icon='CANCEL')


class VIEW3D_PT_portrait_rig_live(SidebarSection, bpy.types.Panel):
    bl_label = "Live Frame"

    def draw_header(self, context):
        self.layout.prop(context.scene.portrait_rig, "live", text="")

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        settings = context.scene.portrait_rig
        layout.prop(settings, "rig")
        layout.prop(settings, "backend_menu")
        col = layout.column(align=True)
        col.prop(settings, "width", text="Size X")
        col.prop(settings, "height", text="Y")
        layout.prop(settings, "lighting")
        if settings.live and IMAGE_NAME not in bpy.data.images:
            layout.label(text=f"Frames appear in the image '{IMAGE_NAME}'", icon='IMAGE_DATA')


class VIEW3D_PT_portrait_rig_appearance(RigSection, bpy.types.Panel):
    bl_label = "Appearance"
    bl_options = {'DEFAULT_CLOSED'}

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        appearance = active_rig(context).portrait_rig
        row = layout.row(heading="Seed")
        row.prop(appearance, "use_seed", text="")
        sub = row.row()
        sub.active = appearance.use_seed
        sub.prop(appearance, "seed", text="")
        layout.prop(appearance, "truncation")
        layout.prop(appearance, "latent_file")
        layout.prop(appearance, "reference_photo")
        layout.prop(appearance, "personal_model")


class VIEW3D_PT_portrait_rig_expression(RigSection, bpy.types.Panel):
    bl_label = "Expression"

    def draw(self, context):
        layout = self.layout
        rig = active_rig(context)
        usable = presets.usable(rig)
        grid = layout.grid_flow(columns=2, even_columns=True, align=True)
        for identifier in presets.PRESETS:
            cell = grid.row()
            cell.enabled = identifier in usable
            cell.operator("portrait_rig.expression_preset",
                          text=presets.label(identifier)).preset = identifier
        layout.prop(context.scene.portrait_rig, "insert_keyframes")


CLASSES = (
    VIEW3D_PT_portrait_rig,
    VIEW3D_PT_portrait_rig_connection,
    VIEW3D_PT_portrait_rig_live,
    VIEW3D_PT_portrait_rig_appearance,
    VIEW3D_PT_portrait_rig_expression,
)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
