"""Photo -> DECA codes: DECA's input crop, its camera in the whole image, and one pass of the
encoder (``server.models.deca_encoder``).

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

import numpy as np
import torch
import torch.nn.functional as F

from server.models.deca_encoder import CODE_SIZES, CROP_SIZE, N_CODES, DecaEncoder


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
class PhotoCodes:
    """One photo's codes: shape [100], tex [50], exp [50], pose [6], cam [3] (in the DECA
    crop), light [9, 3]; float64 numpy."""
    shape: np.ndarray
    tex: np.ndarray
    exp: np.ndarray
    pose: np.ndarray
    cam: np.ndarray
    light: np.ndarray

    @classmethod
    def split(cls, codes: torch.Tensor) -> "PhotoCodes":
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
                 landmarks: np.ndarray) -> tuple[PhotoCodes, DecaCrop]:
    """Codes of the face with ``landmarks`` [68, 2] in ``rgb`` [H, W, 3] uint8."""
    crop = DecaCrop.from_landmarks(landmarks)
    device = next(encoder.parameters()).device
    with torch.no_grad():
        codes = encoder(crop.sample(rgb)[None].to(device))
    return PhotoCodes.split(codes[0]), crop
