"""Fit the rig to a portrait by optimisation: landmarks plus the differentiable renderer.

Input: an aligned crop (``server.photo.align_face``) and its 68 landmarks. Output: the face
model's identity and expression coefficients, the global and jaw rotations, DECA's
orthographic camera for the crop (NDC = scale * (X + [tx, ty]), +Y up, the crop spanning
[-1, 1]), a DECA SH light and an albedo estimate: with a texture space (``FLAME_texture.npz``
for a FLAME model) DECA's texture code, the first ``n_texture`` coefficients
(``appearance.texture``); otherwise the model's albedo tinted by an RGB gain.

Energy, minimised with Adam in four stages:

    E = sum_i w_i |P(l_i) - t_i|^2 / 68          landmarks, in crop pixels (w = 0.5 on the jaw
                                                 line, which slides with pose; 1 elsewhere)
      + w_photo * mean_face |rendered - photo|   photometric L1 over the pixels the face
                                                 covers inside the landmarks' outline
      + w_shape |shape|^2 + w_exp |exp|^2 + w_jaw |jaw|^2                 coefficient priors
      + w_texture |tex|^2                                                 (with a texture space)
      + (w_white |L - mean_rgb(L)|^2 + w_light |L[1:]|^2) / L[0]^2         light priors

1. rigid: camera and global rotation on the landmarks (from a closed-form scale/offset start);
2. shape: + identity, expression and jaw, on the landmarks with their priors;
3. light: SH light and albedo gain (or texture code) on the photometric term with the stage-2
   geometry held (its pixels' normals and albedo, or texture samples, rendered once), from the
   linear least-squares light;
4. refine: everything on the whole energy, through the differentiable renderer (the
   photometric term also moves the geometry: depth cues the landmarks cannot see), with
   a fifth of the geometry step sizes since it starts close.

Photometric convention (DECA's, which DiffusionRig's buffers follow, see
``server.renderer.deca``): the photo's code values in [0, 1] are compared directly with
albedo x shading, the albedo being the model's linear albedo sRGB-encoded (display-referred,
like DECA's texture), no linearisation. Light and albedo are
ambiguous up to a per-channel factor; the light is kept white (band 0 equal across RGB) by
``w_white`` and the gain is normalised to a mean log of zero, so brightness goes into the light
and skin colour into the albedo gain (or the texture code, sampled per pixel from the texture
space as DECA does, ``server.renderer.texture``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from portrait_rig.params import Appearance, Camera, Lighting, Pose, RigParams
from server.models.deca_encoder import N_EXPRESSION as DECA_EXPRESSION, N_SHAPE as DECA_SHAPE
from server.models.deca_encoder import N_TEXTURE as DECA_TEXTURE
from server.renderer.face_model import FaceModel
from server.photo.landmarks import BROW_LEFT, BROW_RIGHT, JAW, N_LANDMARKS
from server.renderer import BufferRenderer, CameraBatch, project, screen_space, sh_basis
from portrait_rig.colour import linear_to_srgb, srgb_to_linear
from server.renderer.texture import FlameTexture, sample_albedo, texel_grid, textured

from server.photo.embedding import LandmarkEmbedding, LandmarkModel



@dataclass
class FitSettings:
    """Iterations per stage, step sizes and energy weights (see the module notes)."""
    rigid_steps: int = 80
    shape_steps: int = 150
    light_steps: int = 100
    refine_steps: int = 60
    render_size: int = 128            # photometric resolution (the crop is resampled to it)
    lr_rotation: float = 0.01         # Adam step sizes: radians,
    lr_coefficients: float = 0.05     # standard deviations,
    lr_scale: float = 0.01            # log camera scale,
    lr_offset: float = 0.001          # camera offset (model units: metres),
    lr_light: float = 0.02            # fraction of band 0,
    lr_albedo: float = 0.01           # log gain,
    lr_texture: float = 0.05          # texture coefficients
    w_photo: float = 30.0
    w_shape: float = 0.05
    w_expression: float = 0.05
    w_jaw: float = 5.0
    w_white: float = 10.0
    w_light: float = 0.001
    w_texture: float = 0.01
    n_shape: int = DECA_SHAPE
    n_expression: int = DECA_EXPRESSION
    n_texture: int = DECA_TEXTURE

    def __post_init__(self):
        for name in ("rigid_steps", "shape_steps", "light_steps", "refine_steps", "n_shape",
                     "n_expression", "n_texture"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if not isinstance(self.render_size, int) or not 16 <= self.render_size <= 1024:
            raise ValueError(f"render_size: expected an integer in 16..1024, "
                             f"got {self.render_size!r}")


@dataclass
class FitResult:
    """The fitted rig (``params``: orthographic camera of the crop), the albedo estimate
    (``albedo_gain`` [3], a tint of the display-referred albedo, and the tinted
    ``vertex_albedo`` [V, 3], linear like ``FaceData.vertex_albedo``), the fitted and target
    landmarks in crop pixels [68, 2] (dlib convention: pixel centres on integers), which of
    them count (``landmark_valid`` [68]), and the energy terms after each step."""
    params: RigParams
    albedo_gain: np.ndarray
    vertex_albedo: np.ndarray
    landmarks: np.ndarray
    target_landmarks: np.ndarray
    landmark_valid: np.ndarray
    method: str = "optimisation"
    history: list[dict] = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    @property
    def landmark_error(self) -> float:
        """Mean distance (crop pixels) between fitted and target landmarks."""
        d = self.landmarks - self.target_landmarks
        return float(np.linalg.norm(d, axis=1)[self.landmark_valid].mean())


class _Variables:
    """The optimised tensors and their mapping to rig quantities."""

    def __init__(self, model: FaceModel, n_shape: int, n_expression: int, n_texture: int,
                 sh0: torch.Tensor):
        z = lambda *s: torch.zeros(*s, dtype=torch.float32)   # noqa: E731
        self.shape = z(1, min(n_shape, model.n_shape))
        self.expression = z(1, min(n_expression, model.n_expression))
        self.rotation = z(1, 3)
        self.jaw = z(1, 3)
        self.log_scale = z(1)
        self.offset = z(1, 2)            # tx, ty in model units
        self.light = sh0.clone()[None]   # [1, 9, 3]
        self.log_gain = z(1, 3)
        self.texture = z(1, n_texture)
        self.model = model

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shape [1, S] and expression [1, E] zero-padded to the model's counts, pose [1, J, 3]
        (global and jaw rotations, the other joints at rest)."""
        m = self.model
        shape = torch.cat([self.shape, self.shape.new_zeros(1, m.n_shape - self.shape.shape[1])],
                          1)
        expression = torch.cat([self.expression, self.expression.new_zeros(
            1, m.n_expression - self.expression.shape[1])], 1)
        rest = torch.zeros(1, 1, 3)
        pose = torch.cat([self.rotation[:, None], rest, self.jaw[:, None],
                          rest.expand(1, m.parents.shape[0] - 3, 3)], 1)
        return shape, expression, pose

    def mesh(self) -> torch.Tensor:
        return self.model.pose(*self.coefficients())[0]

    def cameras(self) -> CameraBatch:
        one = torch.ones(1)
        return CameraBatch(rotation=torch.eye(3)[None], location=torch.zeros(1, 3), focal=one,
                           near=one * 1e-3, far=one * 1e3, scale=self.log_scale.exp(),
                           offset=self.offset, perspective=torch.zeros(1, dtype=torch.bool))

    def gain(self) -> torch.Tensor:
        return (self.log_gain - self.log_gain.mean()).exp()

    def rig(self) -> RigParams:
        def floats(t):
            return [float(v) for v in t.detach().reshape(-1)]
        return RigParams(
            shape=floats(self.shape), expression=floats(self.expression),
            pose=Pose(global_=floats(self.rotation), jaw=floats(self.jaw)),
            camera=Camera(type="orthographic", scale=float(self.log_scale.exp()),
                          tx=float(self.offset[0, 0]), ty=float(self.offset[0, 1])),
            lighting=Lighting(sh=[floats(row) for row in self.light[0]]),
            appearance=Appearance(texture=floats(self.texture)))


