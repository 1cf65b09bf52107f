"""Read the weights of dlib's face-recognition network (``dlib_face_recognition_resnet_model_v1
.dat``, shipped by the face-recognition-models package) without dlib.

dlib serialises a network as nested records: every layer wrapper first writes the network
below it, then its own layer's details, so the layers appear from the input upwards. Integers
are written as a control byte (bit 7: negative, low 4 bits: byte count) followed by that many
little-endian bytes; strings as an integer length and the bytes; floats as an integer mantissa
and an integer exponent (value = m * 2^e); tensors as version 2, four integer dimensions
(samples, k, rows, columns) and the values as little-endian float32.

The layers read (each starts with its type name): ``input_rgb_image_sized`` (mean R, G, B as
floats, then rows and columns), ``con_4`` (params: the filters [out, in, rows, cols] then the
biases [out]; out, rows, columns, strides y/x, paddings y/x), ``affine_`` (params: gamma [k]
then beta [k]), ``relu_``, ``max_pool_2`` / ``avg_pool_2`` (rows, columns, strides, paddings;
rows 0 = over everything), ``add_prev_`` and ``fc_2`` (outputs, inputs, params [in, out]).
Everything else (bookkeeping between the layers) is skipped, and nothing in the file is
executed: it is parsed as data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LAYER_NAMES = ("input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2",
               "avg_pool_2", "add_prev_", "fc_2")
_LAYER = re.compile(b"\x01[\x04-\x15](" + b"|".join(re.escape(n.encode()) for n in LAYER_NAMES)
                    + b")")


class DlibFormatError(ValueError):
    """Not a dlib network file of the expected layout."""


@dataclass
class DlibLayer:
    """One layer: ``kind`` (its dlib name), integer ``settings`` and float32 ``arrays``."""
    kind: str
    settings: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position

    def integer(self) -> int:
        control = self.data[self.position]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.position + 1: self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if control & 0x80 else value

    def string(self) -> str:
        size = self.integer()
        text = self.data[self.position: self.position + size].decode("latin-1")
        self.position += size
        return text

    def real(self) -> float:
        mantissa = self.integer()
        return mantissa * 2.0 ** self.integer()

    def tensor(self) -> np.ndarray:
        if self.integer() != 2:
            raise DlibFormatError(f"unknown tensor version at byte {self.position}")
        shape = [self.integer() for _ in range(4)]
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, "<f4", count, self.position).astype(np.float32)
        self.position += 4 * count
        return values.reshape(shape)

    def alias(self) -> list[int]:
        if self.integer() != 1:
            raise DlibFormatError(f"unknown alias-tensor version at byte {self.position}")
        return [self.integer() for _ in range(4)]


def read_dlib_network(path: str | Path) -> list[DlibLayer]:
    """The layers of a dlib network file, input first."""
    data = Path(path).read_bytes()
    layers, position = [], 0
    while (match := _LAYER.search(data, position)) is not None:
        reader = _Reader(data, match.start())
        kind = reader.string()
        layer = DlibLayer(kind)
        try:
            _read_details(reader, layer)
        except (IndexError, ValueError) as exc:
            raise DlibFormatError(f"{path}: cannot read the {kind} layer at byte "
                                  f"{match.start()}: {exc}") from None
        layers.append(layer)
        position = reader.position
    if not layers or layers[0].kind != "input_rgb_image_sized":
        raise DlibFormatError(f"{path}: not a dlib image network (no input_rgb_image_sized)")
    return layers


def _read_details(reader: _Reader, layer: DlibLayer) -> None:
    s, kind = layer.settings, layer.kind
    if kind == "input_rgb_image_sized":
        layer.arrays["mean"] = np.array([reader.real() for _ in range(3)], np.float32)
        s["rows"], s["cols"] = reader.integer(), reader.integer()
    elif kind == "con_4":
        params = reader.tensor().reshape(-1)
        keys = ("filters", "rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
        s.update(zip(keys, (reader.integer() for _ in keys)))
        shape = reader.alias()
        count = int(np.prod(shape))
        if params.size != count + s["filters"] or shape[0] != s["filters"]:
            raise DlibFormatError(f"con_4 params of {params.size} values for filters {shape}")
        layer.arrays["weight"] = params[:count].reshape(shape)
        layer.arrays["bias"] = params[count:]
    elif kind == "affine_":
        params = reader.tensor().reshape(-1)
        half = params.size // 2
        layer.arrays["gamma"], layer.arrays["beta"] = params[:half], params[half:]
    elif kind in ("max_pool_2", "avg_pool_2"):
        keys = ("rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
        s.update(zip(keys, (reader.integer() for _ in keys)))
    elif kind == "fc_2":
        s["outputs"], s["inputs"] = reader.integer(), reader.integer()
        params = reader.tensor()
        if params.size < s["inputs"] * s["outputs"]:
            raise DlibFormatError("fc_2 params smaller than inputs x outputs")
        layer.arrays["weight"] = params.reshape(-1)[: s["inputs"] * s["outputs"]].reshape(
            s["inputs"], s["outputs"])
