"""Synthetic FLAME model files: the official layout, random (seeded) content.

FLAME is licence-gated, so tests write look-alikes with the official key names and shapes
(dtypes selectable), in two flavours:

* ``write_distributed_pickle``: as FLAME ships, a protocol 2 pickle whose arrays are partly
  ``chumpy.ch.Ch`` objects (and a ``chumpy.ch_ops.add`` expression for ``J``) and whose
  ``J_regressor`` is a ``scipy.sparse.csc.csc_matrix``. Neither chumpy nor that scipy module
  path is needed to write it: stand-in classes registered under those names in ``sys.modules``
  while the pickler runs make the stream name exactly those classes, and are removed after.
  Arrays are written as Python 2 wrote them (data as latin1 text, dtype flags as ints).
* ``write_smplx_folder``: plain numpy pickles smplx reads itself (``FLAME_NEUTRAL.pkl`` and
  ``flame_static_embedding.pkl``), for cross-checks against ``smplx.FLAME``.

The model is sane enough to skin: a closed head-sized blob (a neck hole and a few loose
vertices bring the counts to FLAME's 5023 / 9976), joints regressed from a handful of
vertices near plausible joint sites (rows sum to 1), smooth skinning weights (rows sum to 1),
and small blend shapes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle

import numpy as np

from tests.support.stand_ins import stand_in_modules

N_VERTICES = 5023
N_TRIANGLES = 9976
N_IDENTITY = 300
N_EXPRESSION = 100
PARENTS = (-1, 0, 1, 1, 1)   # root, neck, jaw, left eye, right eye
# Rough joint sites in the model frame (metres, +Y up, +Z out of the face, +X subject's left).
JOINT_SITES = np.array([[0.0, -0.09, -0.02], [0.0, -0.06, -0.02], [0.0, -0.03, 0.01],
                        [0.032, 0.025, 0.055], [-0.032, 0.025, 0.055]])
ROOT_PARENT_UINT32 = 0xFFFFFFFF


def random_flame_arrays(seed: int = 0, n_vertices: int = N_VERTICES, n_triangles: int = N_TRIANGLES,
                        float_dtype=np.float64, face_dtype=np.uint32,
                        kintree_dtype=np.uint32) -> dict:
    """FLAME's dict with random content: v_template, f, shapedirs (300 + 100), posedirs,
    J_regressor (dense here), weights, kintree_table, J, bs_style, bs_type.

    ``kintree_table[0, 0]`` holds the root's parent as FLAME stores it: 0xFFFFFFFF for unsigned
    dtypes, -1 for signed ones.
    """
    rng = np.random.default_rng(seed)
    verts, triangles = _blob(rng, n_vertices, n_triangles)
    n_joints = len(PARENTS)

    regressor = np.zeros((n_joints, n_vertices))
    for j, site in enumerate(JOINT_SITES):
        nearest = np.argsort(np.linalg.norm(verts - site, axis=1))[:6]
        w = rng.uniform(0.5, 1.5, len(nearest))
        regressor[j, nearest] = w / w.sum()

    dist = np.linalg.norm(verts[:, None, :] - JOINT_SITES[None], axis=2)
    weights = np.exp(-dist / 0.03) * rng.uniform(0.8, 1.2, dist.shape)
    weights /= weights.sum(axis=1, keepdims=True)

    # Blend shapes: a few millimetres per unit coefficient, decaying with the component index.
    n_dirs = N_IDENTITY + N_EXPRESSION
    scale = 2e-3 / np.sqrt(1.0 + np.arange(n_dirs) % N_IDENTITY)
    shapedirs = rng.standard_normal((n_vertices, 3, n_dirs)) * scale
    posedirs = rng.standard_normal((n_vertices, 3, 9 * (n_joints - 1))) * 1e-3

    root = ROOT_PARENT_UINT32 if np.dtype(kintree_dtype).kind == "u" else -1
    kintree = np.array([[root, *PARENTS[1:]], list(range(n_joints))], dtype=kintree_dtype)
    return {
        "v_template": verts.astype(float_dtype),
        "f": triangles.astype(face_dtype),
        "shapedirs": shapedirs.astype(float_dtype),
        "posedirs": posedirs.astype(float_dtype),
        "J_regressor": regressor.astype(float_dtype),
        "weights": weights.astype(float_dtype),
        "kintree_table": kintree,
        "J": (regressor @ verts).astype(float_dtype),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def _blob(rng, n_vertices: int, n_triangles: int) -> tuple[np.ndarray, np.ndarray]:
    """A closed, outward-wound (counter-clockwise) lat-long ellipsoid with wobbles, trimmed to
    ``n_triangles`` by opening a hole at the bottom pole and padded with loose vertices."""
    segments = 64 if n_triangles >= 2000 else 8
    rings = -(-n_triangles // (2 * segments))   # triangles of a closed sphere: 2 * rings * segments
    n_grid = rings * segments + 2
    if n_grid > n_vertices:
        raise ValueError(f"{n_triangles} triangles need at least {n_grid} vertices")
    theta = np.pi * (np.arange(rings) + 1) / (rings + 1)        # from the top pole down
    phi = 2 * np.pi * np.arange(segments) / segments
    t, p = np.meshgrid(theta, phi, indexing="ij")
    direction = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1)
    direction = np.concatenate([[[0, 1, 0]], direction.reshape(-1, 3), [[0, -1, 0]]])
    wobble = 1 + 0.04 * np.sin(3 * direction[:, :1] + 2 * direction[:, 1:2]) * rng.uniform(0.5, 1.5)
    verts = direction * wobble * np.array([0.075, 0.11, 0.09])
    loose = rng.uniform(-0.02, 0.02, (n_vertices - n_grid, 3))
    verts = np.concatenate([verts, loose])

    def ring(r):
        return 1 + r * segments + np.arange(segments)

    def ring_next(r):
        return 1 + r * segments + (np.arange(segments) + 1) % segments

    top = [np.stack([np.zeros(segments, int), ring(0), ring_next(0)], 1)]
    bands = []
    for r in range(rings - 1):
        a, b, c, d = ring(r), ring_next(r), ring(r + 1), ring_next(r + 1)
        bands += [np.stack([a, c, b], 1), np.stack([b, c, d], 1)]
    bottom = [np.stack([np.full(segments, n_grid - 1), ring_next(rings - 1), ring(rings - 1)], 1)]
    triangles = np.concatenate(top + bands + bottom)
    return verts, triangles[: n_triangles]


# --------------------------------------------------------------------------------------------
# The "as distributed" pickle.

@contextlib.contextmanager
def _stand_in_classes(*qualified_names: str):
    """Temporary modules and classes named like chumpy's / scipy's, so the pickler writes
    exactly those global names. Modules that already exist are replaced for the duration."""
    names = {}
    for qualified in qualified_names:
        parts = qualified.split(".")[:-1]
        names.update({".".join(parts[:i]): {} for i in range(1, len(parts) + 1)})
    with stand_in_modules(names) as modules:
        classes = {}
        for qualified in qualified_names:
            module_name, class_name = qualified.rsplit(".", 1)
            cls = type(class_name, (_PickledState,), {"__module__": module_name,
                                                      "__qualname__": class_name})
            setattr(modules[module_name], class_name, cls)
            classes[qualified] = cls
        yield classes


class _PickledState:
    """Pickles as ``cls.__new__(cls)`` + BUILD(state), like chumpy and scipy objects do."""

    def __init__(self, state: dict):
        self._state = state

    def __getstate__(self):
        return self._state


def chumpy_state(array: np.ndarray) -> dict:
    """A plain ``chumpy.ch.Ch``'s pickled state (``Ch.__getstate__``: its __dict__ without the
    weak-reference caches)."""
    return {"_dirty_vars": {"x"}, "_itr": None, "_make_dense": False, "_make_sparse": False,
            "_depends_on_deps": {}, "x": array}


def csc_state(dense: np.ndarray) -> dict:
    """A ``scipy.sparse.csc_matrix``'s pickled state (its __dict__) for a dense matrix."""
    rows, cols = np.nonzero(dense.T)[::-1]          # column-major order of the non-zeros
    indptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=dense.shape[1]))])
    return {"_shape": dense.shape, "maxprint": 50, "format": "csc",
            "indices": rows.astype(np.int32), "indptr": indptr.astype(np.int32),
            "data": dense[rows, cols], "has_sorted_indices": True}