def landmark_weights(valid: np.ndarray) -> torch.Tensor:
    """[68]: 0.5 on the jaw line (a static embedding's contour slides with pose), 1 elsewhere,
    0 where the embedding defines no landmark."""
    w = np.ones(N_LANDMARKS)
    w[JAW] = 0.5
    return torch.as_tensor(w * valid, dtype=torch.float32)


def face_outline_mask(landmarks: np.ndarray, image_size: int, size: int) -> np.ndarray:
    """[size, size] bool: inside the polygon of the jaw line and the brows (raised by a fifth
    of the brow-to-chin distance to take in the forehead), landmarks in pixels of an
    ``image_size`` crop."""
    jaw, brows = landmarks[JAW], np.concatenate([landmarks[BROW_LEFT], landmarks[BROW_RIGHT]])
    lift = 0.2 * (landmarks[8, 1] - brows[:, 1].mean())
    outline = np.concatenate([jaw, (brows - [0.0, lift])[::-1]])
    outline = (outline + 0.5) * (size / image_size)           # pixel centres -> edges, resized
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in outline], fill=1)
    return np.asarray(canvas, dtype=bool)


def fit_aligned(image: np.ndarray, landmarks: np.ndarray, model: FaceModel,
                embedding: LandmarkEmbedding, settings: FitSettings | None = None,
                sh_start: np.ndarray | None = None,
                texture: FlameTexture | None = None) -> FitResult:
    """Fit ``model`` to an aligned crop.

    image RGB uint8 [S, S, 3]; landmarks [68, 2] in its pixels (dlib convention);
    ``embedding`` places them on ``model``'s mesh; ``sh_start`` [9, 3] is the light the
    least-squares start falls back to where the face covers too few pixels (default: grey
    ambient light); ``texture``: the model's texture space (on its device), whose code is
    fitted instead of an albedo gain. Runs on the model's device without touching global
    torch state.
    """
    settings = settings or FitSettings()
    image = np.asarray(image)
    size = image.shape[0]
    if image.ndim != 3 or image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise ValueError(f"image: expected a square RGB uint8 crop [S, S, 3], got "
                         f"{image.shape} {image.dtype}")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (N_LANDMARKS, 2) or not np.isfinite(landmarks).all():
        raise ValueError(f"landmarks: expected finite [{N_LANDMARKS}, 2], got {landmarks.shape}")
    embedding.check(model.data)
    if texture is not None:
        texture.check_triangles(model.data.n_triangles)

    with torch.enable_grad():
        return _Fit(image, landmarks, model, embedding, settings, sh_start, texture).run()


