"""A world whose truth is known, for DiffusionRig's stage 1: renders of the face model under
random, known rig parameters, with appearance the physical buffers do not carry.

Each sample is a ``RigParams`` (identity, expression, global and jaw rotation, SH light, an
orthographic camera framing the crop as photo fitting frames an FFHQ-aligned crop) and a
``Look``:

* ``skin_gain``: an RGB gain on the face model's display-referred albedo (skin tone; the
  buffers' albedo is the model's own);
* ``hair``: a colour painted over the scalp and the back of the head (a smooth per-vertex
  weight on the template, so it turns with the head and is lit with it);
* ``background_top`` / ``background_bottom``: a vertical gradient behind the head.

Images are rendered with the same geometry as the buffers DiffusionRig is conditioned on
(``server.renderer.deca``: DECA's codes of the parameters, the mesh posed by them and projected
by their orthographic camera; neck and eyes stay at rest, so that mapping is exact), shaded
photoreal-ish: the look's albedo times the SH irradiance, plus a Blinn-Phong highlight from the
light's dominant direction, supersampled and box-filtered (antialiased edges), over the
background.

``write_dataset`` writes a stage-1 dataset folder exactly as ``stage1 prepare`` writes one
(``<stem>.png`` + ``<stem>.json``, ``RigParams.to_json()``), so ``stage1 train`` runs on it
unchanged, plus ``world.json`` with every sample's look (``FolderData`` reads only the png/json
pairs). Writing is resumable: samples already on disk are kept, and sample ``i`` is the same
whatever was written before (each one draws from its own seeded generator).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from portrait_rig.params import Camera, Lighting, Pose, RigParams
from portrait_rig.sh import SH_CONSTANTS
from server.renderer.deca import DecaBufferRenderer
from server.renderer.face_model import FaceModel

WORLD_FILE = "world.json"

# Ranges of the rig parameters (degrees where named so).
YAW_DEG, PITCH_DEG, ROLL_DEG = 30.0, 15.0, 3.0
JAW_MAX = 0.35                      # radians of mouth opening
SCALE_RANGE = (6.6, 7.4)            # orthographic scale: the head spans ~85 % of the crop
SHIFT = 0.008                       # metres of camera offset
SPECULAR, SHININESS = 0.18, 24.0


@dataclass
class Look:
    """Appearance the buffers do not carry (module notes); display-referred RGB in [0, 1]."""
    skin_gain: tuple[float, float, float]
    hair: tuple[float, float, float]
    background_top: tuple[float, float, float]
    background_bottom: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Look":
        return cls(**{k: tuple(float(x) for x in v) for k, v in data.items()})


def light_code(direction, ambient: float, strength: float, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A [9, 3] DECA light code: band 0 ``ambient``, band 1 ``strength`` times the unit
    ``direction`` (camera frame: x right, y up, z towards the viewer), tinted."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    code = np.zeros((9, 3))
    code[0] = ambient
    code[1:4] = strength * d[:, None]
    return code * np.asarray(tint)[None]


def light_direction(sh) -> np.ndarray:
    """Unit dominant direction of a light code: its band-1 vector averaged over RGB."""
    band1 = np.asarray(sh, dtype=np.float64)[1:4].mean(axis=1)
    return band1 / max(np.linalg.norm(band1), 1e-12)


class FaceWorld:
    """Samples and renders the world (module notes) at ``size`` pixels, each pixel the mean of
    ``supersample``^2 rendered ones."""

    def __init__(self, face_model: FaceModel | None = None, size: int = 64,
                 supersample: int = 4):
        if face_model is None:
            from portrait_rig.face_source import load_face_data
            face_model = FaceModel(load_face_data("demo"))
        self.model, self.size, self.supersample = face_model, size, supersample
        self.deca = DecaBufferRenderer(face_model, None)
        self.hair_weight = _hair_weight(face_model.data.v_template)

    # ---------------------------------------------------------------- sampling
    def sample(self, index: int, seed: int = 0) -> tuple[RigParams, Look]:
        """Sample ``index`` of the world ``seed``: the same pair whenever it is asked for."""
        rng = np.random.default_rng([seed, index])
        return self.sample_params(rng), self.sample_look(rng)

    def sample_params(self, rng: np.random.Generator) -> RigParams:
        m = self.model
        shape = rng.normal(0.0, 0.8, m.n_shape)
        expression = np.where(rng.random(m.n_expression) < 0.3,
                              rng.uniform(0.0, 1.0, m.n_expression), 0.0)
        yaw, pitch, roll = (math.radians(rng.uniform(-a, a))
                            for a in (YAW_DEG, PITCH_DEG, ROLL_DEG))
        jaw = rng.uniform(0.0, JAW_MAX) if rng.random() < 0.6 else 0.0
        azimuth, elevation = rng.uniform(-70, 70), rng.uniform(-20, 50)
        light = light_code(_direction(azimuth, elevation), rng.uniform(1.7, 2.5),
                           rng.uniform(0.4, 1.0), 1.0 + rng.uniform(-0.06, 0.06, 3))
        camera = Camera(type="orthographic", scale=rng.uniform(*SCALE_RANGE),
                        tx=rng.uniform(-SHIFT, SHIFT), ty=rng.uniform(-SHIFT, SHIFT))
        return RigParams(shape=[float(v) for v in shape],
                         expression=[float(v) for v in expression],
                         pose=Pose(global_=euler_to_axis_angle(yaw, pitch, roll),
                                   jaw=[float(jaw), 0.0, 0.0]),
                         camera=camera, lighting=Lighting(sh=light.tolist()))

    @staticmethod
    def sample_look(rng: np.random.Generator) -> Look:
        skin = np.exp(rng.normal(0.0, 0.25)) * np.exp(rng.normal(0.0, 0.08, 3))
        hair = rng.uniform(0.05, 0.85) * np.array([1.0, rng.uniform(0.55, 0.9),
                                                   rng.uniform(0.3, 0.8)])
        hue = rng.random(3)
        top = 0.15 + 0.7 * hue
        bottom = np.clip(top * rng.uniform(0.4, 1.1) + rng.uniform(-0.15, 0.15, 3), 0.0, 1.0)
        def rgb(v):
            return tuple(float(x) for x in np.clip(v, 0.0, 1.5))
        return Look(rgb(skin), rgb(hair), rgb(top), rgb(bottom))

    # ---------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, params: list[RigParams], looks: list[Look],
               size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [B, S, S, 3] and face coverage float [B, S, S] (the fraction of each
        pixel the mesh covers)."""
        size = size or self.size
        big = size * self.supersample
        codes = self.deca.codes(params, big, big)
        vertices = self.deca.vertices(codes)
        skin = self.deca.vertex_albedo[None] * torch.tensor([lk.skin_gain for lk in looks],
                                                            dtype=torch.float32)[:, None]
        hair = torch.tensor([lk.hair for lk in looks], dtype=torch.float32)[:, None]
        w = self.hair_weight[None, :, None]
        albedo = (1 - w) * skin + w * hair
        buffers = self.deca.renderer.render(vertices, albedo, codes.light,
                                            self.deca.cameras(codes), big, big)
        mask = buffers.mask[..., 0]
        colour = buffers.rendered + _highlight(buffers.normal, codes.light)
        rows = torch.linspace(0.0, 1.0, big)[None, :, None, None]
        top = torch.tensor([lk.background_top for lk in looks])[:, None, None]
        bottom = torch.tensor([lk.background_bottom for lk in looks])[:, None, None]
        background = top * (1 - rows) + bottom * rows
        image = torch.where(mask[..., None] > 0, colour.clamp(0, 1), background)
        image = _box_down(image, self.supersample)
        coverage = _box_down(mask[..., None], self.supersample)[..., 0]
        return (np.round(image.numpy() * 255).astype(np.uint8), coverage.numpy())

    @torch.no_grad()
    def regions(self, params: list[RigParams], size: int | None = None) -> dict[str, np.ndarray]:
        """Boolean masks [B, S, S] of the regions appearance is measured on: ``face`` (skin:
        covered, little hair), ``hair`` (covered, mostly hair) and ``background`` (not covered,
        with a margin); pixel-exact at ``size`` (no supersampling)."""
        size = size or self.size
        codes = self.deca.codes(params, size * 2, size * 2)
        vertices = self.deca.vertices(codes)
        w = self.hair_weight[:, None].expand(-1, 3)
        buffers = self.deca.renderer.render(vertices, w, codes.light,
                                            self.deca.cameras(codes), size * 2, size * 2)
        cover = _box_down(buffers.mask, 2)[..., 0]
        hair = _box_down(buffers.albedo[..., :1], 2)[..., 0]
        near = torch.nn.functional.max_pool2d(cover[:, None], 5, 1, 2)[:, 0]
        return {"face": ((cover > 0.99) & (hair < 0.1)).numpy(),
                "hair": ((cover > 0.99) & (hair > 0.8)).numpy(),
                "background": (near == 0).numpy()}

    # ---------------------------------------------------------------- dataset
    def write_dataset(self, folder, count: int, seed: int = 0, chunk: int = 16,
                      log=None) -> list[str]:
        """Write samples 0..count-1 (module notes); returns their stems."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        world_path = folder / WORLD_FILE
        world = json.loads(world_path.read_text()) if world_path.is_file() else {}
        settings = {"seed": seed, "size": self.size, "supersample": self.supersample,
                    "face_model": self.model.data.name}
        if world.get("settings", settings) != settings:
            raise ValueError(f"{folder} holds a world written with {world['settings']}, not "
                             f"{settings}: use another folder")
        looks = world.get("looks", {})
        stems = [f"{i:06d}_world" for i in range(count)]
        todo = [i for i, stem in enumerate(stems)
                if not ((folder / f"{stem}.png").is_file() and (folder / f"{stem}.json").is_file()
                        and stem in looks)]
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            pairs = [self.sample(i, seed) for i in part]
            images, _ = self.render([p for p, _ in pairs], [lk for _, lk in pairs])
            for i, image, (params, look) in zip(part, images, pairs):
                (folder / f"{stems[i]}.json").write_text(params.to_json())
                Image.fromarray(image).save(folder / f"{stems[i]}.png")
                looks[stems[i]] = look.to_dict()
            _write_json(world_path, {"settings": settings, "looks": looks})
            if log:
                log(f"world: {min(start + chunk, len(todo))}/{len(todo)} samples written")
        _write_json(world_path, {"settings": settings, "looks": looks})
        return stems


def read_world(folder) -> dict[str, Look]:
    """Stem -> ``Look`` of a dataset folder ``write_dataset`` wrote."""
    world = json.loads((Path(folder) / WORLD_FILE).read_text())
    return {stem: Look.from_dict(look) for stem, look in world["looks"].items()}


def euler_to_axis_angle(yaw: float, pitch: float, roll: float) -> list[float]:
    """Axis-angle of R = R_y(yaw) R_x(pitch) R_z(roll) (radians; yaw turns the face towards
    +X, the image's right)."""
    from portrait_rig.rotations import matrix_to_axis_angle
    return [float(v) for v in matrix_to_axis_angle(euler_matrix(yaw, pitch, roll))]


def euler_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_x = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_z = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_y @ r_x @ r_z


def yaw_pitch_roll(axis_angle) -> tuple[float, float, float]:
    """Inverse of ``euler_matrix``: (yaw, pitch, roll) radians of an axis-angle rotation."""
    from portrait_rig.rotations import axis_angle_to_matrix
    r = axis_angle_to_matrix(np.asarray(axis_angle, dtype=np.float64))
    pitch = math.asin(max(-1.0, min(1.0, -r[1, 2])))
    yaw = math.atan2(r[0, 2], r[2, 2])
    roll = math.atan2(r[1, 0], r[1, 1])
    return yaw, pitch, roll


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.sin(a) * math.cos(e), math.sin(e), math.cos(a) * math.cos(e)])


