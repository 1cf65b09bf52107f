"""LPIPS (Zhang et al. 2018), the learned perceptual distance, on VGG-16 or AlexNet features.

Built from two files the user brings (both plain tensor dicts, loaded with
``torch.load(weights_only=True)``): the ImageNet backbone as torchvision saves it
(``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth``: ``features.<i>.weight/bias``) and
LPIPS's linear calibration from the ``lpips`` package (``weights/v0.1/vgg.pth`` or
``alex.pth``: ``lin<k>.model.1.weight`` [1, C_k, 1, 1]).

d(x, y) for images [N, 3, H, W] in [-1, 1]: both are shifted and scaled per channel
((x - shift) / scale), run through the backbone, and at each of its five ReLU taps the
features are normalised to unit length over channels (eps 1e-10); the squared differences
are weighted per channel by lin_k, averaged over space and summed over the taps. [N].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Backbone layers: ('conv', out, kernel, stride, padding) | ('relu',) | ('pool', kernel, stride),
# indexed as torchvision's ``features``; TAPS are the indices after which LPIPS reads.
_VGG16 = [c for width, n in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
          for c in [("conv", width, 3, 1, 1), ("relu",)] * n + [("pool", 2, 2)]][:-1]
_ALEX = [("conv", 64, 11, 4, 2), ("relu",), ("pool", 3, 2), ("conv", 192, 5, 1, 2), ("relu",),
         ("pool", 3, 2), ("conv", 384, 3, 1, 1), ("relu",), ("conv", 256, 3, 1, 1), ("relu",),
         ("conv", 256, 3, 1, 1), ("relu",)]
BACKBONES = {"vgg": (_VGG16, (3, 8, 15, 22, 29)), "alex": (_ALEX, (1, 4, 7, 9, 11))}


class LPIPS(nn.Module):
    """``net`` 'vgg' or 'alex'. ``features`` is torchvision's layer stack (same names);
    ``lin<k>`` are the calibration weights [C_k]. No gradients for its own tensors: the
    distance is a fixed loss."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"LPIPS backbone must be one of {', '.join(BACKBONES)}, got {net!r}")
        layers, self.taps = BACKBONES[net]
        self.net = net
        modules, channels, widths = [], 3, []
        for i, layer in enumerate(layers):
            if layer[0] == "conv":
                _, out, k, stride, padding = layer
                modules.append(nn.Conv2d(channels, out, k, stride, padding))
                channels = out
            else:
                modules.append(nn.ReLU() if layer[0] == "relu" else nn.MaxPool2d(*layer[1:]))
            if i in self.taps:
                widths.append(channels)
        self.features = nn.Sequential(*modules)
        for k, width in enumerate(widths):
            self.register_buffer(f"lin{k}", torch.zeros(width))
        self.register_buffer("shift", torch.tensor(SHIFT)[:, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[:, None, None])
        self.requires_grad_(False)

    def taps_of(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised features at the five taps of x in [-1, 1]."""
        taps = []
        x = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                taps.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for k, (a, b) in enumerate(zip(self.taps_of(x), self.taps_of(y))):
            weight = getattr(self, f"lin{k}")[None, :, None, None]
            total = total + ((a - b).square() * weight).sum(dim=1).mean(dim=(1, 2))
        return total


def load_lpips(backbone: str | Path, calibration: str | Path, net: str | None = None,
               device="cpu") -> LPIPS:
    """LPIPS from a torchvision backbone file and an lpips calibration file (see the module
    notes); ``net`` ('vgg' / 'alex') is read from the backbone's shapes when None. Raises
    ValueError naming the file that does not fit."""
    features = _tensors(backbone)
    features = {k: v for k, v in features.items() if k.startswith("features.")}
    if net is None:
        first = features.get("features.0.weight")
        net = "alex" if first is not None and first.shape[-1] == 11 else "vgg"
    model = LPIPS(net)
    lins = _tensors(calibration)
    state = dict(features)
    for k in range(5):
        weight = lins.get(f"lin{k}.model.1.weight")
        if weight is None:
            raise ValueError(f"{calibration}: no lin{k}.model.1.weight; expected the lpips "
                             f"package's weights/v0.1/{net}.pth")
        state[f"lin{k}"] = weight.reshape(-1)
    state["shift"], state["scale"] = model.shift, model.scale
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{backbone} / {calibration} do not fit LPIPS-{net}:\n{exc}") from None
    return model.to(device).eval()


def _tensors(path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or refused
        raise ValueError(f"{path}: cannot be read safely ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data
