"""The face model's arrays: one container for the Blender rig and the server.

A ``FaceData`` holds a FLAME-layout linear face model in numpy (no torch, importable in
Blender). The server wraps it for skinning on CPU/CUDA (``server/renderer/face_model.py``); the add-on
builds its mesh, shape keys, armature and vertex groups from the same arrays, received with the
``model`` message or loaded from a local file.

Shapes (V vertices, F triangles, S identity and E expression components, J = 5 joints):

    v_template     [V, 3]      float32  rest mesh, model frame (metres, +Y up, +Z out of the face)
    triangles      [F, 3]      int32    vertex indices, counter-clockwise seen from outside
                                        (the array named ``faces`` in files and on the wire)
    shapedirs      [V, 3, S]   float32  identity blend shapes (per unit coefficient)
    exprdirs       [V, 3, E]   float32  expression blend shapes
    posedirs       [V, 3, 36]  float32  pose correctives, FLAME layout: joints 1-4 x 9 entries of
                                        (R - I) row-major (smplx's lbs reshapes to [36, V*3])
    J_regressor    [J, V]      float32  joints from the shaped mesh
    weights        [V, J]      float32  linear-blend skin weights
    parents        [J]         int32    kinematic tree, -1 for the root
    vertex_albedo  [V, 3]      float32  diffuse albedo in [0, 1], linear
    uv             [V, 2]      float32  optional per-vertex UVs (for the Blender material)

Joint order is FLAME's: root (global), neck, jaw, left eye, right eye.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

JOINT_NAMES = ("root", "neck", "jaw", "eye_left", "eye_right")

# name in files and on the wire -> (dtype, number of dimensions); the order is the wire and file
# order.
ARRAY_SPEC = {
    "v_template": ("float32", 2),
    "faces": ("int32", 2),
    "shapedirs": ("float32", 3),
    "exprdirs": ("float32", 3),
    "posedirs": ("float32", 3),
    "J_regressor": ("float32", 2),
    "weights": ("float32", 2),
    "parents": ("int32", 1),
    "vertex_albedo": ("float32", 2),
    "uv": ("float32", 2),
}
OPTIONAL_ARRAYS = ("uv",)
# The attribute holding an array whose file and wire name is another (the mesh formats' "faces").
_ATTRIBUTES = {"faces": "triangles"}


def _attribute(name: str) -> str:
    """The ``FaceData`` attribute holding the array named ``name`` in files and on the wire."""
    return _ATTRIBUTES.get(name, name)


class FaceDataError(ValueError):
    """A face model whose arrays are missing or inconsistent."""


@dataclass
class FaceData:
    v_template: np.ndarray
    triangles: np.ndarray
    shapedirs: np.ndarray
    exprdirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    vertex_albedo: np.ndarray
    uv: np.ndarray | None = None
    shape_names: list[str] = field(default_factory=list)
    expression_names: list[str] = field(default_factory=list)
    name: str = "face model"
    source: str = ""
    version: str = ""

    def __post_init__(self):
        for key, (dtype, _) in ARRAY_SPEC.items():
            value = getattr(self, _attribute(key))
            if value is not None:
                setattr(self, _attribute(key), np.ascontiguousarray(value, dtype=dtype))
        self.validate()

    # ---------------------------------------------------------------- properties
    @property
    def n_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def n_triangles(self) -> int:
        return self.triangles.shape[0]

    @property
    def n_shape(self) -> int:
        return self.shapedirs.shape[2]

    @property
    def n_expression(self) -> int:
        return self.exprdirs.shape[2]

    @property
    def n_joints(self) -> int:
        return self.parents.shape[0]

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        v = self.v_template.shape[0] if self.v_template.ndim == 2 else -1
        j = self.parents.shape[0] if self.parents.ndim == 1 else -1
        expected = {
            "v_template": (v, 3), "faces": (None, 3), "shapedirs": (v, 3, None),
            "exprdirs": (v, 3, None), "posedirs": (v, 3, 9 * (j - 1)),
            "J_regressor": (j, v), "weights": (v, j), "parents": (j,),
            "vertex_albedo": (v, 3), "uv": (v, 2),
        }
        for key, shape in expected.items():
            value = getattr(self, _attribute(key))
            if value is None:
                if key in OPTIONAL_ARRAYS:
                    continue
                raise FaceDataError(f"{key} is missing")
            if value.ndim != len(shape) or any(
                    want is not None and got != want for got, want in zip(value.shape, shape)):
                want = "x".join("?" if s is None else str(s) for s in shape)
                raise FaceDataError(f"{key} has shape {value.shape}, expected {want}")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise FaceDataError(f"{key} holds NaN or inf")
        if self.triangles.size and (self.triangles.min() < 0 or self.triangles.max() >= v):
            raise FaceDataError("faces index vertices out of range")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents[1:], 1)):
            raise FaceDataError(f"parents {self.parents.tolist()} is not a tree rooted at 0")
        for names, count, key in ((self.shape_names, self.n_shape, "shape_names"),
                                  (self.expression_names, self.n_expression, "expression_names")):
            if len(names) > count:
                raise FaceDataError(f"{key} has {len(names)} names for {count} components")

    # ---------------------------------------------------------------- geometry (numpy)
    def shaped_vertices(self, shape=(), expression=()) -> np.ndarray:
        """Template plus identity and expression offsets (no pose), [V, 3] float64."""
        verts = self.v_template.astype(np.float64)
        for dirs, coeffs in ((self.shapedirs, shape), (self.exprdirs, expression)):
            coeffs = np.asarray(coeffs, dtype=np.float64)[: dirs.shape[2]]
            if coeffs.size:
                verts = verts + dirs[:, :, : coeffs.size] @ coeffs
        return verts

    def joints(self, shape=(), expression=()) -> np.ndarray:
        """Rest joint locations [J, 3] for the given identity (and expression, as in FLAME)."""
        return self.J_regressor.astype(np.float64) @ self.shaped_vertices(shape, expression)

    def component_name(self, kind: str, index: int) -> str:
        """Display name of identity (kind='shape') or expression component ``index``."""
        names = self.shape_names if kind == "shape" else self.expression_names
        if index < len(names) and names[index]:
            return names[index]
        return f"{'Shape' if kind == 'shape' else 'Exp'}{index:03d}"

    # ---------------------------------------------------------------- (de)serialisation
    def meta(self) -> dict:
        return {"name": self.name, "source": self.source, "version": self.version,
                "shape_names": list(self.shape_names),
                "expression_names": list(self.expression_names),
                "joint_names": list(JOINT_NAMES[: self.n_joints])}

    def summary(self) -> dict:
        """Small description for the server's hello reply."""
        return {"name": self.name, "source": self.source, "version": self.version,
                "vertices": self.n_vertices, "faces": self.n_triangles,
                "shape_components": self.n_shape, "expression_components": self.n_expression,
                "joints": self.n_joints}

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by their names in files and on the wire, in that order."""
        return {key: getattr(self, _attribute(key)) for key in ARRAY_SPEC
                if getattr(self, _attribute(key)) is not None}

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict | None = None) -> "FaceData":
        """Inverse of ``arrays`` (and ``meta``)."""
        return cls(**{_attribute(key): value for key, value in arrays.items()},
                   **_meta_kwargs(meta or {}))

    def to_wire(self) -> tuple[dict, list[memoryview]]:
        """Header fields and payload buffers for the ``model`` message (little-endian)."""
        entries, buffers, offset = [], [], 0
        for key, value in self.arrays().items():
            data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            entries.append({"name": key, "dtype": str(value.dtype), "shape": list(value.shape),
                            "offset": offset, "nbytes": data.nbytes})
            buffers.append(memoryview(data).cast("B"))
            offset += data.nbytes
        return {"meta": self.meta(), "arrays": entries}, buffers

    @classmethod
    def from_wire(cls, header: dict, payload) -> "FaceData":
        """Inverse of ``to_wire``; validates every array's name, dtype, shape and extent."""
        payload = memoryview(payload).cast("B")
        arrays = {}
        for entry in header.get("arrays", []):
            key = entry.get("name")
            if key not in ARRAY_SPEC:
                raise FaceDataError(f"unknown array {key!r}")
            dtype = np.dtype(ARRAY_SPEC[key][0]).newbyteorder("<")
            if entry.get("dtype") != ARRAY_SPEC[key][0]:
                raise FaceDataError(f"array {key} has dtype {entry.get('dtype')!r}, "
                                    f"expected {ARRAY_SPEC[key][0]}")
            try:
                shape = tuple(int(s) for s in entry["shape"])
                offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FaceDataError(f"array {key} has a malformed entry {entry!r}") from exc
            if (min(shape, default=0) < 0 or offset < 0
                    or nbytes != int(np.prod(shape)) * dtype.itemsize
                    or offset + nbytes > len(payload)):
                raise FaceDataError(f"array {key} does not fit the payload")
            arrays[key] = np.frombuffer(payload[offset: offset + nbytes], dtype=dtype).reshape(shape)
        return cls.from_arrays(arrays, header.get("meta", {}))

    def save(self, path) -> None:
        """Write an ``.npz`` file (arrays plus a JSON ``meta`` entry); no pickles."""
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(self.meta()).encode(), dtype=np.uint8),
                 **self.arrays())
        with open(path, "wb") as fh:
            fh.write(buf.getvalue())

    @classmethod
    def load(cls, path) -> "FaceData":
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta"]).decode()) if "meta" in npz.files else {}
            arrays = {key: npz[key] for key in ARRAY_SPEC if key in npz.files}
        return cls.from_arrays(arrays, meta)


def _meta_kwargs(meta: dict) -> dict:
    return {"shape_names": list(meta.get("shape_names", [])),
            "expression_names": list(meta.get("expression_names", [])),
            "name": str(meta.get("name", "face model")),
            "source": str(meta.get("source", "")),
            "version": str(meta.get("version", ""))}
