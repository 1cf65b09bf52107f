"""RigNet (StyleRig, Tewari et al. CVPR 2020): face-rig controls -> an edit of a W+ latent.

For every StyleGAN layer k, a linear encoder compresses w_k [w_dim] to l_k [latent_dim] and a
linear decoder maps the concatenation [l_k, p] to an offset d_k [w_dim]; the output is
w_hat = w + d. One network takes pose, expression and lighting together: editing one of them
means changing only its part of p (the others stay those of the original face), and
``RigNet(w, controls of the face w shows) ~= w`` is what training anchors it to.

Control vector layout (``ControlLayout``), float32 [B, control_dim], control_dim = 33 + E, in
the FLAME/DECA conventions of ``portrait_rig.params``:

    [0:3]           global pose, axis-angle (radians) of FLAME joint 0, model frame
    [3:6]           jaw pose, axis-angle of FLAME joint 2 (local)
    [6:6+E]         expression coefficients 0..E-1 of the face model in use,
                    E = min(n_expression, 50) (DECA's expression code size)
    [6+E:33+E]      SH light: DECA's [9, 3] code flattened row-major (index 3 * k + rgb)

Edit modes (``MODES``) group the controls that change together: 'pose' = global pose;
'expression' = expression and jaw (as DECA and DiffusionRig swap them); 'lighting' = SH.

Light requests: F reads an image's light as the SH code of the shading it sees, and codes that
shade the visible (camera-facing) normals alike are not told apart by an image (the ambient
term, a frontal key light and band 2 trade against each other), so F's codes fill only part of
the SH space and RigNet learns requests from that part. A rig states its light exactly and may
sit anywhere in the unseen directions. ``request_controls`` maps a requested SH code to the
code F's distribution makes most likely for the same shading on the visible normals (a
Gaussian conditional: mean ``light_mean`` [27] and the linear map ``light_map`` [27, 27] set
with the other statistics; identity for files written without them).

Files: ``save_rignet`` writes safetensors with the network's config (and the control layout)
as JSON metadata; ``load_rignet`` reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from portrait_rig.params import Lighting, RigParams
from server.models.deca_encoder import N_EXPRESSION

MAX_CONTROLLED_EXPRESSION = N_EXPRESSION  # DECA's expression code size
CONTROL_FIELDS = ("global_pose", "jaw", "expression", "sh")
MODES = {"pose": ("global_pose",), "expression": ("expression", "jaw"), "lighting": ("sh",)}
# Ridge of the light map: shading differences (SH shading per normal and channel, squared)
# below it count as unseen; the map changes little between 2e-5 and 2e-3.
LIGHT_RIDGE = 1e-4


@dataclass(frozen=True)
class ControlLayout:
    """Where each control sits in the control vector (see the module notes)."""
    n_expression: int

    def __post_init__(self):
        n = self.n_expression
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_CONTROLLED_EXPRESSION:
            raise ValueError(f"n_expression: expected an integer in 0..{MAX_CONTROLLED_EXPRESSION},"
                             f" got {n!r}")

    @classmethod
    def for_model(cls, n_expression: int) -> "ControlLayout":
        """The layout for a face model with ``n_expression`` expression components."""
        return cls(min(int(n_expression), MAX_CONTROLLED_EXPRESSION))

    @classmethod
    def for_dim(cls, dim: int) -> "ControlLayout":
        """The layout whose vector has ``dim`` entries (for RigNet files without a layout)."""
        fixed = cls(0).dim
        if dim < fixed:
            raise ValueError(f"{dim} controls, fewer than the {fixed} of pose, jaw and light")
        return cls(dim - fixed)

    @property
    def sizes(self) -> dict[str, int]:
        return {"global_pose": 3, "jaw": 3, "expression": self.n_expression, "sh": 27}

    @property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in self.sizes.items():
            out[name] = slice(start, start + size)
            start += size
        return out

    @property
    def dim(self) -> int:
        return sum(self.sizes.values())

    def mode_mask(self, mode: str, device=None) -> torch.Tensor:
        """[dim] bool: True on the controls edit mode ``mode`` changes."""
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        mask = torch.zeros(self.dim, dtype=torch.bool, device=device)
        for name in MODES[mode]:
            mask[self.slices[name]] = True
        return mask

    def to_dict(self) -> dict:
        return {"n_expression": self.n_expression}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ControlLayout":
        if set(data) != {"n_expression"}:
            raise ValueError(f"control layout: expected the field n_expression, got {sorted(data)}")
        return cls(int(data["n_expression"]))


# --------------------------------------------------------------------------------------------
# Control vectors <-> rig parameters

def control_vector(params, layout: ControlLayout, dtype: torch.dtype = torch.float32,
                   device=None) -> torch.Tensor:
    """Controls of ``params`` as laid out by ``layout``.

    ``params``: one ``RigParams`` -> [dim]; a sequence of ``RigParams`` -> [B, dim]; or a
    mapping of batch tensors (e.g. ``FaceParams.as_dict()``) with 'global_pose' [B, 3],
    'jaw' [B, 3], 'expression' [B, >= E] and 'sh' [B, 9, 3] -> [B, dim] (differentiable).
    Expression lists shorter than E are zero-padded; components past E are not controls and
    are left out (``apply_controls`` keeps them from its base).
    """
    if isinstance(params, RigParams):
        return control_vector([params], layout, dtype, device)[0]
    if isinstance(params, Mapping):
        return _controls_of_tensors(params, layout)
    if isinstance(params, Sequence) and params and all(isinstance(p, RigParams) for p in params):
        rows = []
        for p in params:
            expression = list(p.expression[: layout.n_expression])
            expression += [0.0] * (layout.n_expression - len(expression))
            rows.append([*p.pose.global_, *p.pose.jaw, *expression,
                         *(v for row in p.lighting.sh for v in row)])
        return torch.tensor(rows, dtype=dtype, device=device).reshape(len(rows), layout.dim)
    raise TypeError("params: expected RigParams, a non-empty sequence of RigParams or a mapping "
                    f"of batch tensors, got {type(params).__name__}")


def _controls_of_tensors(params: Mapping, layout: ControlLayout) -> torch.Tensor:
    missing = [name for name in CONTROL_FIELDS if name not in params]
    if missing:
        raise KeyError(f"params: missing {', '.join(missing)} (needs {', '.join(CONTROL_FIELDS)})")
    pose, jaw, sh = params["global_pose"], params["jaw"], params["sh"]
    expression = params["expression"]
    batch = pose.shape[0]
    expected = {"global_pose": (pose, (batch, 3)), "jaw": (jaw, (batch, 3)),
                "sh": (sh, (batch, 9, 3))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"params['{name}']: expected {list(shape)}, got {list(tensor.shape)}")
    if expression.ndim != 2 or expression.shape[0] != batch:
        raise ValueError(f"params['expression']: expected [{batch}, E], "
                         f"got {list(expression.shape)}")
    expression = expression[:, : layout.n_expression]
    if expression.shape[1] < layout.n_expression:
        expression = torch.cat([expression, expression.new_zeros(
            batch, layout.n_expression - expression.shape[1])], dim=1)
    return torch.cat([pose, jaw, expression, sh.reshape(batch, 27)], dim=1)


def split_controls(vector: torch.Tensor, layout: ControlLayout) -> dict[str, torch.Tensor]:
    """Inverse of ``control_vector`` for batches: [B, dim] -> {'global_pose' [B, 3],
    'jaw' [B, 3], 'expression' [B, E], 'sh' [B, 9, 3]} (views, differentiable)."""
    if vector.ndim != 2 or vector.shape[1] != layout.dim:
        raise ValueError(f"controls: expected [B, {layout.dim}], got {list(vector.shape)}")
    parts = {name: vector[:, s] for name, s in layout.slices.items()}
    parts["sh"] = parts["sh"].reshape(-1, 9, 3)
    return parts


def apply_controls(vector: torch.Tensor, layout: ControlLayout,
                   base: RigParams | None = None) -> RigParams | list[RigParams]:
    """Inverse of ``control_vector`` for rig parameters: a copy of ``base`` (default
    ``RigParams()``) with its global and jaw rotations, first E expression coefficients and SH
    light taken from ``vector`` ([dim] -> one RigParams, [B, dim] -> a list)."""
    if vector.ndim == 1:
        return apply_controls(vector[None], layout, base)[0]
    parts = {name: values.detach().double().cpu().tolist()
             for name, values in split_controls(vector, layout).items()}
    out = []
    for i in range(vector.shape[0]):
        p = base.copy() if base is not None else RigParams()
        p.pose.global_, p.pose.jaw = parts["global_pose"][i], parts["jaw"][i]
        p.expression = parts["expression"][i] + list(p.expression[layout.n_expression:])
        p.lighting = Lighting(sh=parts["sh"][i])
        out.append(p)
    return out


def mix_controls(target: torch.Tensor, source: torch.Tensor, modes: Sequence[str],
                 layout: ControlLayout) -> torch.Tensor:
    """[B, dim]: ``target``'s controls with those of ``modes[i]`` taken from ``source`` in
    row i (the edit that moves face i to face i' pose, expression or light)."""
    if target.shape != source.shape or target.shape[0] != len(modes):
        raise ValueError(f"target {list(target.shape)}, source {list(source.shape)} and "
                         f"{len(modes)} modes do not match")
    mask = torch.stack([layout.mode_mask(m, target.device) for m in modes])
    return torch.where(mask, source, target)


# --------------------------------------------------------------------------------------------
# The network

class PerLayerLinear(nn.Module):
    """num_layers independent linear maps, applied to x [B, num_layers, in_features]:
    y[:, k] = x[:, k] @ weight[k].T + bias[k]; weight [num_layers, out, in]."""

    def __init__(self, num_layers: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_layers, out_features))
        bound = 1 / math.sqrt(in_features)          # nn.Linear's default initialisation
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bki,koi->bko", x, self.weight) + self.bias


