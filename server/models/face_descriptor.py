"""dlib's face-recognition ResNet in torch: a differentiable 128-d face descriptor.

dlib's ``dlib_face_recognition_resnet_model_v1`` (the network ``face_recognition_model_v1``
runs, from the face-recognition-models package) maps a 150 x 150 face chip to a 128-d
descriptor; two photos of one person lie within about 0.6 of each other. Here it is rebuilt
from the file's weights (``server.checkpoints.dlib_dnn``) so that gradients reach the image:
the identity loss of photo inversion and pivotal tuning.

Architecture (dlib's dnn_face_recognition_ex.cpp, inference form: batch norms folded into
per-channel affine layers):

    (rgb - mean) / 256 -> 7x7 conv stride 2 (32) -> affine -> relu -> 3x3 max pool stride 2
    -> 3 units (32) -> down + 3 units (64) -> down + 2 units (128) -> down + 2 units (256)
    -> down (256) -> mean over space -> linear 256 -> 128 (no bias)

A unit is relu(x + B(x)) with B = conv 3x3 -> affine -> relu -> conv 3x3 -> affine; a "down"
unit's first convolution has stride 2 and no padding, and the shortcut is a 2x2 average pool
of x with stride 2. Where the two summands differ in channels or size (more channels after a
down unit; 3x3 against 4x4 at 8x8 inputs), the smaller one is zero-extended at the end of
each dimension, as dlib's ``add_prev`` does. Padded convolutions pad by 1 with zeros.

Input: RGB float [N, 3, 150, 150] in [0, 255] (``chip`` crops it from an image).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from server.checkpoints.dlib_dnn import DlibFormatError, DlibLayer, read_dlib_network

CHIP_SIZE = 150
CHIP_PADDING = 0.25          # dlib's default padding around the face in the chip
SAME_PERSON = 0.6            # dlib's threshold on the descriptor distance


class _Conv(nn.Module):
    def __init__(self, layer: DlibLayer):
        super().__init__()
        s = layer.settings
        self.stride, self.padding = s["stride_y"], s["pad_y"]
        if (s["stride_x"], s["pad_x"]) != (self.stride, self.padding):
            raise DlibFormatError("unequal horizontal and vertical conv settings")
        self.register_buffer("weight", torch.from_numpy(layer.arrays["weight"]))
        self.register_buffer("bias", torch.from_numpy(layer.arrays["bias"]))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class _Affine(nn.Module):
    def __init__(self, layer: DlibLayer):
        super().__init__()
        self.register_buffer("gamma", torch.from_numpy(layer.arrays["gamma"])[:, None, None])
        self.register_buffer("beta", torch.from_numpy(layer.arrays["beta"])[:, None, None])

    def forward(self, x):
        return x * self.gamma + self.beta


class _Unit(nn.Module):
    def __init__(self, layers: list[DlibLayer], down: bool):
        super().__init__()
        self.down = down
        self.conv1, self.affine1 = _Conv(layers[0]), _Affine(layers[1])
        self.conv2, self.affine2 = _Conv(layers[3]), _Affine(layers[4])

    def forward(self, x):
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
        return F.relu(_add_extended(x, y))


def _add_extended(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, each zero-extended at the end of every dimension to the larger shape."""
    shape = [max(p, q) for p, q in zip(a.shape, b.shape)]

    def extend(t):
        pads = []
        for size, target in zip(reversed(t.shape[1:]), reversed(shape[1:])):
            pads += [0, target - size]
        return F.pad(t, pads) if any(pads) else t
    return extend(a) + extend(b)


# The layer kinds of a plain and of a down-sampling unit, in file order.
_PLAIN = ("con_4", "affine_", "relu_", "con_4", "affine_", "add_prev_", "relu_")
_DOWN = ("con_4", "affine_", "relu_", "con_4", "affine_", "avg_pool_2", "add_prev_", "relu_")
_STEM = ("input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2")


class FaceDescriptorNet(nn.Module):
    """The network of a dlib face-recognition file (see the module notes); every tensor is a
    buffer (no trainable parameters). ``forward``: [N, 3, 150, 150] in [0, 255] -> [N, 128]."""

    def __init__(self, layers: list[DlibLayer]):
        super().__init__()
        kinds = tuple(layer.kind for layer in layers)
        if kinds[: len(_STEM)] != _STEM or kinds[-2:] != ("avg_pool_2", "fc_2"):
            raise DlibFormatError(f"unexpected layer sequence {kinds[:6]} ... {kinds[-3:]}")
        mean = layers[0].arrays["mean"]
        self.register_buffer("mean", torch.from_numpy(mean)[:, None, None])
        self.stem_conv, self.stem_affine = _Conv(layers[1]), _Affine(layers[2])
        pool = layers[4].settings
        self.pool = (pool["rows"], pool["stride_y"])
        units, i = [], len(_STEM)
        while i < len(layers) - 2:
            for pattern in (_PLAIN, _DOWN):
                if kinds[i: i + len(pattern)] == pattern:
                    units.append(_Unit(layers[i: i + len(pattern)], pattern is _DOWN))
                    i += len(pattern)
                    break
            else:
                raise DlibFormatError(f"unexpected layers {kinds[i: i + 8]} at {i}")
        self.units = nn.Sequential(*units)
        self.register_buffer("projection", torch.from_numpy(layers[-1].arrays["weight"]))

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = (rgb - self.mean) / 256.0
        x = F.relu(self.stem_affine(self.stem_conv(x)))
        x = F.max_pool2d(x, self.pool[0], self.pool[1])
        x = self.units(x)
        return x.mean(dim=(2, 3)) @ self.projection


def load_face_descriptor(path=None, device="cpu") -> FaceDescriptorNet:
    """The network of ``path`` (default: the face-recognition-models package's file), in eval
    mode on ``device``."""
    if path is None:
        from server.photo.landmarks import model_file

        path = model_file("dlib_face_recognition_resnet_model_v1.dat")
    return FaceDescriptorNet(read_dlib_network(path)).to(device).eval()


def chip_grid(chip_rect: tuple[float, float, float, float], angle: float, image_size: int,
              size: int = CHIP_SIZE) -> torch.Tensor:
    """``grid_sample`` grid [1, size, size, 2] (align_corners=False) that extracts dlib's face
    chip from a square image of ``image_size`` pixels: the chip spans the rectangle
    (left, top, right, bottom) (pixel centres, dlib's ``chip_details.rect``) rotated by
    ``angle`` radians about its centre, chip pixel (0, 0) at the rotated top-left corner, as
    ``dlib.extract_image_chip`` maps it."""
    left, top, right, bottom = chip_rect
    centre = np.array([(left + right) / 2, (top + bottom) / 2])
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    steps = np.arange(size, dtype=np.float64) / (size - 1)
    u, v = np.meshgrid(left + steps * (right - left), top + steps * (bottom - top))
    points = (np.stack([u, v], -1) - centre) @ rotation.T + centre       # image pixels
    grid = (points + 0.5) / image_size * 2 - 1
    return torch.from_numpy(grid[None].astype(np.float32))
