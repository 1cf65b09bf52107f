"""Read a licensed FLAME model file (``generic_model.pkl``, ``flame2023.pkl``) safely.

FLAME ships as a Python 2 pickle (protocol 2, read with ``encoding="latin1"``) of a dict:

    v_template     (5023, 3)       float     rest mesh, metres
    f              (9976, 3)       integer   triangles
    shapedirs      (5023, 3, 400)  float     300 identity + 100 expression components
    posedirs       (5023, 3, 36)   float     pose correctives, joints 1-4 x 9
    J_regressor    (5, 5023)       scipy.sparse.csc_matrix (a dense array in re-saved files)
    weights        (5023, 5)       float     skinning weights
    kintree_table  (2, 5)          integer   parents in row 0 (the root's stored as 0xFFFFFFFF
                                             or -1), joint ids in row 1
    J, bs_style, bs_type, ...                unused here

Float and integer widths differ between releases and re-saved copies; all are accepted.

Some arrays are ``chumpy.ch.Ch`` objects (chumpy no longer imports on NumPy >= 1.24) and the
regressor is a scipy sparse matrix. A pickle can run arbitrary code while it loads, so this
reader never imports what the stream names: ``find_class`` answers from an explicit allow-list
(NumPy's array reconstruction, stand-ins for chumpy and scipy sparse classes, and the few
builtins their pickled state needs) and refuses everything else with ``FlameFileError`` before
anything is called. The stand-ins only keep their pickled state; a chumpy object resolves to the
array stored under ``'x'``, a sparse matrix is densified from ``data/indices/indptr`` without
scipy. Standard library and numpy only, so Blender imports it as is.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import re

import numpy as np

from .face_data import FaceData, FaceDataError

FLAME_IDENTITY_COMPONENTS = 300   # shapedirs[..., :300] is identity, the rest expression
FLAME_EXPRESSION_COMPONENTS = 100

# FLAME has no albedo (its texture space, FLAME_texture.npz, is a separate download under its
# own licence), so the rig gets one uniform light skin tone: linear RGB, about sRGB (238, 188, 160).
DEFAULT_SKIN_ALBEDO = (0.855, 0.503, 0.352)

_REQUIRED_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights",
                  "kintree_table")
# What a root's parent may be stored as: -1, or -1 written to an unsigned 32/64-bit integer.
_ROOT_PARENT_CODES = (-1, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


class FlameFileError(ValueError):
    """A FLAME file that cannot be read: unreadable, unexpected content, or refused classes."""


# --------------------------------------------------------------------------------------------
# Stand-ins for the classes a FLAME pickle names. They never run code from the file: pickle
# creates them with __new__ and hands them their state.

class _ChumpyObject:
    """A chumpy object (``chumpy.ch.Ch``, ``chumpy.ch_ops.add``...): keeps its pickled state."""

    qualified_name = "chumpy"

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def value(self):
        """The stored array (a plain ``Ch`` keeps it under 'x'); None for derived expressions."""
        state = getattr(self, "state", None)
        x = state.get("x") if isinstance(state, dict) else None
        return x.value() if isinstance(x, _ChumpyObject) else x


class _SparseMatrix:
    """A scipy CSC/CSR matrix or array: keeps its pickled state, densifies with numpy alone."""

    qualified_name = "scipy.sparse"
    compressed_axis = 1   # 1 for CSC (indptr runs over columns), 0 for CSR (over rows)

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def dense(self) -> np.ndarray:
        state = getattr(self, "state", None)   # unset when the stream never gave one
        state = state if isinstance(state, dict) else {}
        try:
            # scipy keeps the shape under '_shape' (older releases: 'shape').
            shape = tuple(int(n) for n in state.get("_shape", state.get("shape")))
            if any(n < 0 for n in shape):
                raise ValueError(f"negative shape {shape}")
            data = np.asarray(state["data"])
            indices = np.asarray(state["indices"], dtype=np.int64)
            indptr = np.asarray(state["indptr"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise FlameFileError(
                f"{self.qualified_name} without data/indices/indptr/shape") from exc
        if len(shape) != 2 or data.ndim != 1 or data.dtype.kind not in "biuf":
            raise FlameFileError(f"{self.qualified_name} with shape {shape} and {data.dtype} "
                                 f"data {data.shape} is not a numeric matrix")
        n_outer, n_inner = shape[self.compressed_axis], shape[1 - self.compressed_axis]
        if (indptr.shape != (n_outer + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
                or indptr[-1] != len(indices) or len(indices) != len(data)
                or (indices.size and (indices.min() < 0 or indices.max() >= n_inner))):
            raise FlameFileError(f"{self.qualified_name} {shape} has inconsistent index arrays")
        outer = np.repeat(np.arange(n_outer), np.diff(indptr))
        dense = np.zeros(shape, dtype=data.dtype)
        where = (indices, outer) if self.compressed_axis == 1 else (outer, indices)
        np.add.at(dense, where, data)   # duplicate entries add up, as in scipy's todense()
        return dense


class _Unresolved:
    """A chumpy expression without a stored value (e.g. ``J``); only an error if it is needed."""

    def __init__(self, qualified_name: str):
        self.qualified_name = qualified_name


_OBJECT_BASE = object()   # what ``builtins.object`` resolves to: usable only as a base below


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocols 0/1) restricted to our stand-ins on ``object``."""
    if (not isinstance(cls, type) or not issubclass(cls, (_ChumpyObject, _SparseMatrix))
            or base is not _OBJECT_BASE or state is not None):
        raise FlameFileError("refused copyreg._reconstructor call: only chumpy/scipy stand-ins "
                             "on builtins.object are allowed")
    return cls.__new__(cls)