class _Python2StylePickler(pickle.Pickler):
    """Writes ndarrays and dtypes the way Python 2's cPickle did: array data as latin1 text
    rather than ``_codecs.encode`` bytes, dtype align/copy flags as ints."""

    def reducer_override(self, obj):
        if type(obj) is np.ndarray:
            data = np.ascontiguousarray(obj).tobytes().decode("latin1")
            reconstruct = np.empty(0).__reduce__()[0]
            return (reconstruct, (np.ndarray, (0,), "b"),
                    (1, obj.shape, obj.dtype, False, data))
        if type(obj) is np.dtype and obj.fields is None:
            return (np.dtype, (obj.str[1:], 0, 1), obj.__reduce__()[2])
        return NotImplemented


def write_distributed_pickle(path, arrays: dict, chumpy_keys=("v_template", "shapedirs"),
                             derived_keys=("J",), sparse_keys=("J_regressor",),
                             protocol: int = 2, numpy_core: str = "numpy.core") -> None:
    """FLAME as shipped: ``chumpy_keys`` as ``chumpy.ch.Ch``, ``derived_keys`` as a
    ``chumpy.ch_ops.add`` of two Ch (no stored value), ``sparse_keys`` as
    ``scipy.sparse.csc.csc_matrix``. Protocol 2 like the originals; protocols 0 and 1 rebuild
    objects through ``copyreg._reconstructor`` instead of NEWOBJ. ``numpy_core`` spells the
    module of NumPy's array reconstructor: "numpy.core" (NumPy 1, as the originals) or
    "numpy._core" (NumPy 2)."""
    if protocol > 2:
        raise ValueError("the distributed flavour is a protocol 0-2 pickle")
    names = ("chumpy.ch.Ch", "chumpy.ch_ops.add", "scipy.sparse.csc.csc_matrix")
    with _stand_in_classes(*names) as cls:
        ch, add, csc = (cls[n] for n in names)
        content = {}
        for key, value in arrays.items():
            if key in chumpy_keys:
                value = ch(chumpy_state(value))
            elif key in derived_keys:
                half = ch(chumpy_state(value / 2))
                state = {k: v for k, v in chumpy_state(value).items() if k != "x"}
                value = add({**state, "_dirty_vars": {"a", "b"}, "a": half, "b": half})
            elif key in sparse_keys:
                value = csc(csc_state(value))
            content[key] = value
        stream = io.BytesIO()
        _Python2StylePickler(stream, protocol=protocol).dump(content)
    # Protocols 0-2 name globals as "module\nname\n" text, so the spelling can be set here.
    data = stream.getvalue()
    for spelling in (b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n"):
        data = data.replace(spelling, b"c%s.multiarray\n" % numpy_core.encode())
    with open(path, "wb") as fh:
        fh.write(data)


def write_flame_fixture(path, seed: int = 0, **array_options) -> dict:
    """Random FLAME arrays written as the distributed pickle at ``path``; returns the arrays
    (``array_options`` go to ``random_flame_arrays``, e.g. n_vertices=200, n_triangles=300)."""
    arrays = random_flame_arrays(seed, **array_options)
    write_distributed_pickle(path, arrays)
    return arrays


def write_smplx_folder(folder, arrays: dict, n_landmarks: int = 51, seed: int = 0) -> str:
    """``FLAME_NEUTRAL.pkl`` (plain numpy) and ``flame_static_embedding.pkl`` (landmark triangles
    ``lmk_face_idx`` and barycentrics ``lmk_b_coords``, the keys smplx.FLAME reads); returns
    the folder for ``smplx.FLAME(model_path=folder)``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "FLAME_NEUTRAL.pkl"), "wb") as fh:
        pickle.dump(dict(arrays), fh)
    rng = np.random.default_rng(seed)
    bary = rng.uniform(0.1, 1.0, (n_landmarks, 3))
    embedding = {"lmk_face_idx": rng.integers(0, len(arrays["f"]), n_landmarks).astype(np.uint32),
                 "lmk_b_coords": bary / bary.sum(axis=1, keepdims=True)}
    with open(os.path.join(folder, "flame_static_embedding.pkl"), "wb") as fh:
        pickle.dump(embedding, fh)
    return os.fspath(folder)


def pickle_calling(module: str, name: str, *args) -> bytes:
    """A protocol 2 pickle whose only action is calling ``module.name(*args)``: what a
    malicious model file looks like (GLOBAL + REDUCE)."""
    body = pickle.dumps(tuple(args), protocol=2)[2:-1]   # the argument tuple, no header/STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."

