"""The server's ``invert`` and ``identities`` requests (docs/protocol.md, "Identities").

``invert``: a photo in, a named identity out - the W+ latent of the stylerig backend's
generator that reconstructs the photo (``server.inversion``), stored in the data folder's
``identities/<name>/`` and rendered by ``appearance.identity = <name>``. Like ``fit`` it runs
on a thread apart from the render worker, one photo at a time, with its own copy of the
generator (StyleGAN3's input transform is a buffer; the render worker's copy is never
touched). The photo encoder (``stylegan/encoder.pt``) and the LPIPS weights (``lpips/``) are
used when present. ``identities``: the identities, edit directions and personal models the
server has.
"""

from __future__ import annotations

import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from portrait_rig import protocol
from server import paths
from server.service.fitting import FitError, read_photo
from server.service.jobs import RequestError, request_id

PREVIEW_FORMATS = ("rgb8", "png", "jpeg")
MAX_PREVIEWS = 25                # per request: previews are spread over the steps
PREVIEW_SIZE = 256


@dataclass
class InvertRequest:
    id: object
    name: str
    method: str = "auto"
    steps: int | None = None
    space: str = "auto"
    seed: int = 0
    previews: bool = False
    format: str = "png"


def parse_invert(header: dict) -> InvertRequest:
    """Validate an ``invert`` header; raises ``RequestError`` naming the field."""
    from server.inversion.invert import MAX_STEPS, METHODS
    from server.inversion.optimise import SPACES

    rid = request_id(header)
    try:
        name = paths.check_name(header.get("name"), "identity")
    except ValueError as exc:
        raise RequestError(protocol.E_BAD_MESSAGE, f"name: {exc}", "name") from None
    request = InvertRequest(rid, name)
    for key, options in (("method", METHODS), ("space", SPACES), ("format", PREVIEW_FORMATS)):
        value = header.get(key, getattr(request, key))
        if value not in options:
            raise RequestError(protocol.E_BAD_MESSAGE,
                               f"{key}: expected one of {', '.join(options)}, got {value!r}", key)
        setattr(request, key, value)
    for key, low, high in (("steps", 0, MAX_STEPS), ("seed", 0, 2 ** 32 - 1)):
        value = header.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RequestError(protocol.E_BAD_MESSAGE,
                               f"{key}: expected an integer in {low}..{high}", key)
        setattr(request, key, value)
    previews = header.get("previews", False)
    if not isinstance(previews, bool):
        raise RequestError(protocol.E_BAD_MESSAGE, "previews: expected true or false", "previews")
    request.previews = previews
    return request


