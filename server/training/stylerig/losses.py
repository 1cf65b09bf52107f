"""StyleRig's rendering loss and the statistical priors, and the per-image targets they need.

L_render(I, p) = L_photo + lambda_land * L_land  (Tewari et al. 2020, eq. 2-4), per image:

* L_photo: mean over the photometric region of |I - R(p)|^2 (RGB). The region is the rendered
  face mask M (the paper's) intersected with the face outline of the image's landmarks (jaw
  line and raised brows, ``server.photo.optimise.face_outline_mask``): FLAME and the demo
  head model the whole head, but the generator paints hair over the scalp and background
  around the ears. Convention as DECA's: image code values in [0, 1] against albedo x shading.
* L_land: the mean of w_i |l_i(p) - t_i|^2 / size^2 over the 68 landmarks (w = 0.5 on the jaw
  line, whose static embedding slides with pose; 0 where the embedding has no point), i.e.
  squared distances in units of the frame size.

Supersampling (``supersample`` s > 1): R(p) is rendered at s x the size and each s x s block
averaged, the photometric region keeping the pixels the face covers entirely. A camera's (or
a generator's, or a box-filtered corpus image's) pixel integrates its area; a rasteriser
samples the centre. The two differ wherever the albedo changes within a pixel (brows, lips,
eyes), by about as much as the light changes the face, and F then bends the light to make up
the difference (measured in docs/stylerig_training.md).

Priors (F's training only): w_shape |shape|^2 + w_expression |expression|^2 +
w_albedo |albedo|^2, the coefficients being in standard deviations (log-gains for albedo).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.photo.optimise import face_outline_mask, landmark_weights
from server.models.dfr import FaceParams

from server.training.stylerig.corpus import resize_square
from server.training.stylerig.face_render import FaceRenderer


@dataclass
class Targets:
    """What a batch of corpus images offers the rendering loss, at the render size R:
    ``photo`` [B, R, R, 3] float in [0, 1], ``landmarks`` [B, 68, 2] renderer pixels (centres at
    +0.5), ``region`` [B, R, R] bool (the face outline)."""
    photo: torch.Tensor
    landmarks: torch.Tensor
    region: torch.Tensor

    @staticmethod
    def cat(items: list["Targets"]) -> "Targets":
        return Targets(*(torch.cat([getattr(t, k) for t in items])
                         for k in ("photo", "landmarks", "region")))


def landmark_targets(landmarks: np.ndarray, image_size: int, size: int, device
                     ) -> torch.Tensor:
    """dlib landmarks [B, 68, 2] in pixels of ``image_size`` frames -> renderer pixels of a
    ``size`` frame (centres at +0.5), float32."""
    return torch.as_tensor((np.asarray(landmarks, np.float64) + 0.5) * (size / image_size),
                           dtype=torch.float32, device=device)


def make_targets(images: np.ndarray, landmarks: np.ndarray, size: int, device) -> Targets:
    """Targets from uint8 images [B, S, S, 3] and their dlib landmarks [B, 68, 2]."""
    image_size = images.shape[1]
    photo = torch.from_numpy(np.ascontiguousarray(images)).to(device).float() / 255.0
    photo = resize_square(photo.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous()
    points = landmark_targets(landmarks, image_size, size, device)
    region = torch.as_tensor(np.stack([face_outline_mask(l, image_size, size) for l in landmarks]),
                             device=device)
    return Targets(photo, points, region)


@dataclass
class RenderLossWeights:
    landmarks: float = 100.0          # lambda_land


def photometric_loss(rendered: torch.Tensor, mask: torch.Tensor, target: Targets
                     ) -> torch.Tensor:
    """[B]: mean squared RGB error over mask & region (0 for an image with no such pixel)."""
    region = (mask[..., 0] > 0) & target.region
    squared = ((rendered - target.photo) ** 2).sum(-1) / 3 * region
    return squared.flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)


def landmark_loss(points: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, size: int
                  ) -> torch.Tensor:
    """[B]: weighted mean squared distance of ``points`` to ``target`` (both [B, 68, 2]
    renderer pixels) in frame-size units."""
    d2 = ((points - target) ** 2).sum(-1) / size ** 2                          # [B, 68]
    return (d2 * weights).sum(1) / weights.sum().clamp_min(1e-12)


class RenderLoss:
    """L_render for one face renderer at one render size (``supersample``: see the module
    notes)."""

    def __init__(self, renderer: FaceRenderer, size: int, weights: RenderLossWeights,
                 supersample: int = 1):
        if supersample < 1:
            raise ValueError(f"supersample: expected 1 or more, got {supersample}")
        self.renderer, self.size, self.weights = renderer, size, weights
        self.supersample = supersample
        self.landmark_weights = landmark_weights(renderer.embedding.valid).to(renderer.device)

    def render(self, p: FaceParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rendered [B, R, R, 3], coverage [B, R, R, 1] in [0, 1], landmarks [B, 68, 2]
        renderer pixels) of faces ``p`` at the loss's size R."""
        buffers, points = self.renderer.render(p, self.size * self.supersample)

        def to_size(x):              # the corpus' own box filter (identity at s = 1)
            return resize_square(x.permute(0, 3, 1, 2), self.size).permute(0, 2, 3, 1)
        return to_size(buffers.rendered), to_size(buffers.mask), points / self.supersample

    def terms(self, p: FaceParams, target: Targets) -> dict[str, torch.Tensor]:
        """{'photo' [B], 'landmarks' [B], 'render' [B]} of faces ``p``."""
        rendered, coverage, points = self.render(p)
        photo = photometric_loss(rendered, (coverage > 1 - 1e-6).float(), target)
        land = landmark_loss(points, target.landmarks, self.landmark_weights, self.size)
        return {"photo": photo, "landmarks": land,
                "render": photo + self.weights.landmarks * land}

    def landmark_term(self, p: FaceParams, landmarks: torch.Tensor) -> torch.Tensor:
        """[B]: L_land alone (no rasterisation: a sixth of ``terms``' cost per face) against
        ``landmarks`` [B, 68, 2] renderer pixels."""
        r = self.renderer
        points = r.landmarks(r.vertices(p), r.cameras(p), self.size)
        return landmark_loss(points, landmarks, self.landmark_weights, self.size)


def prior_terms(p: FaceParams, w_shape: float, w_expression: float, w_albedo: float
                ) -> dict[str, torch.Tensor]:
    """Statistical regularisers, each [B]."""
    return {"prior_shape": w_shape * (p.shape ** 2).sum(1),
            "prior_expression": w_expression * (p.expression ** 2).sum(1),
            "prior_albedo": w_albedo * (p.albedo ** 2).sum(1)}
