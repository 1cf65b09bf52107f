"""Rig control measured against a truth world (``tests/support/truth_world.py``).

For held-out pairs (w, v) and an edit mode, the request is w's controls (as F estimates them)
with the mode's controls of v (as F estimates them, the paper's protocol, or exactly, M(v):
what an artist dialling values on the rig asks for), w_hat = net(w, request), and because the
world's map M is known the edited face's true parameters M(w_hat) are exact. Measures:

* control: the error of M(w_hat) against M(v) on the edited quantities, next to the no-edit
  baseline M(w) against M(v) (a perfect edit scores 0);
* preservation: how far the quantities the edit must not touch moved, M(w_hat) against M(w),
  divided by their natural spread (the mean distance between two random faces): 0 = untouched,
  1 = as different as another face. 'rig' = the other edit groups, 'identity' = shape and
  albedo, 'content' = background and colour cast (what the rig does not model);
* realism: the world's degradation of w_hat (0 on the W distribution).

Quantities (per face): pose_deg (geodesic angle of the global rotations), jaw_deg,
expression_mm (RMS over the vertices of the difference of the expression blend shapes'
offsets, in millimetres: the expression as the face's geometry shows it, so that a coefficient
whose shape barely moves the surface weighs little), expression_l2 (coefficients),
shading_rmse (RMS difference of the SH shading over the normals
a frontal view of the head shows: the light as the face displays it), shape_l2, albedo_l2
(log-gain coefficients), background_l2 (the two RGB colours), cast_l2 (RGB log-gains).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from server.models.dfr import FaceParams
from server.models.rignet import MODES, mix_controls
from server.training.stylerig.corpus import sample_z
from server.renderer import sh_basis, vertex_normals
from server.training.stylerig.evaluate import control_errors

# Edit modes measured: the trained ones, and all three at once (StyleRig sec. 8.5).
EDITS = {**{m: (m,) for m in MODES}, "all": tuple(MODES)}
TARGETS = {"pose": ("pose_deg",), "expression": ("expression_mm", "jaw_deg"),
           "lighting": ("shading_rmse",)}
PRESERVED = {"rig": ("pose_deg", "expression_mm", "jaw_deg", "shading_rmse"),
             "identity": ("shape_l2", "albedo_l2"), "content": ("background_l2", "cast_l2")}
HELD_OUT = 1 << 30                      # sample indices from here on are never in a corpus


def face_normals(world) -> torch.Tensor:
    """[N, 3] unit vertex normals of the world's neutral head that face the camera
    (n_z > 0.3): where a frontal image shows the light."""
    vertices = torch.as_tensor(world.face.v_template, dtype=torch.float32)[None]
    normals = vertex_normals(vertices, torch.as_tensor(world.face.triangles).long())[0]
    return normals[normals[:, 2] > 0.3]


def expression_mm(world, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B]: RMS over the vertices of the expression offsets of coefficients ``a`` - ``b``
    [B, n_expression], millimetres (the face model is in metres)."""
    dirs = torch.as_tensor(world.face.exprdirs, dtype=torch.float32)      # [V, 3, n]
    offsets = torch.einsum("vcn,bn->bvc", dirs, a - b)
    return 1000 * offsets.pow(2).sum(2).mean(1).sqrt()


