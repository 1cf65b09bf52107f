"""Rig parameters: the one schema the add-on writes, the wire carries and every backend reads.

Plain Python (dataclasses + stdlib only) so Blender's bundled interpreter imports it as is.

Conventions
-----------
* Model frame: FLAME's. Metres, +Y up, +Z out of the face, +X towards the subject's left
  (the viewer's right when looking at the face).
* Rotations are axis-angle vectors in radians (the direction is the axis, the norm the angle),
  FLAME/SMPL-X style. ``pose.global`` rotates the whole head about the root joint; ``neck``,
  ``jaw``, ``eye_left`` and ``eye_right`` are local rotations of FLAME joints 1-4.
* ``translation`` moves the posed head in the model frame after the global rotation.
* The perspective camera follows Blender/OpenGL: it looks down its local -Z with +Y up;
  ``camera.location`` and ``camera.rotation`` place it in the model frame. ``fov_y`` is the
  vertical field of view in degrees.
* The orthographic camera is DECA's: NDC = scale * (X + [tx, ty]) for model-frame points,
  with +Y up in the image and NDC [-1, 1] spanning the frame.
* ``lighting.sh`` is 9x3 (coefficient x RGB) in DECA's convention: basis
  [1, x, y, z, xy, xz, yz, x^2-y^2, 3z^2-1] on the model-frame unit normal times the constants in
  ``portrait_rig.sh``; shading = sum_k sh[k] * c_k * Y_k(n).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# Bounds: large enough for any sane rig, small enough to catch unit mistakes
# (degrees sent as radians, millimetres as metres) and garbage.
MAX_SHAPE = 400           # FLAME 2023 has 300 identity components; leave headroom.
MAX_EXPRESSION = 400
MAX_TEXTURE = 300         # FLAME's texture space has 200 components, BFM's albedo 199
MAX_COEFFICIENT = 20.0    # components are in standard deviations; |x| > 20 is never a face
MAX_TEXTURE_COEFFICIENT = 100.0   # texture codes weight the file's directions as they are
MAX_ANGLE = 4 * math.pi   # axis-angle norm (two full turns covers keyframe unwrapping)
MAX_TRANSLATION = 100.0   # metres
MAX_SH = 1e5            # HDR environments with a sun reach the thousands
MAX_ORTHO_SCALE = 1000.0
MAX_ORTHO_OFFSET = 100.0
MAX_EDITS = 64            # latent edit sliders per rig
MAX_EDIT = 100.0          # edit strengths (InterFaceGAN's useful range is about +-5)

POSE_JOINTS = ("global", "neck", "jaw", "eye_left", "eye_right")


class ParamError(ValueError):
    """Invalid rig parameters. ``field`` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


# --------------------------------------------------------------------------------------------
# Validation helpers: each returns a clean value or raises ParamError naming the field.