class _Fit:
    def __init__(self, image, landmarks, model, embedding, settings, sh_start, texture):
        self.settings, self.model, self.embedding = settings, model, embedding
        self.size = image.shape[0]
        self.target = torch.as_tensor(landmarks + 0.5, dtype=torch.float32)  # renderer pixels
        self.valid = embedding.valid.copy()
        self.weights = landmark_weights(self.valid)
        self.renderer = BufferRenderer(model.data.triangles)
        self.landmark_model = LandmarkModel(model, embedding)
        r = settings.render_size
        small = Image.fromarray(image).resize((r, r), Image.BOX)
        self.photo = torch.as_tensor(np.asarray(small, dtype=np.float32) / 255.0)   # [R, R, 3]
        self.outline = torch.as_tensor(face_outline_mask(landmarks, self.size, r))
        if sh_start is None:                     # uniform grey light of radiance 0.5
            sh0 = torch.zeros(9, 3)
            sh0[0] = 0.5 * math.sqrt(4 * math.pi)
        else:
            sh0 = torch.as_tensor(np.asarray(sh_start, dtype=np.float32).reshape(9, 3))
        self.texture = texture
        n_texture = min(settings.n_texture, texture.n_components) if texture else 0
        self.var = _Variables(model, settings.n_shape, settings.n_expression, n_texture, sh0)
        # DECA's albedo is display-referred (texture code values), the model's is linear:
        # encode it as ``server.renderer.deca`` does, so the light is the one its buffers use.
        self.albedo = torch.as_tensor(linear_to_srgb(model.data.vertex_albedo),
                                      dtype=torch.float32, device=model.device)
        self.history: list[dict] = []

    # ------------------------------------------------------------------ energy terms
    def project_landmarks(self) -> torch.Tensor:
        """Fitted landmarks [68, 2] in renderer pixels of the crop."""
        points = self.landmark_model.landmarks(*self.var.coefficients())
        cams = self.var.cameras()
        ndc, depth = project(points, cams, self.size, self.size)
        return screen_space(ndc, depth, cams, self.size, self.size)[0][0]

    def landmark_energy(self) -> torch.Tensor:
        d2 = ((self.project_landmarks() - self.target) ** 2).sum(-1)
        return (self.weights * d2).sum() / N_LANDMARKS

    def render(self, vertices, tinted: bool = True):
        r = self.settings.render_size
        albedo = self.albedo * self.var.gain()[0] if tinted else self.albedo
        cameras = self.var.cameras()
        buffers = self.renderer.render(vertices, albedo, self.var.light[0], cameras, r, r)
        if self.texture is None:
            return buffers
        maps = self.texture.albedo_map(self.var.texture if tinted else None)
        return textured(buffers, maps, self.texture.face_uv, vertices, cameras,
                        self.renderer.triangles)

    def face_mask(self, buffers) -> torch.Tensor:
        return (buffers.mask[0, ..., 0] > 0) & self.outline

    def photo_energy(self, buffers) -> torch.Tensor:
        """Mean |rendered - photo| over the face pixels of ``buffers``."""
        mask = self.face_mask(buffers)
        if not bool(mask.any()):
            return buffers.rendered.sum() * 0.0
        return (buffers.rendered[0] - self.photo).abs()[mask].mean()

    def face_pixels(self) -> tuple[torch.Tensor, ...] | None:
        """SH basis [N, 9], untinted albedo [N, 3], the texture directions there [N, 3, K]
        (None without a texture space) and the photo [N, 3] of the current geometry's face
        pixels (None when the face covers fewer than 50)."""
        with torch.no_grad():
            vertices = self.var.mesh()
            buffers = self.render(vertices, tinted=False)
            mask = self.face_mask(buffers)
            if int(mask.sum()) < 50:
                return None
            directions = None
            if self.texture is not None and self.var.texture.shape[1]:
                k = self.var.texture.shape[1]
                maps = self.texture.directions(k)                       # [3, S, S, K]
                maps = maps.permute(0, 3, 1, 2).reshape(1, 3 * k, *maps.shape[1:3])
                grid = texel_grid(buffers, self.texture.face_uv, vertices,
                                  self.var.cameras(), self.renderer.triangles)
                directions = sample_albedo(maps, grid)[0][mask].view(-1, 3, k)
            return (sh_basis(buffers.normal[0][mask]), buffers.albedo[0][mask], directions,
                    self.photo[mask])

    def pixel_albedo(self, pixels) -> torch.Tensor:
        """Albedo [N, 3] of ``face_pixels`` at the current gain or texture code."""
        _, albedo, directions, _ = pixels
        if directions is None:
            return albedo * self.var.gain()
        return albedo + directions @ self.var.texture[0]

    def shading_energy(self, pixels) -> torch.Tensor:
        """``photo_energy`` on fixed geometry: only light and albedo gain (or texture) vary."""
        basis, photo = pixels[0], pixels[-1]
        return (self.pixel_albedo(pixels) * (basis @ self.var.light[0]) - photo).abs().mean()

    def geometry_priors(self) -> dict[str, torch.Tensor]:
        s, v = self.settings, self.var
        return {"shape": s.w_shape * (v.shape ** 2).sum(),
                "expression": s.w_expression * (v.expression ** 2).sum(),
                "jaw": s.w_jaw * (v.jaw ** 2).sum()}

    def texture_prior(self) -> dict[str, torch.Tensor]:
        return {"texture": self.settings.w_texture * (self.var.texture ** 2).sum()}

    def light_priors(self) -> dict[str, torch.Tensor]:
        s, light = self.settings, self.var.light[0]
        brightness = light[0].mean().abs().clamp_min(1e-3) ** 2
        return {"white": s.w_white * ((light - light.mean(1, keepdim=True)) ** 2).sum()
                / brightness,
                "light": s.w_light * (light[1:] ** 2).sum() / brightness}

    # ------------------------------------------------------------------ stages
    def run(self) -> FitResult:
        s, v = self.settings, self.var
        geometry = [(v.rotation, s.lr_rotation), (v.jaw, s.lr_rotation),
                    (v.log_scale, s.lr_scale), (v.offset, s.lr_offset),
                    (v.shape, s.lr_coefficients), (v.expression, s.lr_coefficients)]

        def landmarks():
            return {"landmarks": self.landmark_energy(), **self.geometry_priors()}

        self.start_camera()
        self.stage("rigid", s.rigid_steps, [geometry[0], *geometry[2:4]], landmarks)
        self.stage("shape", s.shape_steps, geometry, landmarks)
        pixels = self.face_pixels() if s.light_steps + s.refine_steps else None
        if pixels is not None:
            self.start_light(pixels)
            albedo = ((v.texture, s.lr_texture) if self.texture is not None
                      else (v.log_gain, s.lr_albedo))
            light = [(v.light, s.lr_light * float(v.light[0, 0].abs().mean())), albedo]

            def priors():
                return {**self.light_priors(),
                        **(self.texture_prior() if self.texture is not None else {})}

            self.stage("light", s.light_steps, light, lambda: {
                **priors(), "photo": s.w_photo * self.shading_energy(pixels)})
            self.stage("refine", s.refine_steps,
                       [(t, lr * 0.2) for t, lr in geometry] + light, lambda: {
                           **landmarks(), **priors(),
                           "photo": s.w_photo * self.photo_energy(self.render(v.mesh()))})
        with torch.no_grad():
            fitted = self.project_landmarks().numpy() - 0.5
            gain = v.gain()[0]
        return FitResult(params=v.rig(), albedo_gain=gain.numpy().astype(np.float64),
                         vertex_albedo=srgb_to_linear((self.albedo * gain).cpu().numpy()),
                         landmarks=fitted.astype(np.float64),
                         target_landmarks=self.target.numpy().astype(np.float64) - 0.5,
                         landmark_valid=self.valid, history=self.history)

    def start_camera(self) -> None:
        """Scale and offset that best map the neutral landmarks' x, y onto the targets."""
        v = self.var
        with torch.no_grad():
            points = self.landmark_model.landmarks(*v.coefficients())[0, :, :2].double()
            valid = torch.as_tensor(self.valid)
            target = self.target.double()
            # renderer pixels -> NDC (+Y up): x = px / S * 2 - 1, y = 1 - py / S * 2
            ndc = torch.stack([target[:, 0] / self.size * 2 - 1,
                               1 - target[:, 1] / self.size * 2], 1)
            p, t = points[valid], ndc[valid]
            scale = ((t - t.mean(0)).norm() / (p - p.mean(0)).norm()).clamp_min(1e-6)
            v.log_scale.copy_(scale.log())
            v.offset.copy_((t.mean(0) / scale - p.mean(0))[None])

    def start_light(self, pixels) -> None:
        """Least-squares light for the current geometry (gain 1): per channel,
        min |albedo * (B(n) L) - photo|^2 + ridge on bands 1-8, then band 0 made white."""
        basis, albedo, photo = (t.double() for t in (pixels[0], pixels[1], pixels[-1]))
        ridge = torch.full((9,), self.settings.w_light / self.settings.w_photo,
                           dtype=torch.float64)
        ridge[0] = 1e-9
        light = torch.zeros(9, 3, dtype=torch.float64)
        for c in range(3):
            a = basis * albedo[:, c:c + 1]
            gram = a.T @ a + torch.diag(ridge) * a.shape[0]
            light[:, c] = torch.linalg.solve(gram, a.T @ photo[:, c])
        light[0] = light[0].mean()
        self.var.light.copy_(light[None].float())

    def stage(self, name: str, steps: int, groups, energy) -> None:
        """``steps`` Adam steps on the (tensor, step size) ``groups`` minimising the sum of
        the terms ``energy()`` returns; records every step's terms in ``history``."""
        if not steps:
            return
        tensors = [t for t, _ in groups]
        for t in tensors:
            t.requires_grad_(True)
        optimiser = torch.optim.Adam([{"params": [t], "lr": lr} for t, lr in groups])
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            terms = energy()
            total = sum(terms.values())
            total.backward()
            optimiser.step()
            self.history.append({"stage": name, "total": float(total.detach()),
                                 **{k: float(t.detach()) for k, t in terms.items()}})
        for t in tensors:
            t.requires_grad_(False)