def quantity_errors(world, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-face distances [B] between the true faces of latents ``a`` and ``b`` (see the
    module notes)."""
    pa, pb = world.truth(a), world.truth(b)
    layout = world.layout.control_layout()
    errors = control_errors(pa.controls(layout), pb.controls(layout), layout,
                            face_normals(world))
    ca, cb = world.content(a), world.content(b)
    errors.update(expression_mm=expression_mm(world, pa.expression, pb.expression),
                  shape_l2=(pa.shape - pb.shape).norm(dim=1),
                  albedo_l2=(pa.albedo - pb.albedo).norm(dim=1),
                  background_l2=(ca["background"] - cb["background"]).flatten(1).norm(dim=1),
                  cast_l2=(ca["cast"].log() - cb["cast"].log()).norm(dim=1))
    del errors["sh_l2"]
    return errors


def held_out_latents(world, count: int, seed: int, truncation: float) -> torch.Tensor:
    """[count, num_ws, w_dim]: latents drawn like a corpus' (same seed, same truncation) at
    sample indices no corpus reaches."""
    z = np.stack([sample_z(seed, HELD_OUT + i, world.z_dim) for i in range(count)])
    with torch.no_grad():
        return world.mapping(torch.from_numpy(z), None, truncation_psi=truncation)


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean())


@torch.no_grad()
def dfr_accuracy(world, dfr, w: torch.Tensor) -> dict[str, float]:
    """How well F(w) matches M(w): pose error (degrees), expression correlation (Pearson r
    per coefficient across the faces, averaged) and geometric error (mm), jaw error (degrees), SH relative error
    |sh_F - sh_M| / |sh_M| and shading relative error (shading RMSE over ``face_normals`` /
    RMS of the true shading there)."""
    f, m = dfr(w), world.truth(w)
    layout = world.layout.control_layout()
    normals = face_normals(world)
    errors = control_errors(f.controls(layout), m.controls(layout), layout, normals)
    true_shading = (sh_basis(normals) @ m.sh).pow(2).mean(dim=(1, 2)).sqrt()
    e_f, e_m = f.expression - f.expression.mean(0), m.expression - m.expression.mean(0)
    r = (e_f * e_m).sum(0) / (e_f.norm(dim=0) * e_m.norm(dim=0)).clamp_min(1e-12)
    return {"pose_deg": _mean(errors["pose_deg"]), "jaw_deg": _mean(errors["jaw_deg"]),
            "expression_r": _mean(r),
            "expression_mm": _mean(expression_mm(world, f.expression, m.expression)),
            "sh_relative": _mean((f.sh - m.sh).flatten(1).norm(dim=1)
                                 / m.sh.flatten(1).norm(dim=1)),
            "shading_relative": _mean(errors["shading_rmse"] / true_shading)}


@torch.no_grad()
def natural_spread(world, w: torch.Tensor) -> dict[str, float]:
    """Mean distance of every quantity between a face and the next one in ``w``."""
    return {k: _mean(v) for k, v in quantity_errors(world, w, w.roll(1, 0)).items()}


@torch.no_grad()
def measure_control(world, net, dfr, w: torch.Tensor, v: torch.Tensor,
                    spread: dict[str, float], exact_request: bool = False) -> dict[str, dict]:
    """Per edit of ``EDITS``: {'target': {quantity: (after, before)}, 'preserved':
    {'rig' | 'identity' | 'content': relative change}, 'degradation': mean}. ``net`` maps
    (w, controls) -> w_hat (a RigNet or any network with its interface). ``exact_request``:
    the edited controls are v's true ones, not F's reading of v, passed through the net's
    ``request_controls`` (if it has one) as the ``stylerig`` backend passes a rig's."""
    layout = world.layout.control_layout()
    c_w = dfr(w).controls(layout)
    c_v = (world.truth(v) if exact_request else dfr(v)).controls(layout)
    if exact_request and hasattr(net, "request_controls"):      # as the backend asks RigNet
        c_v = net.request_controls(c_v)
    before = quantity_errors(world, w, v)
    results = {}
    for edit, modes in EDITS.items():
        request = c_w
        for mode in modes:
            request = mix_controls(request, c_v, [mode] * len(w), layout)
        w_hat = net(w, request)
        after = quantity_errors(world, w_hat, v)
        moved = quantity_errors(world, w_hat, w)
        targets = [q for m in modes for q in TARGETS[m]]
        preserved = {}
        for group, quantities in PRESERVED.items():
            kept = [q for q in quantities if q not in targets]
            if kept:
                preserved[group] = float(np.mean([_mean(moved[q]) / max(spread[q], 1e-12)
                                                  for q in kept]))
        results[edit] = {"target": {q: (_mean(after[q]), _mean(before[q])) for q in targets},
                         "preserved": preserved,
                         "degradation": _mean(world.degradation(w_hat))}
    return results


def yaw_deg(p: FaceParams) -> torch.Tensor:
    """[B] the yaw of the world's pose (its axis-angle's y component), degrees."""
    return torch.rad2deg(p.global_pose[:, 1])


def light_azimuth_deg(sh: torch.Tensor) -> torch.Tensor:
    """[B] azimuth (degrees, +x = image right) of the dominant direction of SH codes [B, 9, 3]:
    the band-1 coefficients (x, y, z), averaged over RGB."""
    band1 = sh[:, 1:4].mean(2)
    return torch.rad2deg(torch.atan2(band1[:, 0], band1[:, 2]))


def format_control_table(rows: list[tuple[str, dict]], units: dict[str, str] | None = None
                         ) -> str:
    """Rows of (variant, ``measure_control`` result) as a plain-text table."""
    width = max([14] + [len(variant) + 2 for variant, _ in rows])
    head = (f"{'variant':<{width}}{'edit':<11}{'edited quantity: after (no edit)':<44}"
            f"{'rig moved':>10}{'identity':>10}{'content':>10}{'degrad.':>9}")
    lines = [head, "-" * len(head)]
    for variant, result in rows:
        for edit, entry in result.items():
            target = ", ".join(f"{q} {a:.3g} ({b:.3g})" for q, (a, b) in entry["target"].items())
            kept = entry["preserved"]
            cells = "".join(f"{kept[g]:>10.3f}" if g in kept else f"{'-':>10}"
                            for g in PRESERVED)
            lines.append(f"{variant:<{width}}{edit:<11}{target:<44}{cells}"
                         f"{entry['degradation']:>9.3f}")
    return "\n".join(lines)


def ratio(result: dict, edit: str, quantity: str) -> float:
    """after / before of one edited quantity (0 = perfect control, 1 = no edit at all)."""
    after, before = result[edit]["target"][quantity]
    return after / before if before > 0 else math.inf


def light_seen_in_images(world, w: torch.Tensor, w_albedo: float, steps: int = 400,
                         size: int = 64) -> float:
    """Mean shading_rmse against M's light of the light fitted to each of ``w``'s images
    with everything else of M(w) given except the albedo tint: how well any judge that reads
    images (F, a photo fit) can know the light. Albedo x light is the image's (and the
    world's colour cast multiplies both), so a tint the albedo field could make is the
    light's to the eye; the fit resolves it as F's training does, with the albedo prior
    ``w_albedo``. Photometric loss on the corpus' ``size`` px images (supersampled render),
    Adam, from the faces' mean light and albedo 0."""
    from dataclasses import replace

    from server.training.stylerig.corpus import to_pipeline_images
    from server.training.stylerig.losses import (RenderLoss, RenderLossWeights, make_targets,
                                                 prior_terms)

    with torch.no_grad():
        truth = world.truth(w)
        images = to_pipeline_images(world.synthesis(w, noise_mode="const"), size)
    targets = make_targets(images, world.landmarks(w, size), size, "cpu")
    loss = RenderLoss(world.renderer, size, RenderLossWeights(), supersample=2)
    sh = truth.sh.mean(0, keepdim=True).repeat(len(w), 1, 1).requires_grad_(True)
    albedo = torch.zeros_like(truth.albedo, requires_grad=True)
    optimizer = torch.optim.Adam([sh, albedo], lr=0.02)
    with torch.enable_grad():             # callers may measure under no_grad
        for _ in range(steps):
            p = replace(truth, sh=sh, albedo=albedo)
            fit = (loss.terms(p, targets)["photo"]
                   + prior_terms(p, 0.0, 0.0, w_albedo)["prior_albedo"]).mean()
            optimizer.zero_grad()
            fit.backward()
            optimizer.step()
    return light_error(world, sh.detach(), w)


@torch.no_grad()
def light_error(world, sh: torch.Tensor, w: torch.Tensor) -> float:
    """Mean shading_rmse of SH codes ``sh`` [B, 9, 3] against the true light of ``w``."""
    basis = sh_basis(face_normals(world))
    return _mean((basis @ (sh - world.truth(w).sh)).pow(2).mean(dim=(1, 2)).sqrt())
