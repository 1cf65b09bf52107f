"""What differs between the supported Blender versions (4.2 LTS, 4.5 LTS, 5.0), in one place.

Everything else in the add-on uses the API common to all of them. Each function names the
version that changed the behaviour it hides:

* ``is_module``: ``bpy.app.module`` exists from 4.3; 4.2 as a module has no binary path.
* ``node_tree``: new materials and worlds get a node tree from 5.0 (``use_nodes`` is
  deprecated there); before, switching ``use_nodes`` on creates it.
* ``world_uses_nodes``: from 5.0 a World always renders its nodes.
* ``fcurves``: slotted actions (4.4): an ID's F-curves live in its slot's channel bag.
* ``sequencer_strips``: ``SequenceEditor.strips`` from 4.4 (``sequences`` before).
* ``set_movie_output``: file formats split into media types in 5.0.
"""

from __future__ import annotations

import bpy


def is_module() -> bool:
    """Blender runs as the ``bpy`` Python module (the wheel), not as the application."""
    module = getattr(bpy.app, "module", None)
    if module is not None:
        return bool(module)
    return not bpy.app.binary_path         # 4.2: the module has no executable


def node_tree(idblock):
    """The node tree of a Material or World, created when it has none yet."""
    if idblock.node_tree is None:
        idblock.use_nodes = True
    return idblock.node_tree


def world_uses_nodes(world) -> bool:
    """Whether ``world`` renders its node tree rather than its plain colour."""
    return bpy.app.version >= (5, 0, 0) or bool(world.use_nodes)


def fcurves(id_data) -> list:
    """The F-curves animating ``id_data`` (empty without an action)."""
    animation = id_data.animation_data
    action = animation.action if animation is not None else None
    if action is None:
        return []
    slot = getattr(animation, "action_slot", None)
    if slot is None:                          # before slotted actions: one F-curve list
        return list(action.fcurves)
    from bpy_extras import anim_utils
    bag = anim_utils.action_get_channelbag_for_slot(action, slot)
    return list(bag.fcurves) if bag is not None else []


def sequencer_strips(editor):
    """The strips collection of a SequenceEditor (``new_image``, ``new_movie`` ...)."""
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def set_movie_output(image_settings) -> None:
    """Make a scene write an FFmpeg movie."""
    if "media_type" in image_settings.bl_rna.properties:
        image_settings.media_type = 'VIDEO'
    image_settings.file_format = 'FFMPEG'
