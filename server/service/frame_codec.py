"""Turn render results into ready-to-send wire messages (runs on the render worker thread).

A message is built in one buffer: the payload is written straight into it (RGBA -> RGB
conversion and float32 passes included, no intermediate copies) after a reserved gap, and the
length-prefixed JSON header is placed at the end of the gap once the payload - and so the total
server time - is known. The event loop then hands a single buffer to the socket.
"""

from __future__ import annotations

import io

import numpy as np

from portrait_rig import protocol

# Room reserved in front of the payload for the length prefix and JSON header. Frame headers
# are a few hundred bytes; a larger one falls back to a separate buffer.
HEADER_ROOM = 4096
PASS_ALIGN = 4            # each pass starts at a multiple of 4 bytes so it can be viewed as float32
DEFAULT_JPEG_QUALITY = 90
PNG_COMPRESS_LEVEL = 1    # PNG is lossless at any level; level 1 is several times faster than 6


class EncodeError(Exception):
    """A backend result that does not match its request (wrong shape, dtype or missing pass)."""


class MessageBuffer:
    """One send buffer: reserved header room followed by ``payload_nbytes`` payload bytes."""

    def __init__(self, payload_nbytes: int):
        # np.empty: no zero fill; every payload byte is written before sending.
        self._buf = np.empty(HEADER_ROOM + payload_nbytes, dtype=np.uint8)
        self.payload = self._buf[HEADER_ROOM:]

    def finish(self, header: dict) -> list[memoryview]:
        """Write the header in front of the payload; returns the buffers to send, in order."""
        prefix = protocol.encode_header(header, self.payload.nbytes)
        if len(prefix) > HEADER_ROOM:
            return [memoryview(prefix), memoryview(self.payload)]
        start = HEADER_ROOM - len(prefix)
        self._buf[start:HEADER_ROOM] = np.frombuffer(prefix, dtype=np.uint8)
        return [memoryview(self._buf[start:])]


def _align(offset: int) -> int:
    return -(-offset // PASS_ALIGN) * PASS_ALIGN


def _check_image(image, width: int, height: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 \
            or image.shape != (height, width, 4):
        got = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise EncodeError(f"backend image is {got}, expected uint8 ({height}, {width}, 4)")
    return image


def _compress(image: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image   # server-only dependency, imported where it is needed

    out = io.BytesIO()
    if fmt == "png":        # PNG keeps the alpha channel (the face mask)
        Image.fromarray(image, "RGBA").save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:                   # JPEG has no alpha
        Image.fromarray(np.ascontiguousarray(image[..., :3]), "RGB").save(
            out, "JPEG", quality=quality)
    return out.getvalue()


def encode_frame(header: dict, image: np.ndarray, passes: dict[str, np.ndarray],
                 pass_names: tuple[str, ...], fmt: str, quality: int = DEFAULT_JPEG_QUALITY,
                 finish_timings=None) -> list[memoryview]:
    """Build a ``frame`` message.

    ``header`` holds the reply fields known in advance (type, id, width, height, format, ...);
    ``image`` is the backend's uint8 [H, W, 4] RGBA, rows top to bottom; ``passes`` maps names
    to float32 [H, W, C]; ``pass_names`` lists those requested, in payload order.
    ``finish_timings()`` (optional) is called just before the header is written and returns
    the ``timings`` dict, so the reported times include the encoding.
    Payload: the frame bytes (raw rows, or the PNG/JPEG file), then each pass as little-endian
    float32 [H, W, C], starting at a multiple of 4 bytes.
    """
    height, width = header["height"], header["width"]
    image = _check_image(image, width, height)
    channels = protocol.FRAME_FORMATS[fmt]
    compressed = None if channels else _compress(image, fmt, quality)
    image_nbytes = width * height * channels if channels else len(compressed)

    entries, offset = [], image_nbytes
    for name in pass_names:
        data = passes.get(name)
        want = (height, width, protocol.PASSES[name])
        if not isinstance(data, np.ndarray) or data.shape != want:
            got = data.shape if isinstance(data, np.ndarray) else "nothing"
            raise EncodeError(f"backend gave {got} for pass {name!r}, expected {want}")
        offset = _align(offset)
        nbytes = data.size * 4
        entries.append({"name": name, "channels": want[2], "dtype": "float32",
                        "offset": offset, "nbytes": nbytes})
        offset += nbytes

    message = MessageBuffer(offset)
    payload = message.payload
    if channels == 4:
        payload[:image_nbytes].reshape(height, width, 4)[...] = image
    elif channels:
        # Channel by channel: ~4x faster than numpy's strided copy of image[..., :3].
        rgb = payload[:image_nbytes].reshape(height, width, 3)
        for c in range(3):
            rgb[..., c] = image[..., c]
    else:
        payload[:image_nbytes] = np.frombuffer(compressed, dtype=np.uint8)
    end = image_nbytes
    for entry in entries:
        start = entry["offset"]
        payload[end:start] = 0                  # alignment padding
        end = start + entry["nbytes"]
        payload[start:end].view("<f4").reshape(height, width, entry["channels"])[...] = \
            passes[entry["name"]]

    header = dict(header, image_bytes=image_nbytes, passes=entries)
    if finish_timings is not None:
        header["timings"] = finish_timings()
    return message.finish(header)


def encode_vertices(header: dict, vertices: np.ndarray) -> list[memoryview]:
    """Build a ``vertices`` message: ``vertices`` is [V, 3], sent as little-endian float32."""
    message = MessageBuffer(vertices.shape[0] * 12)
    message.payload.view("<f4").reshape(-1, 3)[...] = vertices
    return message.finish(dict(header, count=int(vertices.shape[0]), dtype="float32",
                               shape=[int(vertices.shape[0]), 3]))
