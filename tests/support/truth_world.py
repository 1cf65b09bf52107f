"""A generator whose truth is known: StyleGAN's interface over a rendered face model.

``TruthWorld`` offers exactly what the StyleRig pipeline reads from a StyleGAN generator -
``z_dim``, ``w_dim``, ``num_ws``, ``c_dim`` (0), ``img_resolution``, ``config.architecture``,
``mapping(z, c, truncation_psi, truncation_cutoff)`` -> W+ [B, num_ws, w_dim] and
``synthesis(ws, noise_mode)`` -> images [B, 3, R, R] in [-1, 1] - but its images are renders of
the face model under rig parameters it knows exactly:

* ``mapping``: z (2nd-moment normalised) -> a fixed random 2-layer leaky-ReLU MLP -> w,
  broadcast to the num_ws layers and truncated towards ``w_avg`` like StyleGAN's. Its outputs
  (untruncated) define the W distribution: mean ``w_mean`` and whitening ``w_whiten``
  (inverse square root of the covariance), measured on ``STATISTICS_SAMPLES`` draws.
* ``truth(ws)`` = M: W+ -> ``FaceParams`` (the same parameters DFR's F predicts). Each group of
  parameters reads its own mixture of the layers' standardised latents
  u_k = (w_k - w_mean) / w_scale (a Gaussian profile over
  the layers: coarse layers for pose, framing and identity shape, middle ones for expression
  and light, fine ones for albedo, background and the colour cast, as the StyleRig paper
  (Fig. 4) found StyleGAN's layers to act), then a fixed random non-linear map
  y = B tanh(A x) standardised over W, then a physical range (see ``GROUPS``). Groups read
  random, mutually non-orthogonal directions of the same latent space: moving w along one
  group's direction moves the others too (entangled, as StyleGAN's W is).
* ``content(ws)``: what the rig does not model: a vertical background gradient (two RGB
  colours) and a colour cast (RGB gains over the whole image).
* ``synthesis(ws)``: our differentiable renderer's image of the face model under
  ``truth(ws)`` (albedo x SH shading in DECA's code values, the convention F's rendering loss
  uses) over the background, times the cast, degraded by ``degradation(ws)``: latents far
  from the W distribution (per-layer Mahalanobis distance |u_k| / sqrt(w_dim) above
  ``DEGRADE_FROM``) get noise and lose contrast, as StyleGAN's images do off its latent
  distribution.

``save_world`` / ``load_world`` write and read a safetensors file (tensors + config JSON).
The StyleRig stages load generators by file; ``serving_worlds()`` makes their loader return
the world for such files, so the shipped CLI runs on it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from portrait_rig import sh as sh_code
from server.models.dfr import FaceParamLayout, FaceParams
from server.renderer import sh_basis
from server.training.stylerig.data import load_face
from server.training.stylerig.face_render import FaceRenderer
from server.training.stylerig.landmarks import framing_camera

WORLD_FORMAT = "portrait-rig.truth-world"
STATISTICS_SAMPLES = 16384
DEGRADE_FROM, DEGRADE_SPAN = 1.3, 1.0    # degradation 0 below 1.3 x sqrt(w_dim), 1 at 2.3


@dataclass(frozen=True)
class WorldConfig:
    face_model: str = "demo"           # 'demo' or a FaceData .npz / FLAME .pkl
    embedding: str | None = None       # its landmark embedding (None: detected on a render)
    z_dim: int = 64
    w_dim: int = 64
    num_ws: int = 10                   # as a 64 px StyleGAN2
    img_resolution: int = 128
    hidden: int = 24                   # features of each group's map
    seed: int = 0
    architecture: ClassVar[str] = "truth-world"

    def to_dict(self) -> dict:
        return asdict(self)


# Group -> (centre of its layer profile in [0, 1] = coarse .. fine, outputs). None: sized by
# the face model. Profiles are Gaussians of width PROFILE_WIDTH over the layer positions.
GROUPS = {"pose": (0.05, 3), "camera": (0.1, 3), "shape": (0.15, None),
          "expression": (0.4, None), "jaw": (0.4, 1), "light": (0.55, 7),
          "albedo": (0.8, None), "background": (0.85, 6), "cast": (0.95, 3)}
PROFILE_WIDTH = 0.18
DEG = math.pi / 180


def _soft(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Identity near 0, saturating at +-limit."""
    return limit * torch.tanh(x / limit)


