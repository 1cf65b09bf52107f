"""Where a photoreal portrait is drawn: the trained (FFHQ-aligned) framing, placed back into
the rig's frame.

DiffusionRig and StyleGAN2 only ever saw FFHQ-aligned portraits: upright, the face centred and
scaled by the FFHQ recipe (``server.photo.align.ffhq_square``: centre = eye midpoint + 0.1 x
eye-to-mouth, side from the eye distance and the eye-to-mouth distance, rotated so the eyes are
level). A rig puts the head anywhere in the frame, at any size and roll. So these backends

1. compute the head's framing from the 68 landmarks of the posed mesh (``HeadFramer``, on the
   mesh the DECA codes pose, projected by their camera): a similarity ``framing`` from the
   network's square to the frame;
2. condition / generate in the aligned square at the network's resolution (``reframe``:
   the DECA codes seen through a camera rolled, zoomed and shifted by the framing);
3. warp the portrait back into the frame (``place``).

Framings ([B, 4] float64 rows (a, b, tx, ty)) map NDC of the network's square u_a (x right,
y up, [-1, 1] across it) to NDC of the square covering the frame (side max(width, height),
centred, as ``server.renderer.deca.deca_codes`` frames it): u_f = [[a, -b], [b, a]] u_a + t,
i.e. a scale sqrt(a^2 + b^2), a counter-clockwise rotation atan2(b, a) and a shift. Being
linear in (a, b, tx, ty), they are smoothed over a shot entry by entry
(``server.backends.shots.smooth``), like StyleGAN3's input transforms.

Modes (the backends' ``framing`` option):

``ffhq``    the full FFHQ square of the landmarks: centre, scale and roll as in the training
            crops (the default).
``centre``  DiffusionRig's own inference recipe (``scripts/inference.py``, ``align_ffhq`` in
            ``decalib/deca.py``): the head moved so its FFHQ centre sits at the square's
            centre; scale and roll as the rig frames them.
``rig``     the rig's framing as it is (the network renders the square covering the frame).

Placing (``place``): the portrait is resampled into the frame (bicubic, antialiased when it
shrinks). Outside the generated square the frame shows the portrait's own background: its
edge pixels extended over a band of ``FEATHER`` (a fraction of the square's half-side) and
faded into the mean colour of its outermost pixels, which fills the rest. The alpha of the
frame is the coverage of the generated square (1 inside, falling to 0 across the band), so
``rgba8`` / PNG frames are transparent where the network drew nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from portrait_rig import sh
from portrait_rig.face_data import FaceData
from portrait_rig.params import RigParams
from portrait_rig.rotations import axis_angle_to_matrix, matrix_to_axis_angle
from server.backends.shots import smooth
from server.renderer.deca import DecaCodes, RigGeometry, deca_codes, pose_inputs
from server.renderer.face_model import FaceModel

FRAMINGS = ("ffhq", "centre", "rig")
FEATHER = 0.04          # width of the fade beyond the generated square, in its NDC units


def identity_framings(batch: int) -> np.ndarray:
    """[B, 4] framings of the ``rig`` mode: the network's square is the frame's."""
    return np.tile([1.0, 0.0, 0.0, 0.0], (batch, 1))


def check_framing(value) -> str:
    """A backend's ``framing`` option, validated."""
    if value not in FRAMINGS:
        raise ValueError(f"framing: expected one of {', '.join(FRAMINGS)}, got {value!r}")
    return value


def default_embedding(data: FaceData):
    """The landmark embedding of ``data``: DECA's ``landmark_embedding.npy`` from the model
    folder (``server.paths``) for FLAME, else the landmarks found on a render of the model
    (``server.photo.embedding``)."""
    from server import paths
    from server.photo import FLAME_VERTICES
    from server.photo.embedding import embedding_for

    path = paths.landmark_embedding()
    flame = data.n_vertices == FLAME_VERTICES and path.is_file()
    return embedding_for(data, path if flame else None)