def _hair_weight(template: np.ndarray) -> torch.Tensor:
    """[V] in [0, 1]: 1 on the scalp and the back of the head, 0 on the face, smooth between
    (from the template's normalised coordinates)."""
    lo, hi = template.min(0), template.max(0)
    u = (template - (lo + hi) / 2) / ((hi - lo) / 2)           # each axis in [-1, 1]
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    scalp = _smoothstep(0.25, 0.45, y + 0.35 * np.clip(-z, 0, None))
    back = _smoothstep(-0.05, -0.35, z) * _smoothstep(-0.55, -0.2, y)
    sides = _smoothstep(0.8, 0.95, np.abs(x)) * _smoothstep(-0.2, 0.1, y)
    weight = np.clip(np.maximum(np.maximum(scalp, back), sides), 0.0, 1.0)
    return torch.as_tensor(weight, dtype=torch.float32)


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _highlight(normal: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Blinn-Phong highlight [B, H, W, 3] of the light's dominant direction, seen from +Z."""
    band1 = light[:, 1:4]                                        # [B, 3(xyz), 3(rgb)]
    strength = band1.norm(dim=1) * SH_CONSTANTS[1]              # [B, 3]
    d = band1.mean(dim=2)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-9)
    half = d + torch.tensor([0.0, 0.0, 1.0])
    half = half / half.norm(dim=1, keepdim=True).clamp_min(1e-9)
    n_dot_h = (normal * half[:, None, None]).sum(-1).clamp_min(0.0)
    return SPECULAR * n_dot_h[..., None] ** SHININESS * strength[:, None, None]


def _box_down(image: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, H / factor, W / factor, C], each pixel the mean of its block."""
    if factor == 1:
        return image
    return torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