class InvertService:
    """Inverts photos into the generator of the stylerig backend's options
    (``backend_options`` as the server was started with) on ``device``."""

    def __init__(self, backend_options: dict | None = None, device: str = "cpu"):
        self.options = dict((backend_options or {}).get("stylerig", {}))
        self.device = device
        self._inverter = None
        self._lock = threading.Lock()

    def generator_path(self) -> Path:
        option = self.options.get("generator")
        return Path(option).expanduser() if option else paths.stylegan_generator()

    def _get_inverter(self):
        if self._inverter is None:
            from server.checkpoints.encoders import EncoderCheckpointError, load_encoder
            from server.checkpoints.stylegan import load_generator
            from server.inversion.invert import PhotoInverter
            from server.models.lpips import load_lpips

            from server.backends.check import check_file

            problem = check_file(paths.stylerig_files({
                "generator": self.options.get("generator"), "rignet": "none"})[0]).problem
            if problem:
                raise FitError(protocol.E_INVERT_FAILED, problem)
            try:
                G = load_generator(self.generator_path(), self.device)
            except (ValueError, KeyError, OSError, pickle.UnpicklingError) as exc:
                raise FitError(protocol.E_INVERT_FAILED, f"{self.generator_path()}: {exc}") \
                    from None
            try:                                  # these errors name their own files
                encoder = None
                if paths.stylegan_encoder().is_file():
                    encoder = load_encoder(paths.stylegan_encoder(), self.device)
                lpips_files = paths.lpips_files()
                lpips = load_lpips(*lpips_files, device=self.device) if lpips_files else None
                self._inverter = PhotoInverter(G, encoder, lpips)
            except (EncoderCheckpointError, ValueError, OSError) as exc:
                raise FitError(protocol.E_INVERT_FAILED, str(exc)) from None
        return self._inverter

    def invert(self, request: InvertRequest, photo: bytes, on_preview=None,
               should_stop=None) -> dict:
        """The ``invert`` reply's fields (blocking). ``on_preview(header, image)`` gets the
        preview header fields and RGBA uint8 [256, 256, 4]; ``should_stop()`` ends the
        inversion early. Raises ``FitError``."""
        from server.inversion.identities import save_identity
        from server.inversion.invert import InversionError, to_uint8
        from server.inversion.optimise import InversionCancelled
        from server.photo import FaceModelsMissing, NoFaceFound

        started = time.perf_counter()
        rgb = read_photo(photo)
        with self._lock:
            inverter = self._get_inverter()

            def progress(step, steps, values, image):
                every = max(1, steps // MAX_PREVIEWS)
                if on_preview is None or not request.previews or step + 1 >= steps or \
                        (step + 1) % every:
                    return
                rgba = np.full((PREVIEW_SIZE, PREVIEW_SIZE, 4), 255, np.uint8)
                rgba[..., :3] = to_uint8(image)
                on_preview({"step": step + 1, "steps": steps,
                            "losses": {k: round(v, 5) for k, v in values.items()
                                       if np.isfinite(v)}}, rgba)

            try:
                result = inverter.invert(rgb, request.method, request.steps, request.space,
                                         request.seed, on_progress=progress,
                                         should_stop=should_stop)
            except NoFaceFound as exc:
                raise FitError(protocol.E_NO_FACE, str(exc)) from None
            except InversionCancelled as exc:
                raise FitError(protocol.E_INVERT_FAILED, str(exc)) from None
            except InversionError as exc:
                code = protocol.E_BAD_MESSAGE if exc.field else protocol.E_INVERT_FAILED
                raise FitError(code, str(exc), exc.field) from None
            except (FaceModelsMissing, FileNotFoundError, ValueError) as exc:
                raise FitError(protocol.E_INVERT_FAILED, str(exc)) from None
            record = result.record(self.generator_path().name)
            save_identity(request.name, result.ws, record, result.sheet())
        return {"name": request.name, "method": result.method, "steps": result.steps,
                "iterations": result.iterations, "roll": round(result.frame.roll, 6),
                "shift": [round(v, 6) for v in result.frame.shift],
                "metrics": result.metrics, "num_ws": int(result.ws.shape[0]),
                "w_dim": int(result.ws.shape[1]), "generator": record["generator"],
                "aligned_size": PREVIEW_SIZE,
                "face_box": [float(v) for v in result.detection.box],
                "photo_size": list(result.photo_size),
                "ms": round((time.perf_counter() - started) * 1e3, 1)}

    def listing(self) -> dict:
        """The ``identities`` reply's fields: identities, edit directions, personal models."""
        from server.backends.directions import direction_name
        from server.inversion.identities import list_identities

        identities = [{k: record.get(k) for k in ("name", "method", "generator", "roll",
                                                   "shift", "metrics", "created")}
                      for record in list_identities()]
        folder = paths.directions_dir()
        edits = sorted(direction_name(p) for p in folder.glob("*.npy")) \
            if folder.is_dir() else []
        personal = []
        root = paths.personal_dir()
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            kinds = [kind for kind, file in (("stylegan", "generator.safetensors"),
                                             ("diffusionrig", "model.pt"),
                                             ("diffusionrig", "model.safetensors"))
                     if (entry / file).is_file()]
            if kinds:
                personal.append({"name": entry.name, "backends": sorted(set(kinds))})
        return {"identities": identities, "edits": edits, "personal_models": personal}
