"""Write server frames into the Image datablock "Portrait Rig".

Colour: frames are display-referred sRGB bytes. The image is a float image tagged
'Linear Rec.709' and receives the frame decoded to linear light (the exact sRGB transfer
function, through a 256-entry table), so Blender's colour management maps it back to the very
same sRGB values on an sRGB display under the Standard view - which is how the Image Editor
shows images that are not render results. A float image also takes ``foreach_set`` several
times faster than a byte image (no conversion on Blender's side).

Rows: frames come top row first, Blender stores the bottom row first, so rows are flipped.

Layout and speed: the live link asks for ``rgba8`` frames. Four bytes per pixel decode into
Blender's RGBA float layout with one contiguous table lookup (about 2 ms for 512 x 512 here;
three-byte frames need a strided pass that costs several times more). The frame's alpha (the
face mask) is not kept: the image is opaque and shows exactly the frame's RGB.

The image is user data: it stays in the .blend file when the add-on is disabled.
"""

from __future__ import annotations

import bpy
import numpy as np

from ..portrait_rig.colour import srgb_to_linear

IMAGE_NAME = "Portrait Rig"
COLORSPACE = "Linear Rec.709"

_CHANNELS = {"rgb8": 3, "rgba8": 4}


# uint8 sRGB code -> linear float32.
SRGB_TO_LINEAR_LUT = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)


class _Buffers:
    """Per-size scratch arrays so that steady streaming allocates nothing per frame."""
    rgba: np.ndarray | None = None       # float32 [H, W, 4], what Image.pixels receives
    staging: np.ndarray | None = None    # uint8 [H, W, 4], for 3-channel frames


def _scratch(name: str, shape: tuple, dtype, fill=None) -> np.ndarray:
    array = getattr(_Buffers, name)
    if array is None or array.shape != shape:
        array = np.empty(shape, dtype=dtype) if fill is None else np.full(shape, fill, dtype)
        setattr(_Buffers, name, array)
    return array


def frame_to_rgba(pixels, width: int, height: int, channels: int) -> np.ndarray:
    """sRGB bytes [height, width, channels] (channels 3 or 4, rows top to bottom) -> linear
    float32 RGBA [height, width, 4] with rows bottom to top and alpha 1, as ``Image.pixels``
    expects. The returned array is reused by the next call."""
    src = np.frombuffer(pixels, dtype=np.uint8)
    if src.size != width * height * channels:
        raise ValueError(f"frame has {src.size} bytes, expected {width}x{height}x{channels}")
    src = src.reshape(height, width, channels)[::-1]                 # bottom row first
    out = _scratch("rgba", (height, width, 4), np.float32)
    if channels == 3:
        # Interleave into RGBA bytes first; alpha 255 decodes to exactly 1.0.
        staging = _scratch("staging", (height, width, 4), np.uint8, fill=255)
        staging[..., :3] = src
        src = staging
    np.take(SRGB_TO_LINEAR_LUT, src, out=out, mode='clip')    # 'clip': no per-item check
    if channels == 4:
        out[..., 3] = 1.0
    return out


def ensure_image(width: int, height: int, name: str = IMAGE_NAME) -> bpy.types.Image:
    """The image ``name`` ("Portrait Rig") at the given size (created or resized as needed)."""
    image = bpy.data.images.get(name)
    if image is not None and (image.source != 'GENERATED' or not image.is_float):
        # Someone replaced it with a file image or a byte image: start over.
        bpy.data.images.remove(image)
        image = None
    if image is None:
        image = bpy.data.images.new(name, width, height, alpha=True, float_buffer=True)
        image.alpha_mode = 'STRAIGHT'
    elif tuple(image.size) != (width, height):
        image.scale(width, height)
    if image.colorspace_settings.name != COLORSPACE:   # set only on change: it resets pixels
        image.colorspace_settings.name = COLORSPACE
    return image


def write_frame(frame, name: str = IMAGE_NAME) -> bpy.types.Image:
    """Copy a ``portrait_rig.client.Frame`` (rgb8 / rgba8) into the image ``name``."""
    channels = _CHANNELS.get(frame.format)
    if channels is None:
        raise ValueError(f"frame format {frame.format!r} cannot be shown; "
                         f"the live link asks for {', '.join(_CHANNELS)}")
    rgba = frame_to_rgba(frame.pixels, frame.width, frame.height, channels)
    image = ensure_image(frame.width, frame.height, name)
    image.pixels.foreach_set(rgba.ravel())
    image.update()
    return image
