"""Portrait Rig add-on: a FLAME face rig in Blender and a live view of the render server.

Modules: ``rig_builder`` (build / update the rig from a face model), ``scene_reader`` (scene
-> ``RigParams``), ``world_sh`` (World and lamps -> spherical-harmonics light), ``properties``,
``preferences``, ``operators``, ``panel`` (UI), ``presets`` (expression presets),
``live_link`` (parameters to the server, frames back), ``image_output`` (frames into the
"Portrait Rig" image), ``tasks`` (long operators without freezing Blender) and ``compat``
(what differs between Blender 4.2, 4.5 and 5.0).

``register`` / ``unregister`` are symmetric: disabling the add-on removes its classes, menu
entries, properties on Scene and Object, handlers and timers, stops the live link and the
local server it started. Data the user made stays in the .blend file: rigs, and the
"Portrait Rig" image holding the last live frame.
"""

from . import live_link, operators, panel, preferences, properties, render_engine

# Registration order: property groups before the classes that point at them; live_link's
# handlers last so they never see a half-registered add-on.
_MODULES = (properties, preferences, operators, panel, live_link, render_engine)


def register():
    for module in _MODULES:
        module.register()


def unregister():
    for module in reversed(_MODULES):
        module.unregister()
