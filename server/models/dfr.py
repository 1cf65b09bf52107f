"""StyleRig's differentiable face reconstruction F: a W+ latent -> the face parameters it shows.

F (Tewari et al. 2020, sec. 4) is a 3-layer MLP with ELU activations that reads the whole
W+ code and predicts the parameters of a face model whose rendering matches the generator's
image. Ours gives each parameter group (shape, expression, pose, jaw, camera, light, albedo)
its own such MLP (``heads``, the default for new networks), all reading the whole code: in one
shared MLP the groups compete for the same hidden features. Where the truth is known
(``tests/support/truth_world.py``, 10 x 64 W+, 2000 steps), heads 128 wide against one MLP
512 wide (0.70 M against 0.63 M weights; 8.4 M against 5.1 M on an 18 x 512 W+): pose error
4.3 -> 3.7 deg, jaw 2.1 -> 1.7 deg, expression correlation 0.80 -> 0.83, shading
10.9 -> 8.2 %. Networks written with one shared MLP (``heads`` false) load and run as they
were.

Here the face model is any FLAME-layout ``FaceData`` (FLAME, or the demo head) with
DECA's camera and light conventions.

Face parameters (``FaceParams``; batch tensors, float32; layout ``FaceParamLayout``):

    shape        [B, S]     identity coefficients 0..S-1, S = min(n_shape, 100) (DECA)
    expression   [B, E]     expression coefficients 0..E-1, E = min(n_expression, 50) (DECA)
    global_pose  [B, 3]     axis-angle of FLAME joint 0 (radians, model frame)
    jaw          [B, 3]     axis-angle of FLAME joint 2
    camera       [B, 3]     DECA orthographic (s, tx, ty): NDC = s * (X + [tx, ty])
    sh           [B, 9, 3]  DECA SH light code
    albedo       [B, 3K]    log-gain field over the model's own vertex albedo: coefficient
                            3 * k + rgb multiplies basis function k of ``albedo_basis`` (k = 0:
                            the constant, a global RGB gain; k = 1..3: linear ramps across the
                            head in x, y, z). The FaceData formats carry no texture space, so
                            the albedo a model ships is tinted, never replaced.

F's raw output r is mapped to these around anchors set from the training corpus (so an
untrained F already renders a plausible face in the right place): camera s = s0 * exp(r_s),
(tx, ty) = (tx0, ty0) + r_t / s0 (raw units are NDC); sh = sh0 + r_sh * a, a = |mean of sh0's
band 0| (the ambient level); every other field is r itself. The input is standardised,
(w - w_mean) / w_scale, with the corpus' statistics.

Files: ``save_dfr`` / ``load_dfr`` (safetensors, config as JSON metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from portrait_rig.face_data import FaceData

from server.models.deca_encoder import N_EXPRESSION as DECA_EXPRESSION, N_SHAPE as DECA_SHAPE
from server.models.rignet import MODES, ControlLayout, control_vector

ALBEDO_TERMS = (1, 4)                     # constant; constant + linear ramps in x, y, z


@dataclass(frozen=True)
class FaceParamLayout:
    """Sizes of the face parameters (see the module notes); ``albedo_terms`` is K."""
    n_shape: int
    n_expression: int
    albedo_terms: int = 4

    def __post_init__(self):
        for name, limit in (("n_shape", DECA_SHAPE), ("n_expression", DECA_EXPRESSION)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise ValueError(f"{name}: expected an integer in 0..{limit}, got {value!r}")
        if self.albedo_terms not in ALBEDO_TERMS:
            raise ValueError(f"albedo_terms: expected one of {ALBEDO_TERMS}, "
                             f"got {self.albedo_terms!r}")

    @classmethod
    def for_model(cls, data: FaceData, albedo_terms: int = 4) -> "FaceParamLayout":
        return cls(min(data.n_shape, DECA_SHAPE), min(data.n_expression, DECA_EXPRESSION),
                   albedo_terms)

    @property
    def sizes(self) -> dict[str, int]:
        return {"shape": self.n_shape, "expression": self.n_expression, "global_pose": 3,
                "jaw": 3, "camera": 3, "sh": 27, "albedo": 3 * self.albedo_terms}

    @property
    def dim(self) -> int:
        return sum(self.sizes.values())

    def control_layout(self) -> ControlLayout:
        return ControlLayout(self.n_expression)

    def to_dict(self) -> dict:
        return {"n_shape": self.n_shape, "n_expression": self.n_expression,
                "albedo_terms": self.albedo_terms}


@dataclass
class FaceParams:
    """A batch of face parameters (see the module notes for shapes and conventions)."""
    shape: torch.Tensor
    expression: torch.Tensor
    global_pose: torch.Tensor
    jaw: torch.Tensor
    camera: torch.Tensor
    sh: torch.Tensor
    albedo: torch.Tensor

    @classmethod
    def from_vector(cls, vector: torch.Tensor, layout: FaceParamLayout) -> "FaceParams":
        """[B, layout.dim] in field order -> FaceParams (views)."""
        if vector.ndim != 2 or vector.shape[1] != layout.dim:
            raise ValueError(f"face parameters: expected [B, {layout.dim}], "
                             f"got {list(vector.shape)}")
        parts = dict(zip(layout.sizes, vector.split(list(layout.sizes.values()), dim=1)))
        parts["sh"] = parts["sh"].reshape(-1, 9, 3)
        return cls(**parts)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __len__(self) -> int:
        return self.shape.shape[0]

    def controls(self, layout: ControlLayout) -> torch.Tensor:
        """RigNet's control vector [B, layout.dim] (differentiable)."""
        return control_vector(self.as_dict(), layout)

    def take(self, other: "FaceParams", modes: Sequence[str]) -> "FaceParams":
        """Row i: this face with the fields of edit mode ``modes[i]`` taken from ``other``."""
        if len(modes) != len(self) or len(other) != len(self):
            raise ValueError(f"take: {len(self)} and {len(other)} faces, {len(modes)} modes")
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        out = {}
        for name, mine in self.as_dict().items():
            chosen = torch.tensor([name in MODES[m] for m in modes], device=mine.device)
            chosen = chosen.reshape(-1, *[1] * (mine.ndim - 1))
            out[name] = torch.where(chosen, getattr(other, name), mine)
        return FaceParams(**out)

    def map(self, fn) -> "FaceParams":
        return FaceParams(**{k: fn(v) for k, v in self.as_dict().items()})

    @staticmethod
    def cat(items: Sequence["FaceParams"]) -> "FaceParams":
        return FaceParams(**{k: torch.cat([getattr(p, k) for p in items]) for k in
                             (f.name for f in fields(FaceParams))})

