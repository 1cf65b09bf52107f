"""Export Shot: the scene's animation as a shot file that ``portrait-rig render`` renders with
no Blender on the render nodes (format: ``portrait_rig/shot_file.py``, docs/rendering.md).

Every frame of the scene's range (and step) is read exactly as the render engine reads it
before an animation render (``sequence.read_frames``: the same rig, camera, lighting choice,
backend, passes, noise seed and shot ids), so rendering the file gives the engine's frames.
File > Export > Portrait Rig Shot, or the button in Render Properties > Portrait Rig.
"""

from __future__ import annotations

import bpy
from bpy.props import StringProperty
from bpy_extras.io_utils import ExportHelper

from ..portrait_rig.shot_file import ShotFile, ShotFrame
from . import render_engine, sequence


def export_shot(scene, path: str) -> ShotFile:
    """Read every frame of ``scene``'s animation and write the shot file ``path``. Raises
    sequence.RenderFailure when the scene cannot be rendered (no rig, size changes...)."""
    specs: list[sequence.RenderSpec] = []
    sequence.read_frames(scene, sequence.sequence_frames(scene), specs.append)
    first = specs[0]
    for spec in specs[1:]:
        for name in ("width", "height", "backend", "format", "passes"):
            if getattr(spec, name) != getattr(first, name):
                raise sequence.RenderFailure(
                    f"the render {name} changes at frame {spec.frame}: a shot file has one "
                    f"{name} (export the frames before and after separately)")
    shot = ShotFile(width=first.width, height=first.height, scene=scene.name,
                    fps=scene.render.fps / scene.render.fps_base, backend=first.backend,
                    image=first.format, passes=first.passes, seed=first.shot["seed"],
                    smooth=first.shot["smooth"],
                    frames=[ShotFrame(s.frame, s.shot["id"], s.params) for s in specs])
    shot.save(path)
    return shot


class PORTRAIT_RIG_OT_export_shot(bpy.types.Operator, ExportHelper):
    """Write the scene's animation (rig parameters of every frame, size, backend, passes,
    seed) to a shot file that `portrait-rig render` renders without Blender"""
    bl_idname = "portrait_rig.export_shot"
    bl_label = "Export Shot"
    bl_options = {'REGISTER'}

    filename_ext = ".json"
    filter_glob: StringProperty(default="*.json", options={'HIDDEN'})

    def execute(self, context):
        scene = context.scene
        try:
            shot = export_shot(scene, self.filepath)
        except (sequence.RenderFailure, OSError) as exc:
            self.report({'ERROR'}, f"Export Shot: {exc}")
            return {'CANCELLED'}
        self.report({'INFO'}, f"Exported {len(shot.frames)} frames of '{scene.name}' to "
                              f"{self.filepath}")
        return {'FINISHED'}


def draw_export_menu(self, context):
    self.layout.operator(PORTRAIT_RIG_OT_export_shot.bl_idname,
                         text="Portrait Rig Shot (.json)")


def draw_render_settings(self, context):
    self.layout.operator(PORTRAIT_RIG_OT_export_shot.bl_idname, icon='EXPORT')


def register():
    bpy.utils.register_class(PORTRAIT_RIG_OT_export_shot)
    bpy.types.TOPBAR_MT_file_export.append(draw_export_menu)
    render_engine.RENDER_PT_portrait_rig.append(draw_render_settings)


def unregister():
    render_engine.RENDER_PT_portrait_rig.remove(draw_render_settings)
    bpy.types.TOPBAR_MT_file_export.remove(draw_export_menu)
    bpy.utils.unregister_class(PORTRAIT_RIG_OT_export_shot)