class WorldMapping(nn.Module):
    """z [B, z_dim] -> ws [B, num_ws, w_dim] (StyleGAN's mapping interface)."""

    def __init__(self, z_dim: int, w_dim: int, num_ws: int, generator: torch.Generator):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.c_dim = z_dim, w_dim, num_ws, 0
        self.register_buffer("fc0", torch.randn(w_dim, z_dim, generator=generator) / z_dim ** 0.5)
        self.register_buffer("fc1", torch.randn(w_dim, w_dim, generator=generator) / w_dim ** 0.5)
        self.register_buffer("b0", 0.3 * torch.randn(w_dim, generator=generator))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def w(self, z: torch.Tensor) -> torch.Tensor:
        """[B, w_dim] untruncated."""
        x = z * (z.square().mean(1, keepdim=True) + 1e-8).rsqrt()
        x = nn.functional.leaky_relu(x @ self.fc0.T + self.b0, 0.2) * 2 ** 0.5
        return nn.functional.leaky_relu(x @ self.fc1.T, 0.2) * 2 ** 0.5

    def forward(self, z: torch.Tensor, c=None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **_) -> torch.Tensor:
        ws = self.w(z.float()).unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
        return ws


class TruthWorld(nn.Module):
    """See the module notes. Every tensor is a buffer: the world never trains."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        super().__init__()
        self.config = config
        self.z_dim, self.w_dim, self.num_ws = config.z_dim, config.w_dim, config.num_ws
        self.c_dim, self.img_resolution, self.img_channels = 0, config.img_resolution, 3
        self.face, self.embedding = load_face(config.face_model, config.embedding)
        self.layout = FaceParamLayout.for_model(self.face)
        self.renderer = FaceRenderer(self.face, self.embedding, self.layout)
        g = torch.Generator().manual_seed(config.seed)
        self.mapping = WorldMapping(config.z_dim, config.w_dim, config.num_ws, g)
        self.synthesis = _Synthesis(self)

        sizes = {"shape": self.layout.n_shape, "expression": self.layout.n_expression,
                 "albedo": 3 * self.layout.albedo_terms}
        self.groups = {name: sizes.get(name) or count for name, (_, count) in GROUPS.items()}
        position = torch.linspace(0, 1, config.num_ws)
        for name, (centre, _) in GROUPS.items():
            profile = torch.exp(-0.5 * ((position - centre) / PROFILE_WIDTH) ** 2)
            self.register_buffer(f"{name}_profile", profile / profile.sum())
            self.register_buffer(f"{name}_A", 1.5 * torch.randn(config.hidden, config.w_dim,
                                                                generator=g) / config.w_dim ** 0.5)
            self.register_buffer(f"{name}_B", torch.randn(self.groups[name], config.hidden,
                                                          generator=g) / config.hidden ** 0.5)
            self.register_buffer(f"{name}_mean", torch.zeros(self.groups[name]))
            self.register_buffer(f"{name}_std", torch.ones(self.groups[name]))
        self.register_buffer("w_mean", torch.zeros(config.w_dim))
        self.register_buffer("w_scale", torch.ones([]))
        self.register_buffer("w_whiten", torch.eye(config.w_dim))
        self.register_buffer("noise", torch.randn(3, config.img_resolution,
                                                  config.img_resolution, generator=g))
        camera = framing_camera(self.face)
        self.register_buffer("camera0", torch.tensor([camera.scale, camera.tx, camera.ty]))
        self._measure_statistics(g)

    @torch.no_grad()
    def _measure_statistics(self, g: torch.Generator) -> None:
        """w_avg, the W distribution's mean and whitening, and each group's output statistics,
        from fixed-seed draws of the untruncated mapping."""
        w = self.mapping.w(torch.randn(STATISTICS_SAMPLES, self.z_dim, generator=g))
        self.mapping.w_avg.copy_(w.mean(0))
        self.w_mean.copy_(w.mean(0))
        self.w_scale.copy_(w.var(0).mean().sqrt())
        values, vectors = torch.linalg.eigh(torch.cov(w.T.double()))
        self.w_whiten.copy_((vectors * values.clamp_min(1e-8).rsqrt()) @ vectors.T)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        for name in GROUPS:
            y = self._features(name, ws)
            getattr(self, f"{name}_mean").copy_(y.mean(0))
            getattr(self, f"{name}_std").copy_(y.std(0).clamp_min(1e-6))

    # ------------------------------------------------------------------ M and the content
    def _centred(self, ws: torch.Tensor) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws: expected [B, {self.num_ws}, {self.w_dim}], "
                             f"got {list(ws.shape)}")
        return ws.float() - self.w_mean

    def whitened(self, ws: torch.Tensor) -> torch.Tensor:
        """[B, num_ws, w_dim]: each layer's latent in W's whitened coordinates."""
        return self._centred(ws) @ self.w_whiten.T

    def _features(self, name: str, ws: torch.Tensor) -> torch.Tensor:
        u = self._centred(ws) / self.w_scale
        x = torch.einsum("k,bkd->bd", getattr(self, f"{name}_profile"), u)
        return torch.tanh(x @ getattr(self, f"{name}_A").T) @ getattr(self, f"{name}_B").T

    def outputs(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each group's standardised outputs y [B, n] (about unit spread over W)."""
        return {name: (self._features(name, ws) - getattr(self, f"{name}_mean"))
                / getattr(self, f"{name}_std") for name in GROUPS}

    def truth(self, ws: torch.Tensor) -> FaceParams:
        """M(ws): the face parameters the image of ``ws`` shows, exactly."""
        y = self.outputs(ws)
        pose = torch.stack([_soft(12 * DEG * y["pose"][:, 0], 25 * DEG),       # pitch
                            _soft(25 * DEG * y["pose"][:, 1], 50 * DEG),       # yaw
                            _soft(4 * DEG * y["pose"][:, 2], 10 * DEG)], 1)    # roll
        jaw = torch.zeros_like(pose)
        jaw[:, 0] = 0.25 * torch.sigmoid(1.5 * y["jaw"][:, 0] - 1.0)
        camera = torch.stack([self.camera0[0] * torch.exp(0.03 * y["camera"][:, 0]),
                              self.camera0[1] + 0.004 * y["camera"][:, 1],
                              self.camera0[2] + 0.004 * y["camera"][:, 2]], 1)
        albedo = y["albedo"].clone()
        albedo[:, :3] *= 0.06                     # global RGB gain
        albedo[:, 3:] *= 0.05                     # ramps across the head
        return FaceParams(shape=_soft(0.8 * y["shape"], 2.0),
                          expression=_soft(y["expression"], 2.0),
                          global_pose=pose, jaw=jaw, camera=camera,
                          sh=self.light(y["light"]), albedo=albedo)

    def light(self, y: torch.Tensor) -> torch.Tensor:
        """DECA SH code [B, 9, 3]: a tinted ambient light plus a key light from a direction in
        the frontal hemisphere, whose shading at its own direction is its strength."""
        ambient = 0.65 * torch.exp(0.15 * y[:, 0])
        key = 0.9 * torch.sigmoid(1.2 * y[:, 1] + 0.3)
        azimuth = 60 * DEG * torch.tanh(0.8 * y[:, 2])
        elevation = 35 * DEG * torch.tanh(0.8 * y[:, 3])
        direction = torch.stack([azimuth.sin() * elevation.cos(), elevation.sin(),
                                 azimuth.cos() * elevation.cos()], 1)
        tint = torch.exp(0.08 * y[:, 4:7])                                     # [B, 3]
        # A distant light's plain SH projection (Y_lm(d)) as a DECA code, scaled so that its
        # shading at its own direction is ``key`` (portrait_rig.sh: code = L_lm, / pi for l > 0).
        shading_basis = sh_basis(direction)                                    # [B, 9]
        constants = torch.as_tensor(sh_code.SH_CONSTANTS, dtype=torch.float32)
        to_code = torch.as_tensor(sh_code.ORTHONORMAL, dtype=torch.float32) \
            * torch.tensor([1.0] + [1 / math.pi] * 8)
        unit = shading_basis / constants * to_code
        code = unit * (key / (unit * shading_basis).sum(1))[:, None]
        code[:, 0] += ambient * math.sqrt(4 * math.pi)
        return code[:, :, None] * tint[:, None, :]

    def content(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the rig does not model: 'background' [B, 2, 3] (top and bottom colours, code
        values) and 'cast' [B, 3] (RGB gains)."""
        y = self.outputs(ws)
        return {"background": (0.1 + 0.8 * torch.sigmoid(1.2 * y["background"])).reshape(-1, 2, 3),
                "cast": torch.exp(0.03 * y["cast"])}

    def degradation(self, ws: torch.Tensor) -> torch.Tensor:
        """[B] in [0, 1]: 0 on the W distribution, growing with the mean per-layer
        Mahalanobis distance beyond ``DEGRADE_FROM`` x sqrt(w_dim)."""
        distance = self.whitened(ws).norm(dim=2).mean(1) / self.w_dim ** 0.5
        return ((distance - DEGRADE_FROM) / DEGRADE_SPAN).clamp(0, 1)

    # ------------------------------------------------------------------ images
    def render(self, p: FaceParams, content: dict, degradation: torch.Tensor, size: int,
               noise_mode: str = "const") -> torch.Tensor:
        """[B, 3, size, size] in [-1, 1]: faces ``p`` over the content, degraded."""
        buffers, _ = self.renderer.render(p, size)
        mask = buffers.mask.permute(0, 3, 1, 2)
        face = buffers.rendered.permute(0, 3, 1, 2)
        t = torch.linspace(0, 1, size, device=face.device)[None, None, :, None]
        top, bottom = content["background"][:, 0, :, None, None], \
            content["background"][:, 1, :, None, None]
        image = (mask * face + (1 - mask) * (top + (bottom - top) * t)) \
            * content["cast"][:, :, None, None]
        if noise_mode != "none":
            noise = (self.noise if size == self.img_resolution else
                     torch.randn(3, size, size, generator=torch.Generator().manual_seed(1)))
            if noise_mode == "random":
                noise = torch.randn_like(image)
            d = degradation[:, None, None, None]
            image = image + d * (0.5 - image) * 0.6 + d * 0.25 * noise
        return image.clamp(0, 1) * 2 - 1

    def landmarks(self, ws: torch.Tensor, size: int) -> np.ndarray:
        """The 68 landmarks of ``ws``'s faces, exactly: float32 [B, 68, 2] in pixels of a
        ``size`` frame, dlib's convention (what a perfect detector would report)."""
        with torch.no_grad():
            p = self.truth(ws)
            points = self.renderer.landmarks(self.renderer.vertices(p),
                                             self.renderer.cameras(p), size)
        return (points - 0.5).numpy().astype(np.float32)


class _Synthesis(nn.Module):
    """ws [B, num_ws, w_dim] -> images [B, 3, R, R] in [-1, 1] (StyleGAN's synthesis
    interface)."""

    def __init__(self, world: TruthWorld):
        super().__init__()
        self._world = [world]              # not a submodule: no parameter cycle

    def forward(self, ws: torch.Tensor, noise_mode: str = "const", **_) -> torch.Tensor:
        world = self._world[0]
        with torch.no_grad():
            return world.render(world.truth(ws), world.content(ws), world.degradation(ws),
                                world.img_resolution, noise_mode)


# --------------------------------------------------------------------------------------------
# Files

def save_world(world: TruthWorld, path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in world.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": WORLD_FORMAT,
                                            "config": json.dumps(world.config.to_dict())})


