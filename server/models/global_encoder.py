"""DiffusionRig's global latent encoder: a ResNet-18 (He et al. 2016) whose classifier is
replaced by a linear map 512 -> latent_dim.

Parameter and buffer names equal torchvision's ``resnet18`` (``conv1``, ``bn1``,
``layer{1..4}.{0,1}.{conv1,bn1,conv2,bn2}``, ``layer{2,3,4}.0.downsample.{0,1}``, ``fc``), which
is what the official checkpoint's ``encoder.*`` tensors were saved from; torchvision itself is
not needed. BatchNorm uses its running statistics in eval mode, as at inference.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + identity)


class GlobalEncoder(nn.Module):
    """ResNet-18 trunk + ``fc`` Linear(512, latent_dim).

    Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool; then four stages of two BasicBlocks with
    64, 128, 256, 512 channels (stride 2 from the second stage on), global average pool, fc.
    """

    def __init__(self, latent_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        widths = (64, 128, 256, 512)
        in_ch = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(in_ch, width, stride),
                                                         BasicBlock(width, width)))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, latent_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image [N, 3, H, W] (DiffusionRig feeds the aligned 256x256 photo in [-1, 1], with
        no ImageNet normalisation) -> z [N, latent_dim]."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"encoder expects images [N, 3, H, W], got {tuple(image.shape)}")
        h = self.maxpool(self.relu(self.bn1(self.conv1(image))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(self.avgpool(h), 1))
