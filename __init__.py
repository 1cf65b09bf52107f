"""Portrait Rig, the Blender extension (entry point).

Blender imports this directory as the package ``bl_ext.<repository>.portrait_rig`` (see
``blender_manifest.toml``) and calls ``register`` / ``unregister``. The add-on lives in
``blender_rig`` and the numpy-only core it shares with the render server in ``portrait_rig``.
Imports happen inside the functions so that the repository root stays importable without
``bpy`` (for tools that scan it as a package).
"""


def register():
    from . import blender_rig
    blender_rig.register()


def unregister():
    from . import blender_rig
    blender_rig.unregister()