def _encode_latin1(text, encoding="latin1"):
    """``_codecs.encode``: how Python 3 writes ``bytes`` at protocol <= 2 (latin1 text only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise FlameFileError("refused _codecs.encode call other than str -> latin1 bytes")
    return text.encode("latin1")


def _dtype(obj, align=False, copy=False):
    # Python 2 pickles pass align/copy as ints, which NumPy 2 deprecates.
    return np.dtype(obj, bool(align), bool(copy))


# Taken from live objects so that the NumPy 1 (numpy.core) and NumPy 2 (numpy._core) spellings
# both resolve without importing either module by name.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.arange(2.0).__reduce_ex__(5)[0]   # protocol 5 arrays

_ALLOWED = {("builtins", "object"): _OBJECT_BASE, ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset, ("copyreg", "_reconstructor"): _reconstructor,
            ("_codecs", "encode"): _encode_latin1,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _SCALAR
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _FROMBUFFER

# scipy has moved these classes between private modules over the years.
_SPARSE_MODULES = {"csc": ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse"),
                   "csr": ("scipy.sparse.csr", "scipy.sparse._csr", "scipy.sparse")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; everything else raises ``FlameFileError``."""

    def __init__(self, file):
        super().__init__(file, encoding="latin1")
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module, name):
        # An overridden find_class sees Python 2 names (``__builtin__``, ``copy_reg``) raw.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module == "chumpy" or module.startswith("chumpy.")) and name.isidentifier():
            return self._stand_in(qualified, _ChumpyObject, {})
        for fmt, modules in _SPARSE_MODULES.items():
            if module in modules and name in (f"{fmt}_matrix", f"{fmt}_array"):
                return self._stand_in(qualified, _SparseMatrix,
                                      {"compressed_axis": 1 if fmt == "csc" else 0})
        raise FlameFileError(f"refused to load {qualified}: not a class a FLAME file uses "
                             f"(nothing from the file was run)")

    def _stand_in(self, qualified: str, base: type, attributes: dict) -> type:
        if qualified not in self._stand_ins:
            self._stand_ins[qualified] = type(base.__name__, (base,),
                                              {"qualified_name": qualified, **attributes})
        return self._stand_ins[qualified]


# --------------------------------------------------------------------------------------------

