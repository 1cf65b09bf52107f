"""The server's texture space as clients see it: what the ``texture`` message carries
(docs/protocol.md) and the albedo map of a texture code, so the Blender add-on can show the
albedo the ``diffusionrig`` backend conditions on.

Arrays (little-endian, C order):

    mean        [S, S, 3]     float32   RGB code values / 255 (display-referred), row 0 at
                                        the top of the texture image (v = 1)
    directions  [S, S, 3, K]  float16   the first K directions, same units
    face_uv     [F, 3, 2]     float32   (u, v) of each triangle corner of the face model,
                                        v up (Blender's UV convention)

The albedo map of a texture code c (``appearance.texture``) is mean + directions @ c, the map
the backend samples per pixel (S = 256, DECA's UV size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPEC = {"mean": ("float32", 3), "directions": ("float16", 4), "face_uv": ("float32", 3)}


class TextureSpaceError(ValueError):
    """A ``texture`` reply whose arrays are missing or malformed."""


@dataclass
class TextureSpace:
    """See the module notes for the arrays' layouts. ``source`` names the file."""
    mean: np.ndarray
    directions: np.ndarray
    face_uv: np.ndarray
    source: str = ""

    def __post_init__(self):
        for name, (dtype, ndim) in SPEC.items():
            value = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            if value.ndim != ndim:
                raise TextureSpaceError(f"{name}: expected {ndim} dimensions, got {value.shape}")
            setattr(self, name, value)
        size = self.mean.shape[0]
        if self.mean.shape != (size, size, 3) or self.directions.shape[:3] != self.mean.shape:
            raise TextureSpaceError(f"mean {self.mean.shape} and directions "
                                    f"{self.directions.shape} are not [S, S, 3(, K)]")
        if self.face_uv.shape[1:] != (3, 2):
            raise TextureSpaceError(f"face_uv: expected [F, 3, 2], got {self.face_uv.shape}")
        self._flat = None

    @property
    def size(self) -> int:
        return self.mean.shape[0]

    @property
    def components(self) -> int:
        return self.directions.shape[3]

    def albedo(self, code) -> np.ndarray:
        """The albedo map [S, S, 3] float32 of texture code ``code`` (its first ``components``
        values; missing ones count as zero)."""
        code = np.asarray(code, dtype=np.float32).reshape(-1)[: self.components]
        if not code.size or not code.any():
            return self.mean.copy()
        if self._flat is None:                          # float32 once: float16 has no BLAS
            self._flat = self.directions.reshape(-1, self.components).astype(np.float32)
        offset = self._flat[:, : code.size] @ code
        return self.mean + offset.reshape(self.mean.shape)

    # ------------------------------------------------------------------ wire
    def to_wire(self) -> tuple[dict, list[memoryview]]:
        """Header fields and payload buffers of the ``texture`` reply."""
        entries, buffers, offset = [], [], 0
        for name in SPEC:
            value = getattr(self, name)
            data = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            entries.append({"name": name, "dtype": SPEC[name][0], "shape": list(value.shape),
                            "offset": offset, "nbytes": data.nbytes})
            buffers.append(memoryview(data).cast("B"))
            offset += data.nbytes
        return {"size": self.size, "components": self.components, "source": self.source,
                "arrays": entries}, buffers

    @classmethod
    def from_wire(cls, header: dict, payload) -> "TextureSpace | None":
        """The space of a ``texture`` reply, or None when the server has none."""
        if not header.get("components") and not header.get("arrays"):
            return None
        payload = memoryview(payload).cast("B")
        arrays = {}
        for entry in header.get("arrays", []):
            name = entry.get("name")
            if name not in SPEC or entry.get("dtype") != SPEC[name][0]:
                raise TextureSpaceError(f"unexpected array {name!r} of dtype "
                                        f"{entry.get('dtype')!r}")
            dtype = np.dtype(SPEC[name][0]).newbyteorder("<")
            try:
                shape = tuple(int(n) for n in entry["shape"])
                offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
            except (KeyError, TypeError, ValueError):
                raise TextureSpaceError(f"array {name} has a malformed entry") from None
            if (min(shape, default=0) < 0 or offset < 0 or offset + nbytes > len(payload)
                    or nbytes != int(np.prod(shape)) * dtype.itemsize):
                raise TextureSpaceError(f"array {name} does not fit the payload")
            arrays[name] = np.frombuffer(payload[offset: offset + nbytes], dtype).reshape(shape)
        missing = sorted(set(SPEC) - set(arrays))
        if missing:
            raise TextureSpaceError(f"texture reply lacks {', '.join(missing)}")
        return cls(**arrays, source=str(header.get("source", "")))
