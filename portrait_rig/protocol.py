"""Wire protocol v1: framing, limits and message vocabulary (stdlib only).

See docs/protocol.md for the full specification. A message on the wire is

    [4-byte big-endian N] [N bytes of UTF-8 JSON header] [header["payload_bytes"] raw bytes]

The header is a JSON object with a ``type``; ``payload_bytes`` is present (and > 0) only when
raw bytes follow. This module holds what both sides share: the constants and the pure
encode/decode of one frame's header. Socket handling lives in ``portrait_rig/client.py``
(blocking, stdlib) and ``server/service/connection.py`` (asyncio).
"""

from __future__ import annotations

import json
import struct

PROTOCOL_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7865

LENGTH = struct.Struct(">I")

# Limits. Headers carry parameters (a few KiB); payloads from clients are small; payloads
# from the server carry frames, passes and the face model (FLAME's arrays are ~30 MiB).
MAX_HEADER_BYTES = 1 << 20
MAX_CLIENT_PAYLOAD = 32 << 20
MAX_SERVER_PAYLOAD = 1 << 30
MAX_FRAME_SIDE = 4096

# Frame formats and their channel counts (None: compressed, size in payload_bytes).
FRAME_FORMATS = {"rgb8": 3, "rgba8": 4, "png": None, "jpeg": None}

# Extra passes a render may ask for: name -> channels. Sent as float32, little-endian,
# rows top to bottom, after the frame in the same payload.
PASSES = {"normal": 3, "albedo": 3, "shading": 3, "rendered": 3, "mask": 1, "depth": 1}

# Request modes: "live" requests are latest-wins per connection, "batch" requests are queued.
MODES = ("live", "batch")

# A shot request carries at most this many neighbouring frames on each side (docs/protocol.md
# "Shots"): the add-on sends that many, the server smooths over them.
SHOT_RADIUS = 2

# Texture directions a ``texture`` request asks for by default: DECA's tex code has 50.
TEXTURE_COMPONENTS = 50

# Error codes sent in ``error`` messages.
E_BAD_MESSAGE = "bad_message"        # framing or JSON broken, unknown type, missing fields
E_BAD_PARAMS = "bad_params"          # rig parameters rejected (message names the field)
E_UNKNOWN_BACKEND = "unknown_backend"
E_UNAUTHORIZED = "unauthorized"      # hello missing or token wrong
E_VERSION = "unsupported_version"
E_TOO_LARGE = "too_large"            # header, payload or frame size over the limits
E_RATE_LIMITED = "rate_limited"
E_QUEUE_FULL = "queue_full"          # too many batch requests waiting on this connection
E_RENDER_FAILED = "render_failed"    # the backend raised; the server keeps serving
E_BACKEND_UNAVAILABLE = "backend_unavailable"  # its files or options are missing or wrong
E_SHUTTING_DOWN = "shutting_down"
E_INTERNAL = "internal_error"        # the server failed handling the request; it keeps serving
E_NO_FACE = "no_face"                # fit: no face found in the photo
E_FIT_FAILED = "fit_failed"          # fit: the server cannot fit (fitting files or dlib missing)
E_INVERT_FAILED = "invert_failed"    # invert: the server cannot invert (generator or encoder)

# The only client messages that carry a payload: ``fit`` and ``invert`` (a photo's PNG/JPEG
# bytes).
CLIENT_PAYLOAD_TYPES = ("fit", "invert")


class ProtocolError(Exception):
    """A message that breaks the framing rules. ``code`` is one of the E_* codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode_header(header: dict, payload_bytes: int = 0) -> bytes:
    """Length prefix + JSON header. Adds ``payload_bytes`` when a payload follows."""
    if payload_bytes:
        header = dict(header, payload_bytes=payload_bytes)
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(body) > MAX_HEADER_BYTES:
        raise ProtocolError(E_TOO_LARGE, f"header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    return LENGTH.pack(len(body)) + body


def header_length(prefix: bytes) -> int:
    """Decode and check the 4-byte length prefix."""
    (length,) = LENGTH.unpack(prefix)
    if length == 0 or length > MAX_HEADER_BYTES:
        raise ProtocolError(E_TOO_LARGE if length else E_BAD_MESSAGE,
                            f"header length {length} outside 1..{MAX_HEADER_BYTES}")
    return length


def decode_header(body: bytes, max_payload: int) -> tuple[dict, int]:
    """Parse a header; returns it with the number of payload bytes that follow."""
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(E_BAD_MESSAGE, f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError(E_BAD_MESSAGE, "header must be a JSON object with a string 'type'")
    payload = header.get("payload_bytes", 0)
    if isinstance(payload, bool) or not isinstance(payload, int) or payload < 0:
        raise ProtocolError(E_BAD_MESSAGE, "payload_bytes must be a non-negative integer")
    if payload > max_payload:
        raise ProtocolError(E_TOO_LARGE, f"payload of {payload} bytes exceeds {max_payload}")
    return header, payload
