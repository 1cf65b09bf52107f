"""DECA's coarse encoder (Feng et al. 2021, yfeng95/DECA): a photo to FLAME codes in one pass.

``deca_model.tar`` (the user's download; research licence) is ``torch.save`` of a dict whose
``'E_flame'`` entry is the state dict of DECA's ``ResnetEncoder``:

    encoder.*   a ResNet-50 trunk (torchvision layout: ``conv1``, ``bn1``, ``layer1..4`` of
                Bottleneck blocks with ``conv1..3``/``bn1..3`` and ``downsample.{0,1}``; no
                ``fc``), 7x7 average pool -> 2048 features
    layers.0    Linear(2048, 1024), then ReLU
    layers.2    Linear(1024, 236)

The 236 outputs are, in order, shape 100, tex 50, exp 50, pose 6 (global axis-angle 3 + jaw
axis-angle 3), cam 3 (s, tx, ty) and light 27 (reshaped [9, 3]). The other entries
(``E_detail``, ``D_detail``, optimiser state) are not used.

Input (DECA's ``TestData``): the RGB photo in [0, 1], cropped around the 68 landmarks - a
square of side 1.25 * 1.1 * (bbox width + height) / 2 centred on the landmarks' bounding box -
and resampled bilinearly to 224x224 (crop corners on pixel centres 0 and 223). The camera
code projects into that crop: NDC = s * (X + [tx, ty]), +Y up. DECA renders into the
original image by mapping crop NDC -> crop pixels ((ndc * 0.5 + 0.5) * 224) -> image pixels
(inverse crop transform) -> image NDC (pixels / size * 2 - 1); ``camera_in_image`` folds
that into an orthographic camera of the image itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CROP_SIZE = 224
CODE_SIZES = {"shape": 100, "tex": 50, "exp": 50, "pose": 6, "cam": 3, "light": 27}
N_CODES = sum(CODE_SIZES.values())      # 236


class DecaModelError(ValueError):
    """A ``deca_model.tar`` that does not hold DECA's encoder."""


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


def load_deca_encoder(path, device="cpu") -> DecaEncoder:
    """``E_flame`` of a ``deca_model.tar``, loaded strictly (``torch.load`` with
    ``weights_only=True``: tensors and plain containers only, no code), in eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DECA model not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler names what it refused
        raise DecaModelError(f"{path} is not a plain tensor checkpoint: {exc}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("E_flame"), dict):
        keys = ", ".join(map(str, checkpoint)) if isinstance(checkpoint, dict) else "none"
        raise DecaModelError(f"{path} has no 'E_flame' state dict (keys: {keys})")
    state = checkpoint["E_flame"]
    with torch.device("meta"):                      # no random initialisation to overwrite
        encoder = DecaEncoder()
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected
             and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]
    if missing or unexpected or wrong:
        raise DecaModelError(f"{path}: E_flame does not match DECA's encoder: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes "
                             f"{wrong[:5]}")
    encoder.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in state.items()}, strict=True, assign=True)
    return encoder.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Crop and codes

@dataclass(frozen=True)
class DecaCrop:
    """The square DECA encodes: crop pixel = k * (image pixel - origin), k = 223 / side."""
    origin: np.ndarray        # [2] image pixels under crop pixel (0, 0)
    side: float               # image pixels from crop pixel 0 to crop pixel 223

    @property
    def k(self) -> float:
        return (CROP_SIZE - 1) / self.side

    @classmethod
    def from_landmarks(cls, landmarks: np.ndarray) -> "DecaCrop":
        lm = np.asarray(landmarks, dtype=np.float64)
        lo, hi = lm.min(0), lm.max(0)
        centre = (lo + hi) / 2
        side = float(int((hi - lo).sum() / 2 * 1.1 * 1.25))    # DECA rounds down to pixels
        return cls(origin=centre - side / 2, side=side)

    def sample(self, rgb: np.ndarray) -> torch.Tensor:
        """The crop [3, 224, 224] in [0, 1]: bilinear, zero outside the image."""
        height, width = rgb.shape[:2]
        image = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        pixels = torch.arange(CROP_SIZE, dtype=torch.float64) / self.k
        xs, ys = pixels + self.origin[0], pixels + self.origin[1]
        grid = torch.stack(torch.meshgrid((2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1,
                                          indexing="xy"), -1)
        return F.grid_sample(image, grid[None].float(), mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]


@dataclass
class DecaCodes:
    """One photo's codes: shape [100], tex [50], exp [50], pose [6], cam [3] (in the DECA
    crop), light [9, 3]; float64 numpy."""
    shape: np.ndarray
    tex: np.ndarray
    exp: np.ndarray
    pose: np.ndarray
    cam: np.ndarray
    light: np.ndarray

    @classmethod
    def split(cls, codes: torch.Tensor) -> "DecaCodes":
        values = codes.detach().double().cpu().numpy().reshape(-1)
        if values.size != N_CODES:
            raise ValueError(f"codes: expected {N_CODES} values, got {values.size}")
        parts, start = {}, 0
        for name, n in CODE_SIZES.items():
            parts[name] = values[start:start + n]
            start += n
        parts["light"] = parts["light"].reshape(9, 3)
        return cls(**parts)


def camera_in_image(cam: np.ndarray, crop: DecaCrop, image_size: int) -> tuple[float, float, float]:
    """DECA's crop camera (s, tx, ty) as an orthographic camera (scale, tx, ty) of the whole
    ``image_size`` square image, following DECA's crop -> image mapping (module notes).

    In image NDC (+Y up): x' = a * x_crop + b_x, y' = a * y_crop + b_y with
    a = 224 / (k S) and b the image NDC of the crop centre, so the camera keeps its form with
    scale a * s and offset t + b / (a * s)."""
    s, tx, ty = (float(v) for v in cam)
    a = CROP_SIZE / (crop.k * image_size)
    centre = crop.origin + (CROP_SIZE / 2.0) / crop.k      # crop NDC 0 in image pixels
    b = np.array([centre[0] / image_size * 2 - 1, 1 - centre[1] / image_size * 2])
    scale = a * s
    return scale, tx + b[0] / scale, ty + b[1] / scale


def encode_photo(encoder: DecaEncoder, rgb: np.ndarray,
                 landmarks: np.ndarray) -> tuple[DecaCodes, DecaCrop]:
    """Codes of the face with ``landmarks`` [68, 2] in ``rgb`` [H, W, 3] uint8."""
    crop = DecaCrop.from_landmarks(landmarks)
    device = next(encoder.parameters()).device
    with torch.no_grad():
        codes = encoder(crop.sample(rgb)[None].to(device))
    return DecaCodes.split(codes[0]), crop