class RigNet(nn.Module):
    """w [B, num_ws, w_dim], p [B, control_dim] -> w_hat = w + d [B, num_ws, w_dim].

    Parameters: ``encoder`` (per-layer w_dim -> latent_dim), ``decoder`` (per-layer
    latent_dim + control_dim -> w_dim). Buffers ``control_mean`` / ``control_scale``
    [control_dim] standardise p before the decoder (set from the training corpus; identity by
    default) - an affine reparametrisation of the decoder's p columns, so the map is still the
    paper's linear one. The decoder starts at zero: an untrained RigNet is the identity.

    ``layout`` (optional) records which control sits where; ``control_dim`` must match it.
    """

    def __init__(self, num_ws: int, w_dim: int = 512, latent_dim: int = 32,
                 control_dim: int | None = None, layout: ControlLayout | None = None):
        super().__init__()
        if control_dim is None:
            if layout is None:
                raise ValueError("RigNet needs control_dim or a ControlLayout")
            control_dim = layout.dim
        if layout is not None and layout.dim != control_dim:
            raise ValueError(f"control_dim={control_dim} does not match the layout's "
                             f"{layout.dim} controls")
        for name, value in (("num_ws", num_ws), ("w_dim", w_dim), ("latent_dim", latent_dim),
                            ("control_dim", control_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        self.num_ws, self.w_dim, self.latent_dim = num_ws, w_dim, latent_dim
        self.control_dim, self.layout = control_dim, layout
        self.encoder = PerLayerLinear(num_ws, w_dim, latent_dim)
        self.decoder = PerLayerLinear(num_ws, latent_dim + control_dim, w_dim)
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)
        self.register_buffer("control_mean", torch.zeros(control_dim))
        self.register_buffer("control_scale", torch.ones(control_dim))
        self.register_buffer("light_mean", torch.zeros(27))
        self.register_buffer("light_map", torch.eye(27))

    def config(self) -> dict:
        return {"num_ws": self.num_ws, "w_dim": self.w_dim, "latent_dim": self.latent_dim,
                "control_dim": self.control_dim}

    def forward(self, w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if w.ndim != 3 or w.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"w: expected [B, {self.num_ws}, {self.w_dim}], got {list(w.shape)}")
        if p.ndim != 2 or p.shape != (w.shape[0], self.control_dim):
            raise ValueError(f"p: expected [{w.shape[0]}, {self.control_dim}], "
                             f"got {list(p.shape)}")
        latent = self.encoder(w)                                              # [B, K, latent]
        controls = (p - self.control_mean) / self.control_scale
        controls = controls[:, None, :].expand(-1, self.num_ws, -1)
        return w + self.decoder(torch.cat([latent, controls], dim=2))

    def _light(self) -> slice:
        return (self.layout or ControlLayout.for_dim(self.control_dim)).slices["sh"]

    def request_controls(self, p: torch.Tensor) -> torch.Tensor:
        """Controls [B, control_dim] as a rig states them -> the controls to feed RigNet: the
        SH light replaced by the code F would read for the same visible shading (module
        notes); the rest unchanged. Identity for a RigNet without light statistics."""
        light = self._light()
        p = p.clone()
        p[:, light] = self.light_mean + (p[:, light] - self.light_mean) @ self.light_map.T
        return p

    @torch.no_grad()
    def set_control_statistics(self, controls: torch.Tensor, shading_basis: torch.Tensor | None
                               = None, min_scale: float = 1e-3,
                               ridge: float = LIGHT_RIDGE) -> None:
        """Standardise p with the mean and standard deviation of ``controls`` [N, dim] (F's
        controls over the corpus). With ``shading_basis`` [M, 9] (the SH basis at M normals
        a view sees) also set the light map of ``request_controls``: for SH codes c with
        mean mu and covariance S over ``controls``, and G = mean over the normals of b b^T
        (per colour channel), c -> mu + S (G S + ridge I)^-1 G (c - mu), the mean of c given
        its shading on those normals under a Gaussian prior."""
        if controls.ndim != 2 or controls.shape[1] != self.control_dim or controls.shape[0] < 2:
            raise ValueError(f"controls: expected [N >= 2, {self.control_dim}], "
                             f"got {list(controls.shape)}")
        self.control_mean.copy_(controls.mean(0))
        self.control_scale.copy_(controls.std(0).clamp_min(min_scale))
        if shading_basis is None:
            return
        if shading_basis.ndim != 2 or shading_basis.shape[1] != 9:
            raise ValueError(f"shading_basis: expected [M, 9], got {list(shading_basis.shape)}")
        codes = controls[:, self._light()].double()
        cov = torch.cov(codes.T)
        b = shading_basis.double().to(codes.device)
        gram = torch.kron(b.T @ b / len(b), torch.eye(3, dtype=torch.float64,
                                                       device=codes.device))
        eye = torch.eye(27, dtype=torch.float64, device=codes.device)
        self.light_mean.copy_(codes.mean(0))
        self.light_map.copy_(cov @ torch.linalg.solve(gram @ cov + ridge * eye, gram))