class HeadFramer:
    """The landmarks and framings of the DECA-posed head of ``face_model`` (a ``FaceModel``);
    ``embedding`` places the 68 landmarks on its mesh (default: ``default_embedding``)."""

    def __init__(self, face_model: FaceModel, embedding=None):
        from server.photo.embedding import EmbeddingError, LandmarkModel

        self.model = face_model
        self.geometry = RigGeometry(face_model.data)
        try:
            self.embedding = embedding if embedding is not None else default_embedding(
                face_model.data)
        except (EmbeddingError, ImportError) as exc:
            raise ValueError(f"framing: the head's landmarks are needed to frame it ({exc}); "
                             "place DECA's landmark_embedding.npy in the model folder or use "
                             "the option framing=rig") from None
        self.landmark_model = LandmarkModel(face_model, self.embedding)

    def codes(self, params: list[RigParams], width: int, height: int) -> DecaCodes:
        return deca_codes(params, self.geometry, width, height)

    @torch.no_grad()
    def landmarks(self, codes: DecaCodes) -> np.ndarray:
        """The 68 landmarks [B, 68, 2] (float64) in NDC of the codes' square (x right, y up)."""
        points = self.landmark_model.landmarks(*pose_inputs(codes, self.model))
        cam = codes.cam.to(points)
        ndc = cam[:, None, :1] * (points[..., :2] + cam[:, None, 1:])
        return ndc.double().cpu().numpy()

    def framings(self, codes: DecaCodes, mode: str) -> np.ndarray:
        """[B, 4] framings of ``mode`` (module notes) for the heads ``codes`` pose."""
        if mode == "rig":
            return identity_framings(len(codes))
        from server.photo.align import ffhq_square

        out = identity_framings(len(codes))
        for row, points in zip(out, self.landmarks(codes)):
            # The recipe works in image coordinates (y down); flip to them and back.
            centre, x, _ = ffhq_square(points * [1.0, -1.0])
            row[2:] = centre[0], -centre[1]
            if mode == "ffhq":
                row[:2] = x[0], -x[1]
        return out

    def shot_framing(self, window: list[RigParams], centre: int, width: int, height: int,
                     mode: str) -> np.ndarray:
        """[4]: frame ``centre``'s framing smoothed over the shot ``window`` (its own
        parameters among its neighbours', in frame order)."""
        framings = self.framings(self.codes(window, width, height), mode)
        return smooth(framings)[centre]

    def reframe(self, codes: DecaCodes, framings: np.ndarray) -> DecaCodes:
        """The codes that show the same heads in the network's square (module notes).

        With u_f = s (X_xy + t_c) (DECA's camera) and u_f = M u_a + t, M = sigma R(theta):
        u_a = (s / sigma) R(-theta) (X_xy + t_c - t / s). Turning the head by R_z(-theta) about
        the viewing axis turns its image by -theta; DECA turns it about the root joint J_0,
        which adds (I - R_z(-theta)) J_0, taken out of the camera offset. The light, fixed in
        the camera frame, is turned with the view, so every normal keeps its shading."""
        framings = np.asarray(framings, dtype=np.float64)
        if np.array_equal(framings, identity_framings(len(codes))):
            return codes
        pose, cam, light = (codes.pose.double().numpy().copy(), codes.cam.double().numpy(),
                            codes.light.double().numpy())
        new_cam, new_light = np.zeros_like(cam), np.zeros_like(light)
        for i, (a, b, tx, ty) in enumerate(framings):
            sigma, theta = math.hypot(a, b), math.atan2(b, a)
            cos, sin = math.cos(-theta), math.sin(-theta)
            roll = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
            root = self.geometry.joints(self.geometry.coefficients(
                codes.shape[i].double().numpy(), codes.exp[i].double().numpy()))[0]
            drift = (root - roll @ root)[:2]
            offset = roll[:2, :2] @ (cam[i, 1:] - np.array([tx, ty]) / cam[i, 0]) - drift
            new_cam[i] = (cam[i, 0] / sigma, *offset)
            pose[i, :3] = matrix_to_axis_angle(roll @ axis_angle_to_matrix(pose[i, :3]))
            new_light[i] = sh.rotate(light[i], roll)

        def t(array):
            return torch.from_numpy(array).float()

        return DecaCodes(codes.shape, codes.exp, t(pose), t(new_cam), t(new_light), codes.tex)


# ---------------------------------------------------------------------------- placing

def place(images: torch.Tensor, framings: np.ndarray,
          sizes: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each portrait of ``images`` [B, 3, S, S] (any value range) drawn into its frame of
    ``sizes[b]`` = (width, height) through ``framings[b]`` (module notes). Returns per frame
    (rgb [3, H, W], alpha [1, H, W] in [0, 1]) on the images' device; rgb may overshoot the
    range a little (bicubic), so callers clamp as they quantise."""
    out = []
    for image, framing, (width, height) in zip(images, np.asarray(framings, np.float64), sizes):
        image = image[None].float()
        side = max(width, height)
        top, left = (side - height) // 2, (side - width) // 2
        if np.array_equal(framing, [1.0, 0.0, 0.0, 0.0]):
            rgb = _resize(image, side)[0, :, top: top + height, left: left + width]
            out.append((rgb, rgb.new_ones(1, height, width)))
            continue
        a, b, tx, ty = framing
        sigma = math.hypot(a, b)
        if sigma * side < image.shape[-1]:          # shrinking: low-pass first
            image = _resize(image, max(1, round(sigma * side)))
        # Frame pixel centres in the covering square's NDC, then in the portrait's.
        pixels = torch.arange(max(width, height), device=image.device, dtype=image.dtype) + 0.5
        xs = (pixels[:width] + left) / side * 2 - 1 - tx
        ys = 1 - (pixels[:height] + top) / side * 2 - ty
        u, v = torch.meshgrid(xs, ys, indexing="xy")
        ua, va = (a * u + b * v) / sigma ** 2, (-b * u + a * v) / sigma ** 2
        grid = torch.stack([ua, -va], dim=-1)[None]
        sampled = F.grid_sample(image, grid, mode="bicubic", padding_mode="border",
                                align_corners=False)[0]
        inside = 1 - torch.maximum(ua.abs(), va.abs())                  # >= 0 in the square
        alpha = (1 + inside / FEATHER).clamp(0, 1)[None]
        fill = _border_colour(image[0])[:, None, None]
        out.append((alpha * sampled + (1 - alpha) * fill, alpha))
    return out


def _resize(image: torch.Tensor, side: int) -> torch.Tensor:
    if side == image.shape[-1]:
        return image
    return F.interpolate(image, size=(side, side), mode="bicubic", align_corners=False,
                         antialias=side < image.shape[-1])


def _border_colour(image: torch.Tensor) -> torch.Tensor:
    """[3]: mean colour of the outermost two pixel rings of ``image`` [3, S, S]."""
    ring = torch.ones_like(image[0], dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    return image[:, ring].mean(dim=1)
