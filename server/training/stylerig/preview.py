"""Preview grids written as PNG: rows of equally sized RGB tiles, plus drawing helpers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

MIN_TILE = 128          # small training renders are enlarged (nearest) to stay readable


def to_uint8(image) -> np.ndarray:
    """[H, W, 3] float in [0, 1] (tensor or array) or uint8 -> uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def overlay(photo, rendered, mask, alpha: float = 0.7) -> np.ndarray:
    """The render composited over the photo where ``mask`` [H, W] is set."""
    photo = to_uint8(photo).astype(np.float32)
    rendered = to_uint8(rendered).astype(np.float32)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask,
                   dtype=np.float32).reshape(*photo.shape[:2], 1) * alpha
    return np.round(photo * (1 - m) + rendered * m).astype(np.uint8)


def with_points(image, point_sets, size: int | None = None) -> np.ndarray:
    """``image`` enlarged to ``size`` with each (points [N, 2] in the image's pixels, dlib
    convention, RGB colour) drawn as dots."""
    image = to_uint8(image)
    size = size or max(MIN_TILE, image.shape[0])
    scale = size / image.shape[0]
    canvas = Image.fromarray(image).resize((size, size), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    radius = max(1.0, size / 160)
    for points, colour in point_sets:
        for x, y in np.asarray(points, dtype=np.float64):
            cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    return np.asarray(canvas)


def save_grid(rows: list[list[np.ndarray]], path) -> None:
    """Write rows of tiles (uint8 or [0, 1] float [H, W, 3]) as one PNG; tiles are resized
    (nearest) to the largest tile size, at least ``MIN_TILE``."""
    tiles = [[to_uint8(t) for t in row] for row in rows]
    size = max([MIN_TILE] + [t.shape[0] for row in tiles for t in row])
    width = max(len(row) for row in tiles)
    grid = Image.new("RGB", (width * size, len(tiles) * size), (32, 32, 32))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST),
                       (c * size, r * size))
    grid.save(path)
