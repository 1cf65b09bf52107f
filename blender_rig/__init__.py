"""Portrait Rig add-on: a FLAME face rig in Blender and a live view of the render server.

Modules: scene writing - ``rig_builder`` (build / update the rig from a face model),
``demo_scene``; scene reading - ``scene_reader`` (scene -> ``RigParams``), ``world_sh`` (World
and lamps -> spherical-harmonics light), ``transforms``; the link to the server -
``live_link`` (parameters out, frames back on a worker thread), ``image_output`` (frames into
the "Portrait Rig" image), ``photo_fit``; rendering - ``render_engine``, ``sequence``
(batches, resume, shots); UI - ``properties``, ``preferences``, ``operators``, ``panel``,
``presets`` (expression presets), ``style_panel`` (exemplar styles of the dualstylegan
backend), ``identity`` (Identity from Photo, edit sliders);
``shot_export`` (shot files for ``portrait-rig render``), ``texture_codes`` (the rig's texture
code and its albedo in the viewport); ``tasks`` (long operators without freezing Blender),
``app_handlers`` (adding and removing the add-on's callbacks) and ``compat`` (what differs
between Blender 4.2, 4.5 and 5.0).

``register`` / ``unregister`` are symmetric: disabling the add-on removes its classes, menu
entries, properties on Scene and Object, handlers and timers, stops the live link and the
local server it started. Data the user made stays in the .blend file: rigs, and the
"Portrait Rig" image holding the last live frame.
"""

from . import (identity, live_link, operators, panel, preferences, properties, render_engine,
               shot_export, style_panel, texture_codes)

# Registration order: property groups before the classes that point at them, panels after
# their parents; live_link's handlers last so they never see a half-registered add-on.
_MODULES = (properties, preferences, operators, panel, style_panel, identity, texture_codes,
            live_link, render_engine, shot_export)


def register():
    for module in _MODULES:
        module.register()


def unregister():
    for module in reversed(_MODULES):
        module.unregister()
