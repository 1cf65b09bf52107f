"""Scene and rig settings the add-on stores in the .blend file.

* ``Scene.portrait_rig`` (PortraitRigSceneSettings): the live link - which rig streams, the
  backend, the frame size, the lighting source, preset keying.
* ``Object.portrait_rig`` (PortraitRigAppearance, used on rig armatures): backend-specific
  identity / appearance controls, sent as ``RigParams.appearance``.
"""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty,
                       IntProperty, PointerProperty, StringProperty)

from . import live_link, rig_builder

LIGHTING_ITEMS = (
    ('WORLD', "World", "Spherical-harmonics projection of the scene's World", 0),
    ('WORLD_LAMPS', "World + Lamps", "The World plus the scene's lights", 1),
    ('DEFAULT', "Default", "The server's default soft key light, ignoring the scene", 2),
)

# Blender keeps only pointers to the strings of dynamic enum items: they must stay referenced
# from Python for as long as the menu may show them.
_backend_items: list[tuple[str, str, str, int]] = []


def is_rig(obj) -> bool:
    """A Portrait Rig armature (what rig_builder creates)."""
    return obj is not None and obj.type == 'ARMATURE' and rig_builder.PROP_MODEL in obj


def _poll_rig(self, obj) -> bool:
    return is_rig(obj)


def _backend_enum_items(self, context):
    """The server's backends from its hello, the server's default first."""
    global _backend_items
    items = [("", "Server Default", "The backend the server was started with", 0)]
    for index, (name, description) in enumerate(live_link.backends(), start=1):
        items.append((name, name, description, index))
    if self.backend and self.backend not in {item[0] for item in items}:
        # Keep a saved choice visible while disconnected (or served by another server).
        items.append((self.backend, self.backend, "Not offered by the connected server",
                      len(items)))
    _backend_items = items
    return _backend_items


def _get_backend_menu(self) -> int:
    for name, _, _, value in _backend_enum_items(self, None):
        if name == self.backend:
            return value
    return 0


def _set_backend_menu(self, value: int) -> None:
    for name, _, _, item_value in _backend_enum_items(self, None):
        if item_value == value:
            self.backend = name
            return


def _live_changed(self, context) -> None:
    scene = self.id_data
    if self.live:
        try:
            live_link.start_from_preferences(scene)
        except ValueError:                 # refused by the network policy; the panel says why
            self.live = False
            return
    live_link.request_resend(scene)


def _settings_changed(self, context) -> None:
    scene = self.id_data if isinstance(self.id_data, bpy.types.Scene) else context.scene
    live_link.request_resend(scene)


class PortraitRigEdit(bpy.types.PropertyGroup):
    """One latent edit slider (``appearance.edits``): a direction the server offers."""
    # ``name`` (the direction's) is PropertyGroup's own property.
    value: FloatProperty(
        name="Strength", default=0.0, soft_min=-5.0, soft_max=5.0, min=-100.0, max=100.0,
        update=_settings_changed,
        description="How far the identity moves along this edit direction (keyframeable)")


class PortraitRigAppearance(bpy.types.PropertyGroup):
    """Identity / appearance controls of one rig; each backend reads what it understands."""

    use_seed: BoolProperty(
        name="Use Seed", default=False, update=_settings_changed,
        description="Pick the identity from a random seed (StyleGAN backends)")
    seed: IntProperty(
        name="Seed", default=0, min=0, max=2**31 - 1, update=_settings_changed,
        description="Random seed of the generated identity")
    truncation: FloatProperty(
        name="Truncation", default=0.7, min=0.0, max=2.0, soft_max=1.0,
        update=_settings_changed,
        description="Truncation psi: lower is closer to the average face, higher more varied")
    latent_file: StringProperty(
        name="Latent File", subtype='FILE_PATH', default="", update=_settings_changed,
        description="Saved latent code giving the identity; a path on the server")
    reference_photo: StringProperty(
        name="Reference Photo", subtype='FILE_PATH', default="", update=_settings_changed,
        description="Photo whose appearance the render follows (DiffusionRig); a path on "
                    "the server")
    personal_model: StringProperty(
        name="Personal Model", default="", update=_settings_changed,
        description="Name of a personalised checkpoint known to the server")
    identity: StringProperty(
        name="Identity", default="", update=_settings_changed,
        description="Name of an identity the server inverted from a photo (StyleGAN)")
    edits: CollectionProperty(type=PortraitRigEdit)

    def to_dict(self) -> dict:
        """``RigParams.appearance`` fields. File paths are made absolute (Blender's ``//``
        prefix resolved) because the server does not know the .blend file's folder."""
        from .style_panel import style_fields

        def path(value: str) -> str | None:
            return bpy.path.abspath(value) if value else None
        return {"seed": self.seed if self.use_seed else None,
                "truncation": round(self.truncation, 6),
                "latent_file": path(self.latent_file),
                "reference_photo": path(self.reference_photo),
                "personal_model": self.personal_model or None,
                "identity": self.identity or None,
                "edits": {edit.name: round(edit.value, 6) for edit in self.edits
                          if edit.name and edit.value},
                **style_fields(self.id_data)}


class PortraitRigSceneSettings(bpy.types.PropertyGroup):
    live: BoolProperty(
        name="Live", default=False, update=_live_changed,
        description="Stream the live rig's parameters to the server and show the frames in "
                    "the 'Portrait Rig' image")
    rig: PointerProperty(
        name="Live Rig", type=bpy.types.Object, poll=_poll_rig, update=_settings_changed,
        description="The rig the live link renders (the server renders one head per frame)")
    backend: StringProperty(
        name="Backend", default="", update=_settings_changed,
        description="Server backend name (empty: the server's default)")
    backend_menu: EnumProperty(
        name="Backend", items=_backend_enum_items, get=_get_backend_menu,
        set=_set_backend_menu, description="Backend that renders the live frames")
    width: IntProperty(
        name="Width", default=512, min=16, max=4096, soft_max=1024, subtype='PIXEL',
        update=_settings_changed, description="Width of the live frame")
    height: IntProperty(
        name="Height", default=512, min=16, max=4096, soft_max=1024, subtype='PIXEL',
        update=_settings_changed, description="Height of the live frame")
    lighting: EnumProperty(
        name="Lighting", items=LIGHTING_ITEMS, default='WORLD', update=_settings_changed,
        description="Where the live frame's lighting comes from")
    insert_keyframes: BoolProperty(
        name="Insert Keyframes", default=False,
        description="Expression presets also key the expression shape keys at the current "
                    "frame")


CLASSES = (PortraitRigEdit, PortraitRigAppearance, PortraitRigSceneSettings)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.portrait_rig = PointerProperty(type=PortraitRigSceneSettings)
    bpy.types.Object.portrait_rig = PointerProperty(type=PortraitRigAppearance)


def unregister():
    del bpy.types.Object.portrait_rig
    del bpy.types.Scene.portrait_rig
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    _backend_items.clear()