def is_world_file(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == WORLD_FORMAT
    except Exception:                       # not a safetensors file at all
        return False


def load_world(path, device="cpu") -> TruthWorld:
    from safetensors import safe_open

    if str(device) != "cpu":
        raise ValueError("the truth world renders on the CPU")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != WORLD_FORMAT:
            raise ValueError(f"{path}: not a truth-world file")
        state = {k: f.get_tensor(k) for k in f.keys()}
    world = TruthWorld(WorldConfig(**json.loads(meta["config"])))
    world.load_state_dict(state, strict=True)
    return world.eval()


# The StyleRig stages that load a generator by file, each through its own imported name.
_STAGE_MODULES = ("server.training.stylerig.corpus", "server.training.stylerig.train_rignet",
                  "server.training.stylerig.evaluate")


@contextlib.contextmanager
def serving_worlds():
    """Within the block, the StyleRig stages load truth-world files as their generator (other
    files as before), so ``python -m server.training.stylerig`` runs in-process on a world
    exactly as it does on a StyleGAN file."""
    import importlib

    modules = [importlib.import_module(name) for name in _STAGE_MODULES]
    originals = [m.load_generator for m in modules]

    def loader(original):
        def load(path, device="cpu", *args, **kwargs):
            if is_world_file(path):
                return load_world(path, device)
            return original(path, device, *args, **kwargs)
        return load

    try:
        for module, original in zip(modules, originals):
            module.load_generator = loader(original)
        yield
    finally:
        for module, original in zip(modules, originals):
            module.load_generator = original


def write_true_landmarks(corpus_dir, world: TruthWorld) -> None:
    """Give every shard of a corpus sampled from ``world`` its exact landmarks (the landmark
    stage's file layout, source 'truth-world': a perfect detector, for face models dlib
    cannot see, such as the tests' sphere head)."""
    from server.training.stylerig.corpus import Corpus

    corpus = Corpus(corpus_dir)
    for shard in corpus.shards:
        ws = torch.from_numpy(np.load(shard / "w.npy"))
        points = world.landmarks(ws, corpus.image_size)
        n = len(points)
        np.savez(shard / "landmarks.npz", landmarks=points, found=np.ones(n, bool),
                 score=np.ones(n, np.float32), source=np.array("truth-world"))
