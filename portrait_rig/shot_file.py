"""Shot files: a sequence's render requests on disk, rendered later without Blender.

The add-on's *Export Shot* writes one (``blender_rig/shot_export.py``); ``portrait-rig render``
renders it on a server or a cluster (``portrait_rig_cli/render.py``). The format is JSON,
specified in docs/rendering.md ("Shot files") and versioned by ``version``::

    {"format": "portrait-rig-shot", "version": 1,
     "scene": "Scene", "width": 512, "height": 512, "fps": 24.0,
     "backend": "preview",              # null: the server's default backend
     "image": "rgb8",                   # "rgba8" for a transparent film (alpha = face coverage)
     "passes": ["normal", "mask"],      # extra passes, names of portrait_rig.protocol.PASSES
     "seed": 0, "smooth": false,        # shot noise seed, latent smoothing
     "frames": [{"frame": 1, "shot": "Scene/Camera", "params": {...RigParams...}}, ...]}

Frames are in render order with increasing numbers; ``shot`` is the shot id of each frame (a
camera cut starts a new shot). Appearance (seed, truncation, reference photo, personal model)
is part of each frame's ``params``. Standard library only: Blender imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .files import write_atomic
from .params import ParamError, RigParams
from .protocol import MAX_FRAME_SIDE, PASSES, SHOT_RADIUS

FORMAT = "portrait-rig-shot"
VERSION = 1
IMAGE_FORMATS = ("rgb8", "rgba8")
MAX_SEED = 2**32


class ShotFileError(ValueError):
    """A shot file that cannot be rendered; ``field`` names the offending entry
    (``frames[3].params.pose.jaw``)."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


@dataclass
class ShotFrame:
    frame: int
    shot: str                     # shot id: "<scene>/<camera>"
    params: RigParams


@dataclass
class ShotFile:
    width: int
    height: int
    frames: list[ShotFrame]
    scene: str = ""
    fps: float = 24.0
    backend: str | None = None
    image: str = "rgb8"
    passes: tuple[str, ...] = ()
    seed: int = 0
    smooth: bool = False
    version: int = field(default=VERSION)

    # ------------------------------------------------------------------ requests
    def window(self, index: int) -> list[int]:
        """Indices of the frames that smooth frame ``index``: up to SHOT_RADIUS either side
        in render order, of the same shot (the add-on's rule, docs/protocol.md "Shots")."""
        lo, hi = max(index - SHOT_RADIUS, 0), min(index + SHOT_RADIUS + 1, len(self.frames))
        shot = self.frames[index].shot
        return [i for i in range(lo, hi) if i != index and self.frames[i].shot == shot]

    def shot_request(self, index: int) -> dict:
        """The ``shot`` object of frame ``index``'s render request."""
        entry = self.frames[index]
        shot = {"id": entry.shot, "seed": self.seed, "frame": entry.frame,
                "smooth": self.smooth}
        if self.smooth:
            shot["neighbors"] = [{"frame": self.frames[i].frame,
                                  "params": self.frames[i].params.to_dict()}
                                 for i in self.window(index)]
        return shot

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "scene": self.scene,
                "width": self.width, "height": self.height, "fps": self.fps,
                "backend": self.backend, "image": self.image, "passes": list(self.passes),
                "seed": self.seed, "smooth": self.smooth,
                "frames": [{"frame": f.frame, "shot": f.shot, "params": f.params.to_dict()}
                           for f in self.frames]}

    @classmethod
    def from_dict(cls, data) -> "ShotFile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ShotFileError("format", f"not a Portrait Rig shot file (expected "
                                f"\"format\": \"{FORMAT}\")")
        version = data.get("version")
        if version != VERSION:
            raise ShotFileError("version", f"shot file version {version!r}; this Portrait Rig "
                                f"reads version {VERSION} (export the shot again)")
        width, height = (_integer(data, name, 1, MAX_FRAME_SIDE) for name in ("width", "height"))
        fps = data.get("fps", 24.0)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
            raise ShotFileError("fps", "expected a frame rate in (0, 1000]")
        backend = data.get("backend")
        if backend is not None and (not isinstance(backend, str) or not backend):
            raise ShotFileError("backend", "expected a backend name or null")
        image = data.get("image", "rgb8")
        if image not in IMAGE_FORMATS:
            raise ShotFileError("image", f"expected one of {', '.join(IMAGE_FORMATS)}")
        passes = data.get("passes", [])
        if not isinstance(passes, list) or any(p not in PASSES for p in passes) \
                or len(set(passes)) != len(passes):
            raise ShotFileError("passes", f"expected distinct names among {', '.join(PASSES)}")
        seed = _integer(data, "seed", 0, MAX_SEED - 1, default=0)
        smooth = data.get("smooth", False)
        if not isinstance(smooth, bool):
            raise ShotFileError("smooth", "expected true or false")
        frames = data.get("frames")
        if not isinstance(frames, list) or not frames:
            raise ShotFileError("frames", "expected a non-empty list of frames")
        parsed, last = [], None
        for i, entry in enumerate(frames):
            where = f"frames[{i}]"
            if not isinstance(entry, dict):
                raise ShotFileError(where, "expected an object {frame, shot, params}")
            number = _integer(entry, "frame", -MAX_SEED, MAX_SEED, where=where)
            if last is not None and number <= last:
                raise ShotFileError(f"{where}.frame", f"frame {number} after frame {last}: "
                                    "frames must be in increasing order")
            shot = entry.get("shot")
            if not isinstance(shot, str) or not 0 < len(shot) <= 128:
                raise ShotFileError(f"{where}.shot", "expected a shot id of 1..128 characters")
            try:
                params = RigParams.from_dict(entry.get("params"))
            except ParamError as exc:
                raise ShotFileError(f"{where}.params.{exc.field}",
                                    str(exc).partition(": ")[2]) from None
            parsed.append(ShotFrame(number, shot, params))
            last = number
        return cls(width, height, parsed, scene=str(data.get("scene", "")), fps=float(fps),
                   backend=backend, image=image, passes=tuple(passes), seed=seed,
                   smooth=smooth)

    def save(self, path) -> None:
        """Write atomically: a reader never sees half a file."""
        write_atomic(path, json.dumps(self.to_dict(), separators=(",", ":")).encode())

    @classmethod
    def load(cls, path) -> "ShotFile":
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except ValueError as exc:
            raise ShotFileError("file", f"{path} is not JSON: {exc}") from None
        return cls.from_dict(data)


def _integer(data: dict, name: str, lo: int, hi: int, default=None, where: str = "") -> int:
    value = data.get(name, default)
    path = f"{where}.{name}" if where else name
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ShotFileError(path, f"expected an integer in {lo}..{hi}, got {value!r}")
    return value
