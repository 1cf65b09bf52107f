"""Texture codes on a rig, and the albedo they give in the viewport.

* The code (``RigParams.appearance.texture``: coefficients of the server's texture space,
  DECA's ``tex``) lives in the rig armature's custom property ``portrait_rig_texture``, a float
  array, keyframeable like the shape keys (hover a value in the Texture panel and press I, or
  ``keyframe_insert('["portrait_rig_texture"]')``). ``scene_reader`` sends it with every frame
  (read from the evaluated rig, so animated codes render frame by frame); photo fits set it.
* The viewport: *Show Texture* fetches the server's texture space (the ``texture`` message,
  ``portrait_rig.texture_space``) and makes the rig's material sample the albedo map of the
  current code through the UV layer ``texture``: the albedo the ``diffusionrig`` backend
  conditions on. The image follows the code as it changes or plays (depsgraph and frame
  handlers) and is packed into the .blend when it is saved. The space itself stays in memory
  for the session; a face model without one (the demo head) keeps its per-vertex albedo.
"""

from __future__ import annotations

import bpy
import numpy as np
from bpy.app.handlers import persistent

from ..portrait_rig import client as wire
from ..portrait_rig.params import MAX_TEXTURE, MAX_TEXTURE_COEFFICIENT
from ..portrait_rig.protocol import TEXTURE_COMPONENTS
from ..portrait_rig.texture_space import TextureSpace
from . import app_handlers, preferences, rig_builder
from .panel import SidebarSection

PROP_TEXTURE = "portrait_rig_texture"
PROP_ALBEDO = "portrait_rig_albedo"          # on images this module draws
UV_LAYER = "texture"
TEXTURE_NODE = "Portrait Rig Albedo"
UV_NODE = "Portrait Rig Texture UV"
FETCH_TIMEOUT_S = 60.0                       # the first request makes the server read the file

_spaces: dict[int, TextureSpace] = {}        # rig session_uid -> its server's texture space
_drawn: dict[int, tuple] = {}                # rig session_uid -> the code its image shows


def read_codes(arm_obj) -> list[float]:
    """The rig's texture code (``[]`` when it has none); pass an evaluated object to read
    animated values at the depsgraph's frame."""
    value = arm_obj.get(PROP_TEXTURE)
    return [] if value is None else [float(v) for v in value]


def set_codes(arm_obj, codes) -> None:
    """Store ``codes`` (at most ``MAX_TEXTURE`` values) as the rig's texture code, with the
    property's range and tooltip."""
    codes = [float(v) for v in codes][:MAX_TEXTURE]
    if not codes:
        if PROP_TEXTURE in arm_obj:
            del arm_obj[PROP_TEXTURE]
        return
    arm_obj[PROP_TEXTURE] = codes
    ui = arm_obj.id_properties_ui(PROP_TEXTURE)
    ui.update(min=-MAX_TEXTURE_COEFFICIENT, max=MAX_TEXTURE_COEFFICIENT, soft_min=-3.0,
              soft_max=3.0, description="Texture code: coefficients of the server's texture "
                                        "space (DECA's tex), the albedo DiffusionRig sees")


def fetch_space(prefs=None) -> TextureSpace | None:
    """The texture space of the server in the add-on's preferences (None: it has none).
    Blocking; raises ValueError (network policy), ConnectionError, TimeoutError."""
    prefs = prefs or preferences.get()
    host, port = prefs.server_address()
    if (error := preferences.network_error(host)) is not None:
        raise ValueError(error)
    with wire.Client(host, port, token=prefs.token or None, timeout=FETCH_TIMEOUT_S,
                     client_name="Blender Portrait Rig") as client:
        return TextureSpace.from_wire(*client.fetch_texture(TEXTURE_COMPONENTS))


def show_albedo(arm_obj, space: TextureSpace):
    """Make the rig's material show the albedo map of its texture code in ``space`` (module
    notes); returns the image. Raises ``rig_builder.RigError`` when the space's triangles are
    not the rig's."""
    arm_obj, mesh_obj = rig_builder.rig_parts(arm_obj)
    mesh = mesh_obj.data
    if space.face_uv.shape[0] != len(mesh.polygons):
        raise rig_builder.RigError(f"the texture space maps {space.face_uv.shape[0]} "
                                   f"triangles, the rig's mesh has {len(mesh.polygons)}")
    uv = mesh.uv_layers.get(UV_LAYER) or mesh.uv_layers.new(name=UV_LAYER, do_init=False)
    uv.data.foreach_set("uv", space.face_uv.ravel())     # loops run triangle by triangle
    image = _image(arm_obj, space.size)
    if not mesh.materials or mesh.materials[0] is None:
        raise rig_builder.RigError(f"'{mesh_obj.name}' has no material to show the albedo in")
    _link_texture(mesh.materials[0], image)
    key = arm_obj.original.session_uid
    _spaces[key] = space
    _drawn.pop(key, None)
    refresh(arm_obj)
    return image


