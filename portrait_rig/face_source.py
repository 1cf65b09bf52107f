"""Where the face model comes from: the shipped demo head, a user's FLAME file, or our .npz.

One entry point for the server's ``--face-model`` option and the add-on's model path, so both
sides build the same ``FaceData`` from the same setting. Standard library and numpy only.
"""

from __future__ import annotations

import dataclasses
import os

from .face_data import FaceData

DEMO = "demo"
FLAME_EXTENSIONS = (".pkl",)
FACE_DATA_EXTENSIONS = (".npz",)


def load_face_data(source: str, n_shape: int | None = None,
                   n_expression: int | None = None) -> FaceData:
    """The face model named by ``source``, keeping at most the first ``n_shape`` identity and
    ``n_expression`` expression components (None keeps all the source has).

    ``source`` is "demo" (the procedurally generated head shipped with Portrait Rig), a FLAME
    ``.pkl`` (read without chumpy and without running code from the file, see
    ``portrait_rig.flame_file``) or an ``.npz`` written by ``FaceData.save``. Asking for more
    components than the source has is an error, not a silent clamp.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"face model source must be a path or {DEMO!r}, "
                        f"got {type(source).__name__}")
    source = os.fspath(source)
    if source == DEMO:
        from .demo_head import demo_head   # generated on demand; not needed for file sources
        return limit_components(demo_head(), n_shape, n_expression)

    path = os.path.expanduser(source)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FLAME_EXTENSIONS + FACE_DATA_EXTENSIONS:
        raise ValueError(f"unknown face model source {source!r}: expected {DEMO!r}, a FLAME "
                         f"{'/'.join(FLAME_EXTENSIONS)} file or a {'/'.join(FACE_DATA_EXTENSIONS)} "
                         f"face model file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"face model file not found: {path}")
    if ext in FLAME_EXTENSIONS:
        from .flame_file import FLAME_EXPRESSION_COMPONENTS, FLAME_IDENTITY_COMPONENTS, load_flame
        return load_flame(path,
                          FLAME_IDENTITY_COMPONENTS if n_shape is None else n_shape,
                          FLAME_EXPRESSION_COMPONENTS if n_expression is None else n_expression)
    return limit_components(FaceData.load(path), n_shape, n_expression)


def limit_components(data: FaceData, n_shape: int | None = None,
                     n_expression: int | None = None) -> FaceData:
    """``data`` with only its first ``n_shape`` / ``n_expression`` components (None: all)."""
    counts = {}
    for label, count, available in (("n_shape", n_shape, data.n_shape),
                                     ("n_expression", n_expression, data.n_expression)):
        if count is None:
            count = available
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= available:
            raise ValueError(f"{label}={count!r} outside 0..{available}: "
                             f"{data.name or 'the face model'} has {available} such components")
        counts[label] = count
    if (counts["n_shape"], counts["n_expression"]) == (data.n_shape, data.n_expression):
        return data
    s, e = counts["n_shape"], counts["n_expression"]
    return dataclasses.replace(data, shapedirs=data.shapedirs[:, :, :s],
                               exprdirs=data.exprdirs[:, :, :e], shape_names=data.shape_names[:s],
                               expression_names=data.expression_names[:e])