def albedo_basis(data: FaceData, terms: int) -> np.ndarray:
    """[V, terms] float32 smooth functions over the template: 1, then (x, y, z) centred on the
    bounding box and divided by its half extents (so each ramp spans [-1, 1])."""
    if terms not in ALBEDO_TERMS:
        raise ValueError(f"terms: expected one of {ALBEDO_TERMS}, got {terms!r}")
    verts = data.v_template.astype(np.float64)
    lo, hi = verts.min(0), verts.max(0)
    ramps = (verts - (lo + hi) / 2) / np.maximum((hi - lo) / 2, 1e-9)
    columns = [np.ones(len(verts))] + ([ramps[:, i] for i in range(3)] if terms == 4 else [])
    return np.stack(columns, axis=1).astype(np.float32)


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """Linear, ELU, Linear, ELU, Linear (tensors '0', '2', '4'); the last starts small, so that
    raw outputs start near 0 (the anchors)."""
    layers = nn.Sequential(nn.Linear(inputs, hidden), nn.ELU(), nn.Linear(hidden, hidden),
                           nn.ELU(), nn.Linear(hidden, outputs))
    with torch.no_grad():
        layers[4].weight.mul_(0.01)
        layers[4].bias.zero_()
    return layers


class FaceReconstructionNet(nn.Module):
    """F: w [B, num_ws, w_dim] -> ``FaceParams``.

    ``heads`` true: ``heads.<field>`` (one per ``layout.sizes`` field) each an MLP
    num_ws * w_dim -> hidden -> hidden -> the field's size, tensors ``heads.<field>.0|2|4``.
    ``heads`` false (the paper's): ``fc0`` (num_ws * w_dim -> hidden), ``fc1`` (hidden ->
    hidden), ``fc2`` (hidden -> layout.dim). ELU after every layer but the last.
    Buffers: ``w_mean`` [num_ws, w_dim], ``w_scale`` [], ``camera_anchor`` [3] (s0, tx0, ty0),
    ``sh_anchor`` [9, 3] (see the module notes)."""

    def __init__(self, num_ws: int, w_dim: int, layout: FaceParamLayout, hidden: int = 128,
                 heads: bool = True):
        super().__init__()
        for name, value in (("num_ws", num_ws), ("w_dim", w_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        self.num_ws, self.w_dim, self.hidden, self.layout = num_ws, w_dim, hidden, layout
        self.has_heads = bool(heads)
        inputs = num_ws * w_dim
        if self.has_heads:
            self.heads = nn.ModuleDict({field: _mlp(inputs, hidden, size)
                                        for field, size in layout.sizes.items()})
        else:
            mlp = _mlp(inputs, hidden, layout.dim)
            self.fc0, self.fc1, self.fc2 = mlp[0], mlp[2], mlp[4]
        self.register_buffer("w_mean", torch.zeros(num_ws, w_dim))
        self.register_buffer("w_scale", torch.ones([]))
        self.register_buffer("camera_anchor", torch.tensor([8.0, 0.0, 0.0]))
        sh = torch.zeros(9, 3)
        sh[0] = 0.5 * (4 * torch.pi) ** 0.5             # uniform grey light of radiance 0.5
        self.register_buffer("sh_anchor", sh)

    def config(self) -> dict:
        return {"num_ws": self.num_ws, "w_dim": self.w_dim, "hidden": self.hidden,
                "heads": self.has_heads, "layout": self.layout.to_dict()}

    def raw(self, w: torch.Tensor) -> torch.Tensor:
        """The MLP's output [B, layout.dim] before the mapping to parameters."""
        if w.ndim != 3 or w.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w: expected [B, {self.num_ws}, {self.w_dim}], got {list(w.shape)}")
        x = ((w - self.w_mean) / self.w_scale).flatten(1)
        if self.has_heads:
            return torch.cat([head(x) for head in self.heads.values()], dim=1)
        x = nn.functional.elu(self.fc0(x))
        x = nn.functional.elu(self.fc1(x))
        return self.fc2(x)

    def forward(self, w: torch.Tensor) -> FaceParams:
        p = FaceParams.from_vector(self.raw(w), self.layout)
        s0, t0 = self.camera_anchor[0], self.camera_anchor[1:]
        camera = torch.cat([s0 * p.camera[:, :1].exp(), t0 + p.camera[:, 1:] / s0], dim=1)
        ambient = self.sh_anchor[0].mean().abs().clamp_min(1e-3)
        return FaceParams(shape=p.shape, expression=p.expression, global_pose=p.global_pose,
                          jaw=p.jaw, camera=camera, sh=self.sh_anchor + p.sh * ambient,
                          albedo=p.albedo)

    @torch.no_grad()
    def set_anchors(self, w_mean: torch.Tensor, w_scale: float, camera: Sequence[float],
                    sh: torch.Tensor) -> None:
        """Input statistics and output anchors (see the module notes)."""
        if not (w_scale > 0 and camera[0] > 0):
            raise ValueError(f"w_scale and the camera scale must be positive, got {w_scale}, "
                             f"{camera[0]}")
        self.w_mean.copy_(w_mean)
        self.w_scale.fill_(float(w_scale))
        self.camera_anchor.copy_(torch.as_tensor(camera, dtype=torch.float32))
        self.sh_anchor.copy_(sh)
