"""Scene lighting as spherical harmonics: a Blender World (and optionally its lamps) as the
[9, 3] DECA light code of ``portrait_rig.sh``, expressed in a chosen frame.

Frames: Blender's world frame is Z up. ``R_world_to_frame`` [3, 3] maps world directions to
the target frame (for the render server, the camera frame: ``R_c^T``); a light seen from
world direction d contributes at ``R_world_to_frame @ d``.

World node setups understood (anything else is approximated by the World's viewport colour,
and ``parse_world(world).note`` says so):

* ``Background`` (or ``Emission``) -> World Output, Color constant or from an ``RGB`` node:
  uniform radiance Color x Strength, band 0 only.
* Color from an ``Environment Texture`` (equirectangular): the image is box-filtered to at
  most 64 x 32 texels (rows weighted by their solid angle), projected with
  ``sh.equirect_directions`` / ``sh.project_radiance`` and scaled by Strength. Its Vector may
  come through any chain of ``Mapping`` nodes (types Point, Texture, Vector, Normal; the
  Rotation and Scale inputs, unlinked) from a ``Texture Coordinate`` node (Generated and
  Object are the ray direction d, Normal is -d, as in Cycles' background shading; an Object
  output with an object set applies that object's inverse rotation and scale) or be
  unlinked (d). Location offsets are ignored: they have no exact
  meaning for light from infinitely far away. Non-uniform scale is honoured exactly (texels
  are moved to their world directions and their solid angles rescaled by the Jacobian).
* An Environment Texture without an image (or whose file is missing) renders magenta in
  Blender and does so here; a World with no output node or nothing in its Surface is black;
  no World at all is black. Linked Strength inputs count with their unlinked value.

Image pixels come from ``image.pixels`` (float images hold scene-linear values; byte images
tagged sRGB are linearised here). The projection of an environment is cached by everything
that affects it except the pixel values themselves (image identity, size, file, source,
colour space, unsaved-edits flag, Strength, mapping): call ``clear_cache()`` after editing an
environment image's pixels in place.

Lamps (``lights_to_sh``) are treated as distant lights seen from one point (the head): each
adds a directional light of its colour times the irradiance it delivers there, following
Cycles' units: Sun strength is irradiance (W/m^2); point and spot lights have radiant
intensity Power / (4 pi) (W/sr), so irradiance Power / (4 pi r^2), spots times their cone
falloff; area lights are Lambertian emitters of radiance Power / (pi Area), so irradiance
Power cos(theta) / (pi r^2) at distance r and angle theta off the light's axis. Sizes (soft
shadows, sun angle), shadowing, light node trees and per-ray-type factors are ignored. A
delta light has no finite SH expansion: its band-limited code shades a white surface facing it
with 17/16 of the Lambertian E / pi and leaves E / (16 pi) on the side facing away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..portrait_rig import sh
from ..portrait_rig.colour import srgb_to_linear
from . import compat

SAMPLE_HEIGHT = 32       # environment texels after box filtering (rows, latitude)
SAMPLE_WIDTH = 64        # (columns, longitude)
MAGENTA = (1.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_CACHE_LIMIT = 16


@dataclass(frozen=True)
class WorldLight:
    """A World's node tree reduced to distant light in Blender's world frame.

    ``radiance`` is the uniform radiance (linear RGB, Strength applied) when ``image`` is None,
    otherwise the factor (Strength) that multiplies the image's texels. ``lookup`` is the
    row-major 3x3 linear map from a world direction to the image's lookup direction.
    ``note`` describes what was understood, for the user interface.
    """
    radiance: tuple[float, float, float]
    image: object = None
    lookup: tuple[float, ...] = IDENTITY
    note: str = ""

    def cache_key(self) -> tuple:
        return (self.radiance, _image_stamp(self.image) if self.image else None, self.lookup)


_world_cache: dict[tuple, np.ndarray] = {}


def clear_cache() -> None:
    """Forget cached environment projections (after editing an image's pixels in place)."""
    _world_cache.clear()


def world_to_sh(world, R_world_to_frame) -> np.ndarray:
    """Light code [9, 3] (float64) of ``world`` (a ``bpy.types.World`` or None) in the frame
    that ``R_world_to_frame`` [3, 3] maps world directions into."""
    light = parse_world(world)
    key = light.cache_key()
    code = _world_cache.get(key)
    if code is None:
        code = _project_world(light)
        if len(_world_cache) >= _CACHE_LIMIT:
            _world_cache.clear()
        _world_cache[key] = code
    return sh.rotate(code, R_world_to_frame)


def parse_world(world) -> WorldLight:
    """Reduce a World's node tree to a ``WorldLight`` (see the module notes)."""
    if world is None:
        return WorldLight((0.0, 0.0, 0.0), note="No World: no light")
    tree = world.node_tree
    if tree is None or not compat.world_uses_nodes(world):
        return WorldLight(_rgb(world.color), note="World colour (no nodes)")
    # The output for all engines or for Cycles, else EEVEE's (queries match 'ALL' too).
    output = tree.get_output_node('CYCLES') or tree.get_output_node('EEVEE')
    if output is None:
        return WorldLight((0.0, 0.0, 0.0), note="World has no active output: no light")
    shader = _upstream(output.inputs["Surface"])
    if shader is None:
        return WorldLight((0.0, 0.0, 0.0), note="World Output has no Surface: no light")
    node, _ = shader
    if node.bl_idname not in ("ShaderNodeBackground", "ShaderNodeEmission"):
        return _fallback(world, f"unsupported shader '{node.name}'")
    strength = float(node.inputs["Strength"].default_value)
    colour_in = node.inputs["Color"]
    source = _upstream(colour_in)
    if source is None:
        radiance = tuple(c * strength for c in _rgb(colour_in.default_value))
        return WorldLight(radiance, note=f"Uniform {node.name} colour")
    src, socket = source
    if src.bl_idname == "ShaderNodeRGB":
        radiance = tuple(c * strength for c in _rgb(socket.default_value))
        return WorldLight(radiance, note=f"Uniform colour from '{src.name}'")
    if src.bl_idname != "ShaderNodeTexEnvironment":
        return _fallback(world, f"unsupported colour source '{src.name}'")
    if src.projection != 'EQUIRECTANGULAR':
        return _fallback(world, f"'{src.name}' uses {src.projection.lower()} projection")
    if src.image is None or 0 in src.image.size:
        missing = "no image" if src.image is None else f"no pixels in '{src.image.name}'"
        return WorldLight(tuple(c * strength for c in MAGENTA),
                          note=f"'{src.name}' has {missing} (renders magenta)")
    lookup = _lookup_map(src.inputs["Vector"])
    if isinstance(lookup, str):
        return _fallback(world, lookup)
    return WorldLight((strength,) * 3, image=src.image, lookup=lookup,
                      note=f"Environment '{src.image.name}' x {strength:g}")


def _fallback(world, why: str) -> WorldLight:
    return WorldLight(_rgb(world.color), note=f"World viewport colour ({why})")


def _rgb(colour) -> tuple[float, float, float]:
    return (float(colour[0]), float(colour[1]), float(colour[2]))


def _upstream(socket):
    """(node, output socket) feeding ``socket``, through reroutes; None when unlinked."""
    while socket.is_linked:
        link = socket.links[0]
        if not link.is_valid or link.is_muted:
            return None
        node = link.from_node
        if node.bl_idname == "NodeReroute":
            socket = node.inputs[0]
            continue
        return node, link.from_socket
    return None


def _lookup_map(vector_in) -> tuple[float, ...] | str:
    """Row-major linear map world direction -> lookup direction of a texture's Vector input,
    or a string saying why it cannot be followed."""
    total = np.eye(3)
    socket = vector_in
    while True:
        source = _upstream(socket)
        if source is None:
            break
        node, out = source
        if node.bl_idname == "ShaderNodeMapping":
            total = total @ _mapping_matrix(node)
            socket = node.inputs["Vector"]
            continue
        if node.bl_idname == "ShaderNodeTexCoord" and out.name in ("Generated", "Normal",
                                                                    "Object"):
            if out.name == "Object" and node.object is not None:
                linear = np.array(node.object.matrix_world.to_3x3(), dtype=np.float64)
                total = total @ np.linalg.inv(linear)
            elif out.name == "Normal":          # a background's normal faces the viewer: -d
                total = -total
            break
        return f"unsupported texture vector from '{node.name}'"
    if abs(np.linalg.det(total)) < 1e-12:
        return "degenerate mapping (zero scale)"
    return tuple(float(v) for v in total.ravel())


def _mapping_matrix(node) -> np.ndarray:
    """Linear part of a Mapping node acting on directions (Blender's svm_mapping):
    Point / Vector: R S v; Texture: S^-1 R^-1 v; Normal: R S^-1 v (then normalised)."""
    from mathutils import Euler
    rotation = np.array(Euler(node.inputs["Rotation"].default_value, 'XYZ').to_matrix(),
                        dtype=np.float64)
    scale = np.array(node.inputs["Scale"].default_value, dtype=np.float64)
    kind = node.vector_type
    if kind in ('POINT', 'VECTOR'):
        return rotation @ np.diag(scale)
    with np.errstate(divide="ignore"):
        inverse_scale = np.where(scale != 0, 1.0 / np.where(scale != 0, scale, 1), 0.0)
    if kind == 'TEXTURE':
        return np.diag(inverse_scale) @ rotation.T
    return rotation @ np.diag(inverse_scale)          # NORMAL


def _image_stamp(image) -> tuple:
    """What identifies an image's content without reading its pixels."""
    return (image.name_full, image.session_uid, tuple(image.size), image.source,
            image.filepath_raw, image.colorspace_settings.name, image.is_float,
            image.is_dirty, image.channels)


# ----------------------------------------------------------------------------- projection

def _project_world(light: WorldLight) -> np.ndarray:
    """Light code [9, 3] of a ``WorldLight`` in Blender's world frame."""
    if light.image is None:
        return sh.uniform(light.radiance)
    texels = sh.downsample_equirect(_image_pixels(light.image), SAMPLE_HEIGHT, SAMPLE_WIDTH)
    height, width = texels.shape[:2]
    lookup_dirs, solid = sh.equirect_directions(height, width)
    # Each texel is seen from the world direction B e (B = lookup^-1), renormalised; its solid
    # angle scales by |det B| / |B e|^3 (exactly 1 for a pure rotation).
    inverse = np.linalg.inv(np.reshape(light.lookup, (3, 3)))
    world_dirs = lookup_dirs @ inverse.T
    norms = np.linalg.norm(world_dirs, axis=1)
    world_dirs /= norms[:, None]
    solid = solid * abs(np.linalg.det(inverse)) / norms ** 3
    radiance = texels.reshape(-1, 3) * np.asarray(light.radiance)
    return sh.project_radiance(world_dirs, radiance, solid)


def _image_pixels(image) -> np.ndarray:
    """Linear RGB pixels [H, W, 3] float32, bottom row first (Blender's storage order)."""
    width, height = image.size
    channels = image.channels
    buffer = np.empty(width * height * channels, dtype=np.float32)
    image.pixels.foreach_get(buffer)
    pixels = buffer.reshape(height, width, channels)
    rgb = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    if not image.is_float and image.colorspace_settings.name.lower().startswith("srgb"):
        rgb = srgb_to_linear(rgb)
    return np.ascontiguousarray(rgb, dtype=np.float32)


# ----------------------------------------------------------------------------- lamps

def lights_to_sh(light_objects, target, R_world_to_frame) -> np.ndarray:
    """Light code [9, 3] of lamps seen from the world point ``target`` [3] as distant lights
    (see the module notes), in the frame ``R_world_to_frame`` maps world directions into.
    ``light_objects``: objects of type 'LIGHT' (others are skipped)."""
    target = np.asarray(target, dtype=np.float64)
    dirs, irradiance = [], []
    for obj in light_objects:
        if obj.type != 'LIGHT':
            continue
        found = _lamp_irradiance(obj, target)
        if found is not None:
            dirs.append(found[0])
            irradiance.append(found[1])
    if not dirs:
        return np.zeros((9, 3))
    frame_dirs = np.asarray(dirs) @ np.asarray(R_world_to_frame, dtype=np.float64).T
    # A delta light is a single "texel" of solid angle 1 holding the irradiance.
    return sh.project_radiance(frame_dirs, np.asarray(irradiance), np.ones(len(dirs)))


def _lamp_irradiance(obj, target: np.ndarray):
    """(unit world direction towards the lamp [3], RGB irradiance at ``target`` [3]) or None."""
    light = obj.data
    matrix = np.array(obj.matrix_world, dtype=np.float64)
    axis = matrix[:3, 2] / np.linalg.norm(matrix[:3, 2])       # lamps shine along local -Z
    colour = np.array(light.color, dtype=np.float64)
    if getattr(light, "use_temperature", False):
        colour = colour * np.array(light.temperature_color, dtype=np.float64)
    power = light.energy * 2.0 ** getattr(light, "exposure", 0.0)
    normalize = getattr(light, "normalize", True)
    if light.type == 'SUN':
        return axis, colour * power
    offset = matrix[:3, 3] - target
    distance = float(np.linalg.norm(offset))
    if distance < 1e-9:
        return None
    towards = offset / distance
    if light.type in ('POINT', 'SPOT'):
        radius = light.shadow_soft_size
        intensity = power / (4 * math.pi) if normalize else (
            power * radius * radius if radius > 0 else power / math.pi)
        if light.type == 'SPOT':
            intensity *= _spot_falloff(float(axis @ towards), light.spot_size, light.spot_blend)
        return towards, colour * intensity / distance ** 2
    if light.type == 'AREA':
        cos_theta = float(axis @ towards)                     # emits towards local -Z
        if cos_theta <= 0:
            return None
        sx = light.size * np.linalg.norm(matrix[:3, 0])
        sy = (light.size_y if light.shape in ('RECTANGLE', 'ELLIPSE') else light.size) \
            * np.linalg.norm(matrix[:3, 1])
        area = sx * sy * (math.pi / 4 if light.shape in ('DISK', 'ELLIPSE') else 1.0)
        radiance = power / (math.pi * area) if normalize else power / math.pi
        return towards, colour * radiance * area * cos_theta / distance ** 2
    return None


def _spot_falloff(cos_to_target: float, spot_size: float, spot_blend: float) -> float:
    """Cycles-style spot attenuation: 0 outside the cone, smoothstep over the blend region.
    ``cos_to_target`` is the cosine between the spot's axis and the direction to the target."""
    cos_half = math.cos(spot_size / 2)
    if cos_to_target <= cos_half:
        return 0.0
    blend = spot_blend * (1.0 - cos_half)
    if blend <= 0:
        return 1.0
    t = min((cos_to_target - cos_half) / blend, 1.0)
    return t * t * (3 - 2 * t)
