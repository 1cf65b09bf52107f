"""Where the 68 photo landmarks sit on a face model: a landmark embedding.

Each landmark is a point on the mesh surface given by a triangle and barycentric weights, so it
follows every blend shape and joint (FLAME's "static" embedding). Two sources:

* FLAME: the user's embedding file (FLAME is licence-gated, so is its embedding):
  DECA's ``landmark_embedding.npy`` (``full_lmk_faces_idx`` [1, 68] and
  ``full_lmk_bary_coords`` [1, 68, 3]: all 68 points, the jaw line included) or smplx's
  ``flame_static_embedding.pkl`` (``lmk_face_idx`` [51], ``lmk_b_coords`` [51, 3]: points
  17-67, no jaw line). Both are pickles; they are read with an unpickler that builds NumPy
  arrays only and never imports or runs what the file names (the torch tensors DECA's file
  also holds, for the pose-dependent jaw line, are skipped).
* Any other model (the demo head, ``.npz`` models): ``detect_embedding`` renders the neutral
  face from the front and lifts the landmarks the photo detector finds on that render onto the
  triangles under them - the way a new mesh is annotated, with the very predictor the photos
  go through. The result is cached per model.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from portrait_rig.face_data import FaceData
from portrait_rig.params import Camera, default_sh
from server.photo.landmarks import FaceDetector, NoFaceFound
from server.renderer import BufferRenderer, CameraBatch, project, screen_space
from portrait_rig.colour import linear_to_srgb

N_LANDMARKS = 68


class EmbeddingError(ValueError):
    """A landmark embedding file that cannot be used."""


@dataclass(frozen=True)
class LandmarkEmbedding:
    """``triangles`` [68] int64 (rows of the mesh's triangle array), ``barycentric`` [68, 3] float32
    (weights of the triangle's three corners, summing to 1), ``valid`` [68] bool (False where
    the source does not define the landmark; its triangle and weights are then meaningless)."""
    triangles: np.ndarray
    barycentric: np.ndarray
    valid: np.ndarray
    source: str = ""

    def __post_init__(self):
        if (self.triangles.shape != (N_LANDMARKS,) or self.barycentric.shape != (N_LANDMARKS, 3)
                or self.valid.shape != (N_LANDMARKS,)):
            raise EmbeddingError(f"{self.source or 'embedding'}: expected {N_LANDMARKS} "
                                 f"triangles and barycentric weights, got "
                                 f"{self.triangles.shape} and {self.barycentric.shape}")

    def check(self, data: FaceData) -> "LandmarkEmbedding":
        """Raise ``EmbeddingError`` unless every valid landmark names a triangle of ``data``."""
        used = self.triangles[self.valid]
        if used.size and (used.min() < 0 or used.max() >= data.n_triangles):
            raise EmbeddingError(f"{self.source or 'embedding'} names triangles up to "
                                 f"{used.max()}, but {data.name} has {data.n_triangles}")
        return self

    def points(self, vertices: torch.Tensor, mesh_triangles: torch.Tensor) -> torch.Tensor:
        """Landmark positions [B, 68, 3] on meshes ``vertices`` [B, V, 3] with triangles
        ``mesh_triangles`` [F, 3] long. Invalid landmarks come out as the position of their
        (arbitrary) triangle; mask them with ``valid``."""
        corners = mesh_triangles[torch.as_tensor(self.triangles,
                                                 device=mesh_triangles.device)]  # [68, 3]
        weights = torch.as_tensor(self.barycentric, dtype=vertices.dtype,
                                  device=vertices.device)
        return (vertices[:, corners] * weights[None, :, :, None]).sum(dim=2)


class LandmarkModel:
    """Poses only the vertices the landmarks need, exactly as ``FaceModel.pose`` would.

    Joints come from the whole shaped mesh, so they enter as extra "vertices" (the regressed
    template joints and their blend shapes, no pose correctives) that an identity regressor
    picks; smplx's ``lbs`` then runs on a few hundred vertices instead of the whole mesh."""

    def __init__(self, model, embedding: LandmarkEmbedding):
        used = model.triangles[torch.as_tensor(embedding.triangles, device=model.device)]  # [68, 3]
        ids, corners = torch.unique(used, return_inverse=True)
        n, n_joints = len(ids), model.J_regressor.shape[0]
        joints = model.J_regressor
        self.v_template = torch.cat([model.v_template[ids], joints @ model.v_template])
        self.blend_dirs = torch.cat([model.blend_dirs[ids],
                                     torch.einsum("jv,vck->jck", joints, model.blend_dirs)])
        posedirs = model.posedirs.view(model.posedirs.shape[0], -1, 3)[:, ids]
        self.posedirs = torch.cat([posedirs, posedirs.new_zeros(posedirs.shape[0], n_joints, 3)],
                                  1).reshape(posedirs.shape[0], -1)
        eye = torch.eye(n_joints, dtype=model.dtype, device=model.device)
        self.J_regressor = torch.cat([eye.new_zeros(n_joints, n), eye], 1)
        self.weights = torch.cat([model.weights[ids], eye])
        self.parents = model.parents
        self.corners = corners                                                   # [68, 3]
        self.barycentric = torch.as_tensor(embedding.barycentric, dtype=model.dtype,
                                           device=model.device)
        self.n = n

    def landmarks(self, shape, expression, pose) -> torch.Tensor:
        """[B, 68, 3] for shape [B, S], expression [B, E], pose [B, J, 3] (full counts)."""
        from smplx.lbs import lbs
        betas = torch.cat([shape, expression], dim=1)
        verts, _ = lbs(betas, pose.reshape(pose.shape[0], -1), self.v_template,
                       self.blend_dirs, self.posedirs, self.J_regressor, self.parents,
                       self.weights)
        return (verts[:, : self.n][:, self.corners] * self.barycentric[None, ..., None]).sum(2)


# --------------------------------------------------------------------------------------------
# FLAME embedding files

# NumPy's array reconstruction, taken from live objects so both numpy.core (NumPy 1) and
# numpy._core (NumPy 2) spellings resolve without importing either by name.
_NUMPY_GLOBALS = {"_reconstruct": np.empty(0).__reduce__()[0],
                  "scalar": np.float64(0).__reduce__()[0],
                  "_frombuffer": np.arange(2.0).__reduce_ex__(5)[0]}


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EmbeddingError("refused _codecs.encode call other than str -> latin1 bytes")
    return text.encode("latin1")


class _Skipped:
    """Stands in for anything torch-related in the file: accepts its arguments, keeps
    nothing, so the entry it builds is simply unusable."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file, encoding="latin1")

    def find_class(self, module, name):
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                      "numpy.core.numeric", "numpy._core.numeric"):
            if module == "numpy" and name == "ndarray":
                return np.ndarray
            if module == "numpy" and name == "dtype":
                return lambda obj, align=False, copy=False: np.dtype(obj, bool(align), bool(copy))
            if name in _NUMPY_GLOBALS:
                return _NUMPY_GLOBALS[name]
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "_codecs" and name == "encode":     # bytes in protocol-2 pickles
            return _latin1_bytes
        if module == "torch" or module.startswith("torch."):
            return _Skipped
        raise EmbeddingError(f"refused to load {module}.{name}: a landmark embedding holds "
                             "arrays only (nothing from the file was run)")

    def persistent_load(self, pid):
        return None


def _read_pickled(path: Path) -> object:
    """The object in a pickle, or in a ``.npy`` holding a pickled object (what ``np.save``
    writes for a dict)."""
    raw = path.read_bytes()
    stream = io.BytesIO(raw)
    if raw.startswith(b"\x93NUMPY"):
        version = np.lib.format.read_magic(stream)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = header(stream)
        if dtype != np.dtype(object):
            raise EmbeddingError(f"{path}: a {dtype} array of shape {shape}, expected the "
                                 "dict DECA saves")
    try:
        obj = _NumpyOnlyUnpickler(stream).load()
    except EmbeddingError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed stream
        raise EmbeddingError(f"{path}: not a readable landmark embedding ({exc})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        obj = obj.reshape(()).item()
    return obj


def _array(data: dict, key: str, path: Path, shape: tuple, kind: str) -> np.ndarray:
    value = data.get(key)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kind:
        raise EmbeddingError(f"{path}: '{key}' is missing or not a numeric array")
    value = value.reshape(-1, *shape[1:]) if value.ndim != len(shape) else value
    if value.shape != shape:
        raise EmbeddingError(f"{path}: '{key}' has shape {value.shape}, expected {shape}")
    return value


def load_flame_embedding(path) -> LandmarkEmbedding:
    """Read DECA's ``landmark_embedding.npy`` or smplx's ``flame_static_embedding.pkl``
    (see the module notes)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"landmark embedding not found: {path} (pass --embedding FILE, "
                                "or put DECA's landmark_embedding.npy at "
                                "$PORTRAIT_RIG_HOME/flame/landmark_embedding.npy)")
    data = _read_pickled(path)
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: expected a dict, got {type(data).__name__}")
    valid = np.ones(N_LANDMARKS, dtype=bool)
    if "full_lmk_faces_idx" in data:                      # DECA: all 68
        triangles = _array(data, "full_lmk_faces_idx", path, (N_LANDMARKS,), "iu")
        bary = _array(data, "full_lmk_bary_coords", path, (N_LANDMARKS, 3), "f")
    elif "lmk_face_idx" in data:                          # smplx: 51, without the jaw line
        n = N_LANDMARKS - 17
        triangles = np.zeros(N_LANDMARKS, dtype=np.int64)
        bary = np.full((N_LANDMARKS, 3), 1.0 / 3.0)
        triangles[17:] = _array(data, "lmk_face_idx", path, (n,), "iu")
        bary[17:] = _array(data, "lmk_b_coords", path, (n, 3), "f")
        valid[:17] = False
    else:
        raise EmbeddingError(f"{path}: neither DECA's 'full_lmk_faces_idx' nor smplx's "
                             f"'lmk_face_idx' (keys: {', '.join(map(str, data))})")
    return LandmarkEmbedding(triangles.astype(np.int64), bary.astype(np.float32), valid,
                             source=str(path))


