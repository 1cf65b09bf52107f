"""Contact sheets: rendered frames side by side in one PNG.

Frames are read with Pillow where it is installed (``portrait-rig render`` on render nodes),
else with ``bpy`` (any format Blender writes); they are reduced by an integer box filter and
written with a small PNG encoder (zlib), so nothing beyond one of the two and numpy is needed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

GAP = 4                                  # pixels between frames and around the sheet
BACKGROUND = (24, 24, 24)


def read_frame(path) -> np.ndarray:
    """An image file's pixels as uint8 RGB [H, W, 3], rows top to bottom (stored values,
    no colour management: an sRGB PNG gives its own bytes back)."""
    try:
        from PIL import Image
    except ImportError:
        return _read_with_blender(path)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _read_with_blender(path) -> np.ndarray:
    import bpy
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        channels = image.channels
        buffer = np.empty(width * height * channels, dtype=np.float32)
        image.pixels.foreach_get(buffer)
    finally:
        bpy.data.images.remove(image)
    pixels = buffer.reshape(height, width, channels)[::-1]
    rgb = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def thumbnail(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink by the smallest integer factor that fits ``max_side`` (mean of each block)."""
    factor = max(1, -(-max(rgb.shape[:2]) // max_side))
    height, width = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb[:height * factor, :width * factor].reshape(height, factor, width, factor, 3)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def tile(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Equal-sized uint8 RGB images in a grid, left to right then top to bottom."""
    height, width = images[0].shape[:2]
    rows = -(-len(images) // columns)
    sheet = np.empty((rows * (height + GAP) + GAP, columns * (width + GAP) + GAP, 3), np.uint8)
    sheet[...] = BACKGROUND
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        y, x = GAP + row * (height + GAP), GAP + column * (width + GAP)
        sheet[y:y + height, x:x + width] = image
    return sheet


def write_png(path, rgb: np.ndarray) -> None:
    """uint8 RGB [H, W, 3] -> an 8-bit RGB PNG (filter type Sub on every row)."""
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, width * 3).astype(np.int16)
    sub = np.empty_like(rows)
    sub[:, :3] = rows[:, :3]
    sub[:, 3:] = rows[:, 3:] - rows[:, :-3]
    raw = np.concatenate([np.ones((height, 1), np.uint8), (sub % 256).astype(np.uint8)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
                           + chunk(b"IEND", b""))


def pick(frames: list, count: int) -> list:
    """``count`` items spread evenly over ``frames``, first and last included."""
    if count >= len(frames):
        return list(frames)
    if count == 1:
        return [frames[0]]
    return [frames[round(i * (len(frames) - 1) / (count - 1))] for i in range(count)]


def make_contact_sheet(paths: list, out_path, columns: int = 4,
                       max_side: int = 192) -> np.ndarray:
    """Read the frames at ``paths``, shrink each to at most ``max_side`` pixels, tile them
    ``columns`` wide and write the PNG ``out_path``. Returns the sheet."""
    if not paths:
        raise ValueError("a contact sheet needs at least one frame")
    images = [thumbnail(read_frame(path), max_side) for path in paths]
    sheet = tile(images, min(columns, len(images)))
    write_png(out_path, sheet)
    return sheet