def _number(path: str, value: Any, limit: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(path, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ParamError(path, f"must be finite, got {value}")
    if abs(value) > limit:
        raise ParamError(path, f"magnitude {abs(value):g} exceeds the limit {limit:g}")
    return value


def _vector(path: str, value: Any, length: int, limit: float) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise ParamError(path, f"expected a list of {length} numbers, got {type(value).__name__}")
    if len(value) != length:
        raise ParamError(path, f"expected {length} values, got {len(value)}")
    return [_number(f"{path}[{i}]", v, limit) for i, v in enumerate(value)]


def _coefficients(path: str, value: Any, max_len: int,
                  limit: float = MAX_COEFFICIENT) -> list[float]:
    if not isinstance(value, (list, tuple)):
        raise ParamError(path, f"expected a list of numbers, got {type(value).__name__}")
    if len(value) > max_len:
        raise ParamError(path, f"at most {max_len} values, got {len(value)}")
    return [_number(f"{path}[{i}]", v, limit) for i, v in enumerate(value)]


def _rotation(path: str, value: Any) -> list[float]:
    vec = _vector(path, value, 3, MAX_ANGLE)
    if math.sqrt(sum(v * v for v in vec)) > MAX_ANGLE:
        raise ParamError(path, f"rotation angle exceeds {MAX_ANGLE:g} rad")
    return vec


def _optional_str(path: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParamError(path, f"expected a string or null, got {type(value).__name__}")
    if len(value) > 4096:
        raise ParamError(path, "string longer than 4096 characters")
    return value


def _name(path: str, value: Any) -> str | None:
    """A server-side name (identity, edit direction): 1-64 letters, digits, '.', '_', '-'."""
    value = _optional_str(path, value)
    if value is not None and (not 1 <= len(value) <= 64 or ".." in value or value[0] in "._-"
                              or not all(c.isascii() and (c.isalnum() or c in "._-")
                                         for c in value)):
        raise ParamError(path, f"{value!r} is not a name (1-64 letters, digits, '.', '_' or "
                               "'-', not starting with punctuation)")
    return value


def _check_keys(path: str, data: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise ParamError(path or "params", f"expected an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        where = f"{path}." if path else ""
        raise ParamError(f"{where}{unknown[0]}", f"unknown field (allowed: {', '.join(allowed)})")
    return data


# --------------------------------------------------------------------------------------------

@dataclass
class Pose:
    """Axis-angle rotations (radians) of FLAME's five joints."""
    global_: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    neck: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    jaw: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    eye_left: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    eye_right: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def joints(self) -> list[list[float]]:
        """Rotations in FLAME joint order: global, neck, jaw, left eye, right eye."""
        return [self.global_, self.neck, self.jaw, self.eye_left, self.eye_right]

    def to_dict(self) -> dict:
        return {name: list(vec) for name, vec in zip(POSE_JOINTS, self.joints())}

    @classmethod
    def from_dict(cls, data: Any, path: str = "pose") -> "Pose":
        _check_keys(path, data, POSE_JOINTS)
        values = {name: _rotation(f"{path}.{name}", data[name])
                  for name in POSE_JOINTS if name in data}
        if "global" in values:
            values["global_"] = values.pop("global")
        return cls(**values)


@dataclass
class Camera:
    """Perspective (Blender/OpenGL axes) or DECA orthographic camera; see the module notes."""
    type: str = "perspective"
    fov_y: float = 14.0
    location: list[float] = field(default_factory=lambda: [0.0, 0.0, 1.2])
    rotation: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    near: float = 0.01
    far: float = 100.0
    scale: float = 8.0
    tx: float = 0.0
    ty: float = 0.0

    TYPES = ("perspective", "orthographic")
    KEYS = ("type", "fov_y", "location", "rotation", "near", "far", "scale", "tx", "ty")

    def to_dict(self) -> dict:
        return {"type": self.type, "fov_y": self.fov_y, "location": list(self.location),
                "rotation": list(self.rotation), "near": self.near, "far": self.far,
                "scale": self.scale, "tx": self.tx, "ty": self.ty}

    @classmethod
    def from_dict(cls, data: Any, path: str = "camera") -> "Camera":
        _check_keys(path, data, cls.KEYS)
        cam = cls()
        if "type" in data:
            if data["type"] not in cls.TYPES:
                raise ParamError(f"{path}.type", f"must be one of {', '.join(cls.TYPES)}")
            cam.type = data["type"]
        if "fov_y" in data:
            cam.fov_y = _number(f"{path}.fov_y", data["fov_y"], 180.0)
        if "location" in data:
            cam.location = _vector(f"{path}.location", data["location"], 3, MAX_TRANSLATION)
        if "rotation" in data:
            cam.rotation = _rotation(f"{path}.rotation", data["rotation"])
        if "near" in data:
            cam.near = _number(f"{path}.near", data["near"], MAX_TRANSLATION)
        if "far" in data:
            cam.far = _number(f"{path}.far", data["far"], 1e4)
        if "scale" in data:
            cam.scale = _number(f"{path}.scale", data["scale"], MAX_ORTHO_SCALE)
        if "tx" in data:
            cam.tx = _number(f"{path}.tx", data["tx"], MAX_ORTHO_OFFSET)
        if "ty" in data:
            cam.ty = _number(f"{path}.ty", data["ty"], MAX_ORTHO_OFFSET)
        if not 0.0 < cam.fov_y < 180.0:
            raise ParamError(f"{path}.fov_y", f"must lie in (0, 180) degrees, got {cam.fov_y:g}")
        if not 0.0 < cam.near < cam.far:
            raise ParamError(f"{path}.near", "must satisfy 0 < near < far")
        if cam.scale <= 0.0:
            raise ParamError(f"{path}.scale", f"must be positive, got {cam.scale:g}")
        return cam


def default_sh() -> list[list[float]]:
    """Ambient light plus a soft key from the front, above and the subject's left (the upper
    right of a front view), so the default preview shows the face's shape."""
    return [[3.2, 3.2, 3.2],
            [0.35, 0.35, 0.35],    # x
            [0.45, 0.45, 0.45],    # y
            [0.55, 0.55, 0.55],    # z (towards the camera)
            [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


@dataclass
class Lighting:
    """Second-order spherical harmonics lighting in DECA's convention, [9][3]."""
    sh: list[list[float]] = field(default_factory=default_sh)

    def to_dict(self) -> dict:
        return {"sh": [list(row) for row in self.sh]}

    @classmethod
    def from_dict(cls, data: Any, path: str = "lighting") -> "Lighting":
        _check_keys(path, data, ("sh",))
        if "sh" not in data:
            return cls()
        rows = data["sh"]
        if not isinstance(rows, (list, tuple)) or len(rows) != 9:
            got = len(rows) if isinstance(rows, (list, tuple)) else type(rows).__name__
            raise ParamError(f"{path}.sh", f"expected 9 rows of 3 (RGB), got {got}")
        return cls([_vector(f"{path}.sh[{i}]", row, 3, MAX_SH) for i, row in enumerate(rows)])


MAX_STYLE_WEIGHT = 2.0    # exemplar style weights: 0 = content only, 1 = the paper's full style
MAX_STYLE_LAYERS = 64
MAX_EXEMPLAR = 1_000_000


@dataclass
class Appearance:
    """Backend-specific identity / appearance controls. Backends read what they understand:
    ``seed`` and ``truncation`` (StyleGAN), ``latent_file`` (a saved latent), ``reference_photo``
    (DiffusionRig's global latent; the photo identity of ``dualstylegan``), ``personal_model``
    (a personalised checkpoint by name), ``identity`` (a photo inverted on the server, by name),
    ``edits`` (StyleGAN: strength of each named latent edit direction the server offers, e.g.
    ``{"age": 2.0}``), ``texture`` (coefficients of the server's texture space,
    FLAME_texture.npz: DECA's ``tex`` code, 50 values from a fit, up to the file's component
    count; shorter lists are zero-padded, so ``[]`` is the mean texture), and the exemplar
    style of ``dualstylegan``:

    ``style_family`` (a style folder's name, e.g. "cartoon"; None: the server's default),
    ``style_exemplar`` (index of the exemplar in the family's code file, the official
    style id), ``style_seed`` (a style drawn by the family's sampler instead), ``style_image``
    (an image on the server embedded as a new exemplar instead), ``style_structure`` and
    ``style_colour`` (extrinsic weights of the structure and colour layers: 0 keeps the
    content's, 1 takes the exemplar's), ``style_weights`` (one weight per W+ layer, replacing
    the two), ``style_reconstruct`` (render the exemplar's own reconstruction instead of the
    rig's face: gallery thumbnails)."""
    seed: int | None = None
    truncation: float = 0.7
    latent_file: str | None = None
    reference_photo: str | None = None
    personal_model: str | None = None
    identity: str | None = None
    edits: dict[str, float] = field(default_factory=dict)
    style_family: str | None = None
    style_exemplar: int = 0
    style_seed: int | None = None
    style_image: str | None = None
    style_structure: float = 0.75
    style_colour: float = 1.0
    style_weights: list[float] | None = None
    style_reconstruct: bool = False
    texture: list[float] = field(default_factory=list)

    KEYS = ("seed", "truncation", "latent_file", "reference_photo", "personal_model",
            "identity", "edits", "style_family", "style_exemplar", "style_seed", "style_image",
            "style_structure", "style_colour", "style_weights", "style_reconstruct", "texture")

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.KEYS}
        out["edits"] = dict(self.edits)
        out["texture"] = list(self.texture)
        if self.style_weights is not None:
            out["style_weights"] = list(self.style_weights)
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = "appearance") -> "Appearance":
        _check_keys(path, data, cls.KEYS)
        app = cls()
        for name in ("seed", "style_seed"):
            if data.get(name) is not None:
                seed = data[name]
                if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                    raise ParamError(f"{path}.{name}", "must be an integer in [0, 2**32)")
                setattr(app, name, seed)
        if "truncation" in data:
            app.truncation = _number(f"{path}.truncation", data["truncation"], 2.0)
        for name in ("latent_file", "reference_photo", "personal_model", "style_family",
                     "style_image"):
            if name in data:
                setattr(app, name, _optional_str(f"{path}.{name}", data[name]))
        if "identity" in data:
            app.identity = _name(f"{path}.identity", data["identity"])
        if data.get("edits") is not None:
            edits = data["edits"]
            if not isinstance(edits, dict) or len(edits) > MAX_EDITS:
                raise ParamError(f"{path}.edits", f"expected an object of at most {MAX_EDITS} "
                                                  "direction names and strengths")
            app.edits = {_name(f"{path}.edits", key): _number(f"{path}.edits.{key}", value,
                                                              MAX_EDIT)
                         for key, value in edits.items()}
        if "style_exemplar" in data:
            index = data["style_exemplar"]
            if (isinstance(index, bool) or not isinstance(index, int)
                    or not 0 <= index < MAX_EXEMPLAR):
                raise ParamError(f"{path}.style_exemplar",
                                 f"must be an integer in [0, {MAX_EXEMPLAR}), got {index!r}")
            app.style_exemplar = index
        for name in ("style_structure", "style_colour"):
            if name in data:
                setattr(app, name, _style_weight(f"{path}.{name}", data[name]))
        if data.get("style_weights") is not None:
            weights = data["style_weights"]
            if not isinstance(weights, (list, tuple)) or not 0 < len(weights) <= MAX_STYLE_LAYERS:
                raise ParamError(f"{path}.style_weights", f"expected null or a list of 1.."
                                                          f"{MAX_STYLE_LAYERS} numbers")
            app.style_weights = [_style_weight(f"{path}.style_weights[{i}]", w)
                                 for i, w in enumerate(weights)]
        if "style_reconstruct" in data:
            if not isinstance(data["style_reconstruct"], bool):
                raise ParamError(f"{path}.style_reconstruct", "expected true or false")
            app.style_reconstruct = data["style_reconstruct"]
        if "texture" in data:
            app.texture = _coefficients(f"{path}.texture", data["texture"], MAX_TEXTURE,
                                        MAX_TEXTURE_COEFFICIENT)
        return app


def _style_weight(path: str, value: Any) -> float:
    weight = _number(path, value, MAX_STYLE_WEIGHT)
    if weight < 0:
        raise ParamError(path, f"must lie in [0, {MAX_STYLE_WEIGHT:g}], got {weight:g}")
    return weight


@dataclass
class RigParams:
    """Everything a backend needs to render one frame of the face rig."""
    shape: list[float] = field(default_factory=list)
    expression: list[float] = field(default_factory=list)
    pose: Pose = field(default_factory=Pose)
    translation: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    camera: Camera = field(default_factory=Camera)
    lighting: Lighting = field(default_factory=Lighting)
    appearance: Appearance = field(default_factory=Appearance)

    KEYS = ("version", "shape", "expression", "pose", "translation", "camera", "lighting",
            "appearance")

    def to_dict(self) -> dict:
        return {"version": SCHEMA_VERSION,
                "shape": list(self.shape),
                "expression": list(self.expression),
                "pose": self.pose.to_dict(),
                "translation": list(self.translation),
                "camera": self.camera.to_dict(),
                "lighting": self.lighting.to_dict(),
                "appearance": self.appearance.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> "RigParams":
        """Validate and build. Missing fields take their defaults; anything wrong raises
        ParamError naming the field."""
        _check_keys("", data, cls.KEYS)
        version = data.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ParamError("version", f"unsupported schema version {version!r} "
                                        f"(this build reads {SCHEMA_VERSION})")
        out = cls()
        if "shape" in data:
            out.shape = _coefficients("shape", data["shape"], MAX_SHAPE)
        if "expression" in data:
            out.expression = _coefficients("expression", data["expression"], MAX_EXPRESSION)
        if "pose" in data:
            out.pose = Pose.from_dict(data["pose"])
        if "translation" in data:
            out.translation = _vector("translation", data["translation"], 3, MAX_TRANSLATION)
        if "camera" in data:
            out.camera = Camera.from_dict(data["camera"])
        if "lighting" in data:
            out.lighting = Lighting.from_dict(data["lighting"])
        if "appearance" in data:
            out.appearance = Appearance.from_dict(data["appearance"])
        return out

    @classmethod
    def from_json(cls, text: str | bytes) -> "RigParams":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParamError("params", f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def validate_for_model(self, n_shape: int, n_expression: int) -> None:
        """Check the coefficient counts against a face model (shorter lists are zero-padded
        by the consumer; longer ones are an error)."""
        if len(self.shape) > n_shape:
            raise ParamError("shape", f"the face model has {n_shape} identity components, "
                                      f"got {len(self.shape)} values")
        if len(self.expression) > n_expression:
            raise ParamError("expression", f"the face model has {n_expression} expression "
                                           f"components, got {len(self.expression)} values")

    def copy(self) -> "RigParams":
        return RigParams.from_dict(self.to_dict())