def read_flame_pickle(path) -> dict:
    """The file's top-level dict with stand-ins resolved to numpy arrays.

    chumpy objects become the array under their state's 'x' (expressions without one become an
    ``_Unresolved`` marker), sparse matrices become dense arrays of their stored dtype; other
    values are returned as unpickled. Raises ``FlameFileError`` for refused classes, malformed
    streams and anything that is not a dict, ``FileNotFoundError`` for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FLAME model file not found: {path}")
    try:
        with open(path, "rb") as fh:
            content = _RestrictedUnpickler(fh).load()
        if not isinstance(content, dict):
            raise FlameFileError(f"holds a {type(content).__name__}, expected FLAME's dict")
        return {str(key): _resolve(value) for key, value in content.items()}
    except FlameFileError as exc:
        raise FlameFileError(f"{path}: {exc}") from None
    except Exception as exc:   # a malformed stream surfaces as almost any exception type
        raise FlameFileError(f"{path} is not a readable FLAME pickle "
                             f"({type(exc).__name__}: {exc})") from exc


def _resolve(value):
    if isinstance(value, _ChumpyObject):
        array = value.value()
        return _Unresolved(value.qualified_name) if array is None else _resolve(array)
    if isinstance(value, _SparseMatrix):
        return value.dense()
    return value


def load_flame(path, n_shape: int = FLAME_IDENTITY_COMPONENTS,
               n_expression: int = FLAME_EXPRESSION_COMPONENTS) -> FaceData:
    """A FLAME file as ``FaceData`` with its first ``n_shape`` identity and ``n_expression``
    expression components (float32 arrays, parents with -1 for the root).

    ``vertex_albedo`` is ``DEFAULT_SKIN_ALBEDO`` on every vertex (FLAME has no albedo), ``uv`` is
    None; ``version`` is guessed from the path (see ``guess_flame_version``).
    """
    path = os.fspath(path)
    content = read_flame_pickle(path)
    arrays = {key: _numeric_array(path, key, content) for key in _REQUIRED_KEYS}

    dirs = arrays["shapedirs"]
    if dirs.ndim != 3 or dirs.shape[2] < FLAME_IDENTITY_COMPONENTS:
        raise FlameFileError(f"{path}: shapedirs has shape {dirs.shape}, expected (V, 3, K) "
                             f"with {FLAME_IDENTITY_COMPONENTS} identity components first")
    available = {"n_shape": FLAME_IDENTITY_COMPONENTS,
                 "n_expression": dirs.shape[2] - FLAME_IDENTITY_COMPONENTS}
    for label, count in (("n_shape", n_shape), ("n_expression", n_expression)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise FlameFileError(f"{label} must be an integer, got {count!r}")
        if not 0 <= count <= available[label]:
            raise FlameFileError(f"{label}={count} outside 0..{available[label]}: "
                                 f"{path} has {available[label]} such components")

    triangles, n_vertices = arrays["f"], len(arrays["v_template"])
    # checked before any int32 cast could wrap an index
    if triangles.size and (triangles.min() < 0 or triangles.max() >= n_vertices):
        raise FlameFileError(f"{path}: f indexes vertices outside 0..{n_vertices - 1}")
    first_expression = FLAME_IDENTITY_COMPONENTS
    try:
        return FaceData(
            v_template=arrays["v_template"],
            triangles=arrays["f"],
            shapedirs=dirs[:, :, :n_shape],
            exprdirs=dirs[:, :, first_expression: first_expression + n_expression],
            posedirs=arrays["posedirs"],
            J_regressor=arrays["J_regressor"],
            weights=arrays["weights"],
            parents=_parents(path, arrays["kintree_table"]),
            vertex_albedo=np.tile(np.float32(DEFAULT_SKIN_ALBEDO), (n_vertices, 1)),
            uv=None, name="FLAME", source=path, version=guess_flame_version(path))
    except FaceDataError as exc:
        raise FlameFileError(f"{path}: {exc}") from exc


def _numeric_array(path: str, key: str, content: dict) -> np.ndarray:
    if key not in content:
        raise FlameFileError(f"{path} has no '{key}' (keys: {', '.join(sorted(content))})")
    value = content[key]
    if isinstance(value, _Unresolved):
        raise FlameFileError(f"{path}: '{key}' is a {value.qualified_name} expression without a "
                             f"stored value; only plain chumpy arrays can be read without chumpy")
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise FlameFileError(f"{path}: '{key}' is {kind}, expected a numeric array")
    return value


def _parents(path: str, kintree: np.ndarray) -> np.ndarray:
    """Row 0 of ``kintree_table`` with the root's stored parent mapped to -1."""
    if kintree.ndim != 2 or kintree.shape[0] != 2 or kintree.shape[1] == 0:
        raise FlameFileError(f"{path}: kintree_table has shape {kintree.shape}, expected (2, J)")
    if not np.array_equal(kintree, np.round(kintree)):   # some re-saved files use floats
        raise FlameFileError(f"{path}: kintree_table does not hold integers")
    table = kintree.astype(np.int64)   # uint32 0xFFFFFFFF stays 4294967295 here
    if not np.array_equal(table[1], np.arange(table.shape[1])):
        raise FlameFileError(f"{path}: kintree_table joint ids {table[1].tolist()} are not 0..J-1")
    root = int(kintree[0, 0])   # a Python int: exact for uint64 too
    if root not in _ROOT_PARENT_CODES:
        raise FlameFileError(f"{path}: kintree_table root parent is {root}, expected -1 "
                             f"or 0xFFFFFFFF")
    parents = table[0].copy()
    parents[0] = -1
    return parents.astype(np.int32)


def guess_flame_version(path) -> str:
    """FLAME release year from the file or folder name (``flame2023.pkl``, ``FLAME2020/``...).

    The 2017-2023 releases store the same array names and shapes, so the name is the only
    reliable hint: "2023", "2023 (no jaw)", "2020"... or "unknown".
    """
    parts = os.path.normpath(os.fspath(path)).split(os.sep)
    for part in reversed(parts[-3:]):   # file name first, then its folders
        match = re.search(r"(?<!\d)(20[12]\d)(?!\d)", part)
        if match:
            no_jaw = "no_jaw" in parts[-1].lower()
            return match.group(1) + (" (no jaw)" if no_jaw else "")
    return "unknown"
