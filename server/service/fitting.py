"""The server's ``fit`` request: a photo in, the rig's parameters out (docs/protocol.md).

One ``FitService`` per server. The fitter (face detector, landmark embedding, DECA's encoder
when configured) is built on the first request, on the CPU, apart from the render worker, and
serves one photo at a time: fitting is seconds of CPU work that must not stall rendering.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from portrait_rig import protocol
from server import paths

MAX_PHOTO_PIXELS = 40_000_000      # larger photos are refused before decoding


class FitError(Exception):
    """A fit the server refuses; ``code`` is a protocol E_* code, ``field`` the offending
    request field or None."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.field = code, field


def default_deca_model() -> Path | None:
    """``server.paths.deca_model()`` when it exists."""
    path = paths.deca_model()
    return path if path.is_file() else None


def default_embedding() -> Path | None:
    """``server.paths.landmark_embedding()`` when it exists."""
    path = paths.landmark_embedding()
    return path if path.is_file() else None


def read_photo(photo: bytes):
    """RGB uint8 [H, W, 3] of a request's photo bytes, upright (EXIF); raises ``FitError``
    (``bad_message``, ``too_large``) before decoding anything too large."""
    from PIL import Image

    from server.photo import decode_photo

    try:
        with Image.open(io.BytesIO(photo)) as probe:
            width, height = probe.size
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify
        raise FitError(protocol.E_BAD_MESSAGE, "payload: not an image Pillow can read "
                       "(send PNG or JPEG bytes)", "payload") from None
    if width * height > MAX_PHOTO_PIXELS:
        raise FitError(protocol.E_TOO_LARGE, f"payload: a {width}x{height} photo exceeds "
                       f"{MAX_PHOTO_PIXELS} pixels", "payload")
    try:
        return decode_photo(photo)
    except ValueError as exc:
        raise FitError(protocol.E_BAD_MESSAGE, str(exc), "payload") from None


class FitService:
    """Fits photos to ``face_data`` (a ``FaceData``). ``deca_model`` and ``embedding``: files
    (None: the defaults above, used when present and the face model is FLAME); ``texture``:
    the texture space as the ``diffusionrig`` backend's option names it ("auto", "none" or
    a file), whose code the optimisation fits."""

    def __init__(self, face_data, deca_model=None, embedding=None, texture: str = "auto"):
        self.face_data = face_data
        self.deca_model, self.embedding, self.texture = deca_model, embedding, texture
        self._fitter = None
        self._lock = threading.Lock()

    def _get_fitter(self):
        if self._fitter is None:
            from server.renderer.face_model import FaceModel
            from server.renderer.texture import choose_texture
            from server.photo import FLAME_VERTICES, PhotoFitter

            flame = self.face_data.n_vertices == FLAME_VERTICES
            deca = self.deca_model or (default_deca_model() if flame else None)
            embedding = self.embedding or (default_embedding() if flame else None)
            texture = choose_texture(self.texture, self.face_data.n_faces)   # ValueError
            self._fitter = PhotoFitter(FaceModel(self.face_data, "cpu"), deca_model=deca,
                                       embedding=embedding, texture=texture)
        return self._fitter

    def fit(self, photo: bytes) -> dict:
        """The ``fit`` reply's fields for ``photo`` (encoded image bytes). Blocking; raises
        ``FitError``."""
        from server.photo import FaceModelsMissing, NoFaceFound

        started = time.perf_counter()
        rgb = read_photo(photo)
        with self._lock:
            try:
                fit = self._get_fitter().fit(rgb)
            except NoFaceFound as exc:
                raise FitError(protocol.E_NO_FACE, str(exc)) from None
            except (FaceModelsMissing, FileNotFoundError, ValueError) as exc:
                raise FitError(protocol.E_FIT_FAILED, str(exc)) from None
        result = fit.result
        return {"params": result.params.to_dict(), "method": result.method,
                "landmark_error": round(result.landmark_error, 4),
                "albedo_gain": [round(float(g), 6) for g in result.albedo_gain],
                "aligned_size": int(fit.aligned.shape[0]),
                "face_box": [float(v) for v in fit.face.box],
                "landmarks": [[round(float(x), 3), round(float(y), 3)]
                              for x, y in fit.face.landmarks],
                "photo_size": [int(rgb.shape[1]), int(rgb.shape[0])],
                "ms": round((time.perf_counter() - started) * 1e3, 1)}