def refresh(arm_obj) -> bool:
    """Redraw the rig's albedo image when its code changed; returns whether it did."""
    key = arm_obj.original.session_uid
    space = _spaces.get(key)
    image = bpy.data.images.get(_image_name(arm_obj))
    if space is None or image is None:
        return False
    code = tuple(read_codes(arm_obj))
    if _drawn.get(key) == code:
        return False
    albedo = np.clip(space.albedo(code), 0.0, 1.0)[::-1]          # Blender: bottom row first
    rgba = np.ones((space.size, space.size, 4), np.float32)
    rgba[..., :3] = albedo
    image.pixels.foreach_set(rgba.ravel())
    image.update()
    _drawn[key] = code
    return True


def _image_name(arm_obj) -> str:
    return f"{arm_obj.original.name} Albedo"


def _image(arm_obj, size: int):
    """The rig's albedo image: 8-bit, sRGB (texture code values are display-referred)."""
    name = _image_name(arm_obj)
    image = bpy.data.images.get(name)
    if image is None or tuple(image.size) != (size, size) or image.is_float:
        if image is not None:
            bpy.data.images.remove(image)
        image = bpy.data.images.new(name, size, size, alpha=False, float_buffer=False)
    image.colorspace_settings.name = "sRGB"
    image[PROP_ALBEDO] = True
    return image


def _link_texture(material, image) -> None:
    """Base colour <- image texture <- UV map ``texture`` (the vertex-colour node stays, so
    unlinking the texture brings the face model's albedo back)."""
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.bl_idname == "ShaderNodeBsdfPrincipled")
    texture = nodes.get(TEXTURE_NODE) or nodes.new("ShaderNodeTexImage")
    texture.name = texture.label = TEXTURE_NODE
    texture.image = image
    texture.location = (bsdf.location.x - 300, bsdf.location.y + 300)
    uv = nodes.get(UV_NODE) or nodes.new("ShaderNodeUVMap")
    uv.name = UV_NODE
    uv.uv_map = UV_LAYER
    uv.location = (texture.location.x - 200, texture.location.y)
    links.new(uv.outputs["UV"], texture.inputs["Vector"])
    links.new(texture.outputs["Color"], bsdf.inputs["Base Color"])


# ----------------------------------------------------------------------------- handlers

@persistent
def _on_update(scene, depsgraph=None) -> None:
    for key in list(_spaces):
        arm_obj = next((o for o in bpy.data.objects if o.session_uid == key), None)
        if arm_obj is None:
            _spaces.pop(key, None)
            _drawn.pop(key, None)
            continue
        try:
            refresh(arm_obj)
        except Exception as exc:        # noqa: BLE001 - a handler must not break the chain
            print(f"Portrait Rig: albedo of {arm_obj.name} not updated: {exc}")


@persistent
def _on_save(*_args) -> None:
    for image in bpy.data.images:
        if image.get(PROP_ALBEDO) and image.is_dirty:
            image.pack()


# ----------------------------------------------------------------------------- UI

class PORTRAIT_RIG_OT_show_texture(bpy.types.Operator):
    """Fetch the server's texture space and show the albedo of the rig's texture code in its
    material"""
    bl_idname = "portrait_rig.show_texture"
    bl_label = "Show Texture"
    bl_options = {'REGISTER', 'UNDO'}

    @classmethod
    def poll(cls, context):
        return rig_builder.find_rig(context.active_object) is not None

    def execute(self, context):
        rig = rig_builder.find_rig(context.active_object)
        try:
            space = fetch_space()
        except (ValueError, ConnectionError, TimeoutError, wire.ServerError) as exc:
            self.report({'ERROR'}, f"Show Texture: {exc}")
            return {'CANCELLED'}
        if space is None:
            self.report({'WARNING'}, "The server has no texture space for this face model: "
                                     "the material keeps the model's own albedo")
            return {'CANCELLED'}
        if PROP_TEXTURE not in rig:
            set_codes(rig, [0.0] * space.components)
        try:
            show_albedo(rig, space)
        except rig_builder.RigError as exc:
            self.report({'ERROR'}, f"Show Texture: {exc}")
            return {'CANCELLED'}
        self.report({'INFO'}, f"{space.source}: {space.components} texture components")
        return {'FINISHED'}


class VIEW3D_PT_portrait_rig_texture(SidebarSection, bpy.types.Panel):
    bl_label = "Texture"
    bl_options = {'DEFAULT_CLOSED'}

    @classmethod
    def poll(cls, context):
        return rig_builder.find_rig(context.active_object) is not None

    def draw(self, context):
        layout = self.layout
        rig = rig_builder.find_rig(context.active_object)
        layout.operator(PORTRAIT_RIG_OT_show_texture.bl_idname, icon='TEXTURE')
        if PROP_TEXTURE in rig:
            layout.prop(rig, f'["{PROP_TEXTURE}"]', text="Code")
        else:
            layout.label(text="Mean texture (no code)", icon='INFO')


CLASSES = (PORTRAIT_RIG_OT_show_texture, VIEW3D_PT_portrait_rig_texture)
HANDLERS = ((bpy.app.handlers.depsgraph_update_post, _on_update),
            (bpy.app.handlers.frame_change_post, _on_update),
            (bpy.app.handlers.save_pre, _on_save))


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    app_handlers.add(HANDLERS)


def unregister():
    app_handlers.remove(HANDLERS)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    _spaces.clear()
    _drawn.clear()
