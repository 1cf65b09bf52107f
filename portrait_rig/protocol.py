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
import math
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
MAX_HELLO_BYTES = 64 << 10          # the only header read before authentication
MAX_HEADER_DEPTH = 32               # nesting of arrays and objects in a header
MAX_INTEGER = 1 << 63               # JSON integers lie in (-2**63, 2**63)

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
E_TOO_MANY_CONNECTIONS = "too_many_connections"   # per-address connection cap reached
E_IDLE_TIMEOUT = "idle_timeout"      # no request for ``limits.idle_timeout`` seconds

# The only client messages that carry a payload: ``fit`` and ``invert`` (a photo's PNG/JPEG
# bytes).
CLIENT_PAYLOAD_TYPES = ("fit", "invert")


class ProtocolError(Exception):
    """A message that breaks the framing rules. ``code`` is one of the E_* codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def frame_reply_bytes(width: int, height: int, fmt: str, passes=()) -> int:
    """Upper bound of a ``frame`` reply's payload: the image (4 bytes per pixel for the
    compressed formats, which stay below that in practice) plus each pass as float32, with
    alignment. What the server's ``max_frame_bytes`` and ``max_batch_bytes`` limits count."""
    channels = FRAME_FORMATS.get(fmt) or 4
    pixels = width * height
    return pixels * channels + 3 * len(passes) + sum(4 * pixels * PASSES[p] for p in passes)


def excerpt(value, limit: int = 64) -> str:
    """``repr(value)`` cut to about ``limit`` characters: for messages that quote what a
    client sent without echoing a megabyte of it."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is not finite")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if not -MAX_INTEGER < value < MAX_INTEGER:
        raise ValueError(f"integer {text[:32]}... outside (-2**63, 2**63)")
    return value


def _not_finite(name: str):
    raise ValueError(f"{name} is not a finite number")


def _depth(value) -> int:
    """Nesting depth of arrays and objects (1 for a flat object), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > MAX_HEADER_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, (dict, list)))
    return deepest


def decode_header(body: bytes, max_payload: int) -> tuple[dict, int]:
    """Parse a header; returns it with the number of payload bytes that follow. Numbers must
    be finite and integers fit in 64 bits; arrays and objects nest at most
    ``MAX_HEADER_DEPTH`` deep."""
    try:
        header = json.loads(body.decode("utf-8"), parse_float=_finite, parse_int=_bounded_int,
                            parse_constant=_not_finite)
    except RecursionError:
        raise ProtocolError(E_BAD_MESSAGE, f"header is nested deeper than "
                            f"{MAX_HEADER_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(E_BAD_MESSAGE, f"header is not UTF-8 JSON: {exc}") from None
    except ValueError as exc:           # from the number hooks above
        raise ProtocolError(E_BAD_MESSAGE, f"header: {exc} (numbers must be finite, "
                            "integers within 64 bits)") from None
    if isinstance(header, (dict, list)) and _depth(header) > MAX_HEADER_DEPTH:
        raise ProtocolError(E_BAD_MESSAGE, f"header is nested deeper than "
                            f"{MAX_HEADER_DEPTH} levels")
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError(E_BAD_MESSAGE, "header must be a JSON object with a string 'type'")
    payload = header.get("payload_bytes", 0)
    if isinstance(payload, bool) or not isinstance(payload, int) or payload < 0:
        raise ProtocolError(E_BAD_MESSAGE, "payload_bytes must be a non-negative integer")
    if payload > max_payload:
        raise ProtocolError(E_TOO_LARGE, f"payload of {payload} bytes exceeds {max_payload}")
    return header, payload