# --------------------------------------------------------------------------------------------
# Embeddings found by detection on a render

DETECTION_SIZE = 512


_DETECTED: dict[tuple[str, int], LandmarkEmbedding] = {}


def detect_embedding(data: FaceData, size: int = DETECTION_SIZE) -> LandmarkEmbedding:
    """The landmarks the photo detector finds on a frontal render of ``data``'s neutral face,
    lifted onto the triangles under them (cached per model content)."""
    key = (_fingerprint(data), size)
    if key not in _DETECTED:
        _DETECTED[key] = _detect(data, size)
    return _DETECTED[key]


def _fingerprint(data: FaceData) -> str:
    digest = hashlib.sha1()
    for array in (data.v_template, data.triangles, data.vertex_albedo):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _detect(data: FaceData, size: int) -> LandmarkEmbedding:

    # Frame the head: its height spans ~85% of the frame.
    lo, hi = data.v_template.min(0), data.v_template.max(0)
    centre = (lo + hi) / 2
    camera = Camera(type="orthographic", scale=1.7 / float(hi[1] - lo[1]),
                    tx=-float(centre[0]), ty=-float(centre[1]))
    renderer = BufferRenderer(data.triangles)
    vertices = torch.as_tensor(data.v_template, dtype=torch.float32)[None]
    with torch.no_grad():
        buffers = renderer.render(vertices, torch.as_tensor(data.vertex_albedo),
                                  torch.tensor(default_sh(), dtype=torch.float32) * 0.3,
                                  [camera], size, size)
    mask = buffers.mask[0, ..., 0].numpy() > 0
    rgb = linear_to_srgb(buffers.rendered[0].numpy())
    rgb = np.where(mask[..., None], rgb, 0.5)
    try:
        face = FaceDetector(upsample=0)(np.round(rgb * 255).astype(np.uint8))
    except NoFaceFound:
        raise EmbeddingError(f"no face found on a frontal render of {data.name}: it needs a "
                             "landmark embedding file") from None

    # Lift: the triangle under each landmark, with the landmark's barycentric weights in it
    # (landmarks just off the silhouette take the nearest covered pixel's triangle).
    triangle_image = buffers.triangle[0].numpy()
    covered = np.argwhere(mask)                                        # [N, 2] (row, col)
    cameras = CameraBatch.from_params([camera])
    ndc, depth = project(vertices, cameras, size, size)
    pixel_xy = screen_space(ndc, depth, cameras, size, size)[0][0].numpy().astype(np.float64)
    triangles = np.zeros(N_LANDMARKS, dtype=np.int64)
    bary = np.zeros((N_LANDMARKS, 3))
    for i, (x, y) in enumerate(face.landmarks):
        col, row = int(round(x)), int(round(y))
        if not (0 <= row < size and 0 <= col < size and mask[row, col]):
            row, col = covered[np.argmin(((covered - [y, x]) ** 2).sum(1))]
        tri = int(triangle_image[row, col])
        a, b, c = pixel_xy[data.triangles[tri]]
        point = np.array([x, y]) + 0.5                 # dlib's pixel centres -> renderer's
        weights = np.linalg.solve(np.array([[a[0], b[0], c[0]], [a[1], b[1], c[1]],
                                            [1.0, 1.0, 1.0]]), np.array([*point, 1.0]))
        weights = np.clip(weights, 0.0, None)
        triangles[i], bary[i] = tri, weights / weights.sum()
    return LandmarkEmbedding(triangles, bary.astype(np.float32), np.ones(N_LANDMARKS, bool),
                             source=f"detected on a frontal render of {data.name}")


def embedding_for(data: FaceData, path=None) -> LandmarkEmbedding:
    """The embedding file at ``path`` if given, else one detected on a render of ``data``."""
    embedding = load_flame_embedding(path) if path else detect_embedding(data)
    return embedding.check(data)
