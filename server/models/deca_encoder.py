"""DECA's coarse encoder (Feng et al. 2021, yfeng95/DECA) as a module: a face crop to FLAME codes.

DECA's ``ResnetEncoder`` (``E_flame`` of ``deca_model.tar``, read by
``server.checkpoints.deca``):

    encoder.*   a ResNet-50 trunk (torchvision layout: ``conv1``, ``bn1``, ``layer1..4`` of
                Bottleneck blocks with ``conv1..3``/``bn1..3`` and ``downsample.{0,1}``; no
                ``fc``), 7x7 average pool -> 2048 features
    layers.0    Linear(2048, 1024), then ReLU
    layers.2    Linear(1024, 236)

The 236 outputs are, in order, shape 100, tex 50, exp 50, pose 6 (global axis-angle 3 + jaw
axis-angle 3), cam 3 (s, tx, ty) and light 27 (reshaped [9, 3]): ``CODE_SIZES``, the one
definition of DECA's code sizes (DiffusionRig's buffers, RigNet's and DFR's controls and photo
fitting all cut FLAME's components there).
"""


from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CROP_SIZE = 224
CODE_SIZES = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
N_CODES = sum(CODE_SIZES.values())      # 236
N_SHAPE = CODE_SIZES["shape"]           # the first 100 of FLAME's 300 identity components
N_TEXTURE = CODE_SIZES["tex"]           # the first 50 of FLAME's 200 texture components
N_EXPRESSION = CODE_SIZES["exp"]        # the first 50 of FLAME's 100 expression components


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), each
    followed by BatchNorm; ReLU after the first two and after the residual sum."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + identity)


class ResNet50Features(nn.Module):
    """ResNet-50 without its classifier: [N, 3, 224, 224] -> [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(in_channels, width, 2 if i and not j else 1))
                in_channels = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return F.avg_pool2d(h, 7, stride=1).flatten(1)     # DECA pools 7x7 -> 1x1 at 224


class DecaEncoder(nn.Module):
    """DECA's ``E_flame``: ResNet-50 features -> MLP -> 236 codes."""

    def __init__(self):
        super().__init__()
        self.encoder = ResNet50Features()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, N_CODES))

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        """crop [N, 3, 224, 224] RGB in [0, 1] -> codes [N, 236]."""
        if crop.ndim != 4 or crop.shape[1:] != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"crop: expected [N, 3, {CROP_SIZE}, {CROP_SIZE}], "
                             f"got {tuple(crop.shape)}")
        return self.layers(self.encoder(crop))
