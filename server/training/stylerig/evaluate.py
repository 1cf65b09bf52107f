"""How closely RigNet's edits follow the requested rig parameters (StyleRig's control metric).

For N random edits (pairs w, v from the corpus, the edit modes taking turns) the request is
c = w's controls with the mode's controls of v, and the edit w_hat = RigNet(w, c). The
parameters of the edited face are re-estimated and compared with c:

* ``--estimator latent``: p = F(w_hat), the reconstruction network that supervised training
  (fast; measures how well RigNet learnt to satisfy F).
* ``--estimator image``: the generator renders w_hat; dlib's landmarks and the optimisation
  fit of ``server.photo`` (landmarks + photometric, on our renderer) estimate the face in
  the image, independently of F (slow; the honest measure of control). Images in which no
  face is found count as failures. The fit splits brightness between albedo and light
  differently from F, so compare its lighting errors with its own 'before' figures.

Errors (per edit, for all controls, so edits that should leave a quantity alone show how well
they do): pose_deg = angle of R_est R_req^T of the global rotation; jaw_deg likewise;
expression_l2 = |e_est - e_req| over the E controlled coefficients; sh_l2 = |sh_est - sh_req|
(27 values); shading_rmse = RMS difference of the two lights' DECA shading over the visible
hemisphere of normals (z > 0), RGB. 'before' is the same error for the unedited face (its
estimate against the request), i.e. how far the edit had to go.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from smplx.lbs import batch_rodrigues

from server.checkpoints.stylegan import load_generator
from server.checkpoints.stylerig import load_dfr
from server.models.rignet import ControlLayout, control_vector, mix_controls, split_controls
from server.checkpoints.stylerig import load_rignet
from server.renderer import sh_basis

from server.training.stylerig.corpus import to_pipeline_images
from server.training.stylerig.data import MODE_STREAM, PARTNER_STREAM, TrainingData, load_face, step_rng
from server.training.progress import Progress

ESTIMATORS = ("latent", "image")
METRICS = ("pose_deg", "jaw_deg", "expression_l2", "sh_l2", "shading_rmse")
MODE_METRICS = {"pose": ("pose_deg",), "expression": ("expression_l2", "jaw_deg"),
                "lighting": ("sh_l2", "shading_rmse")}


@dataclass
class EvalSettings:
    dfr: str
    rignet: str
    face_model: str = "demo"
    embedding: str | None = None
    edits: int = 300
    modes: tuple[str, ...] = ("pose", "expression", "lighting")
    estimator: str = "latent"
    generator: str | None = None       # default: the corpus' generator (image estimator)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        self.modes = tuple(self.modes)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {', '.join(ESTIMATORS)}, "
                             f"got {self.estimator!r}")
        unknown = [m for m in self.modes if m not in MODE_METRICS]
        if not self.modes or unknown:
            raise ValueError(f"modes: expected a non-empty subset of {', '.join(MODE_METRICS)}")


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] angle (degrees) of R(a) R(b)^T for axis-angle vectors a, b [B, 3]."""
    r = batch_rodrigues(a.double()) @ batch_rodrigues(b.double()).transpose(1, 2)
    skew = torch.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0],
                        r[:, 1, 0] - r[:, 0, 1]], dim=1)
    trace = r.diagonal(dim1=1, dim2=2).sum(1)
    return torch.rad2deg(torch.atan2(skew.norm(dim=1), trace - 1)).float()


def hemisphere_normals(count: int = 512) -> torch.Tensor:
    """[N, 3] unit normals spread evenly (Fibonacci) over the half sphere facing +Z."""
    i = torch.arange(count, dtype=torch.float64) + 0.5
    z = i / count                                     # uniform in z: uniform area
    phi = i * math.pi * (3 - math.sqrt(5))
    r = (1 - z ** 2).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], dim=1).float()


def control_errors(estimate: torch.Tensor, request: torch.Tensor, layout: ControlLayout,
                   normals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-edit errors [B] between control vectors [B, dim] (see the module notes)."""
    est, req = split_controls(estimate.float(), layout), split_controls(request.float(), layout)
    basis = sh_basis(normals.to(estimate.device))                          # [N, 9]
    shading = (basis @ (est["sh"] - req["sh"]))                            # [B, N, 3]
    return {"pose_deg": rotation_angle_deg(est["global_pose"], req["global_pose"]),
            "jaw_deg": rotation_angle_deg(est["jaw"], req["jaw"]),
            "expression_l2": (est["expression"] - req["expression"]).norm(dim=1),
            "sh_l2": (est["sh"] - req["sh"]).flatten(1).norm(dim=1),
            "shading_rmse": shading.pow(2).mean(dim=(1, 2)).sqrt()}


class ImageEstimator:
    """Controls of faces in images: dlib landmarks + the optimisation fit."""

    def __init__(self, face, embedding, layout: ControlLayout, device):
        from server.renderer.face_model import FaceModel
        from server.photo.landmarks import FaceDetector
        from server.photo.optimise import FitSettings

        self.model = FaceModel(face, device)
        self.embedding, self.layout = embedding, layout
        self.detector = FaceDetector()
        self.settings = FitSettings(n_expression=layout.n_expression)

    def __call__(self, images: np.ndarray, landmarks: np.ndarray | None = None) -> torch.Tensor:
        """[B, dim] controls (NaN rows where no face is found) of uint8 images [B, S, S, 3];
        ``landmarks`` [B, 68, 2], when known, skip detection."""
        from server.photo.optimise import fit_aligned

        rows = []
        for i, image in enumerate(images):
            points = None if landmarks is None else landmarks[i]
            if points is None:
                detections = self.detector.detect(image)
                points = detections[0].landmarks if detections else None
            if points is None:
                rows.append(torch.full((self.layout.dim,), float("nan")))
                continue
            fit = fit_aligned(image, points, self.model, self.embedding, self.settings)
            rows.append(control_vector(fit.params, self.layout))
        return torch.stack(rows)


def evaluate(corpus_dir, settings: EvalSettings, device="cpu", out_dir=None,
             progress: bool = True) -> dict:
    """Run the evaluation; returns the summary (also written to ``out_dir/summary.json``,
    with one line per edit in ``out_dir/edits.jsonl``, when ``out_dir`` is given)."""
    device = torch.device(device)
    data = TrainingData(corpus_dir)
    dfr, _ = load_dfr(settings.dfr, device)
    rignet = load_rignet(settings.rignet, device)
    layout = rignet.layout or dfr.layout.control_layout()
    if layout != dfr.layout.control_layout():
        raise ValueError(f"{settings.rignet} controls {layout}, but {settings.dfr} estimates "
                         f"{dfr.layout.control_layout()}")
    estimator = G = None
    if settings.estimator == "image":
        face, embedding = load_face(settings.face_model, settings.embedding)
        estimator = ImageEstimator(face, embedding, layout, device)
        G = load_generator(settings.generator or data.corpus.manifest["generator"], device)
    normals = hemisphere_normals()

    rng = step_rng(settings.seed, 0, PARTNER_STREAM)
    w_index = rng.choice(data.usable, settings.edits)
    v_index = rng.choice(data.usable, settings.edits)
    same = w_index == v_index
    v_index[same] = data.usable[(np.searchsorted(data.usable, v_index[same]) + 1)
                                % len(data.usable)]
    order = step_rng(settings.seed, 0, MODE_STREAM).permutation(settings.edits)
    modes = [settings.modes[k % len(settings.modes)] for k in order]

    records = []
    bar = Progress(settings.edits, "evaluate", enabled=progress, unit="edit")
    for start in range(0, settings.edits, settings.batch_size):
        part = slice(start, min(start + settings.batch_size, settings.edits))
        wi, vi, mode = w_index[part], v_index[part], modes[part]
        with torch.no_grad():
            w, v = data.w(wi, device), data.w(vi, device)
            c_w, c_v = dfr(w).controls(layout), dfr(v).controls(layout)
            request = mix_controls(c_w, c_v, mode, layout)
            w_hat = rignet(w, request)
            if estimator is None:
                after, before = dfr(w_hat).controls(layout), c_w
            else:
                size = data.image_size
                after = estimator(to_pipeline_images(G.synthesis(w_hat), size)).to(device)
                before = estimator(data.corpus.images(wi), data.landmarks[wi]).to(device)
            errors = control_errors(after, request, layout, normals)
            errors_before = control_errors(before, request, layout, normals)
        for i in range(len(wi)):
            after_i = {k: _finite(e[i]) for k, e in errors.items()}
            before_i = {f"before_{k}": _finite(e[i]) for k, e in errors_before.items()}
            record = {"w": int(wi[i]), "v": int(vi[i]), "mode": mode[i], **after_i, **before_i}
            if any(value is None for value in after_i.values()):
                record["failure"] = FAILURE_AFTER
            elif any(value is None for value in before_i.values()):
                record["failure"] = FAILURE_BEFORE
            records.append(record)
        bar.update(len(wi))
    bar.close()

    summary = summarise(records, settings)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


FAILURE_AFTER = "no face found in the edited image"
FAILURE_BEFORE = "no face found in the corpus image"


def _finite(value) -> float | None:
    """A JSON-safe error value: None where no face was found (NaN is not JSON)."""
    value = float(value)
    return value if math.isfinite(value) else None


def summarise(records: list[dict], settings: EvalSettings) -> dict:
    """Per mode: edit count, failures (no face found), mean and median of every error after
    the edit and the mean before it; overall, the failures by reason."""
    reasons: dict[str, int] = {}
    for r in records:
        if "failure" in r:
            reasons[r["failure"]] = reasons.get(r["failure"], 0) + 1
    out = {"estimator": settings.estimator, "edits": len(records),
           "failures": sum(reasons.values()), "failure_reasons": reasons, "modes": {}}
    for mode in settings.modes:
        rows = [r for r in records if r["mode"] == mode]
        ok = [r for r in rows if all(r[k] is not None for k in METRICS)]
        entry = {"edits": len(rows), "failures": len(rows) - len(ok)}
        for key in METRICS:
            after = np.array([r[key] for r in ok])
            before = np.array([r[f"before_{key}"] for r in ok
                               if r[f"before_{key}"] is not None])
            entry[key] = {"mean": float(after.mean()) if len(after) else None,
                          "median": float(np.median(after)) if len(after) else None,
                          "before_mean": float(before.mean()) if len(before) else None}
        out["modes"][mode] = entry
    return out


def format_summary(summary: dict) -> str:
    """A plain-text table: one row per edit mode, mean error after (before) per metric."""
    head = f"{'edit':<11}{'n':>5}{'fail':>5}" + "".join(f"{k:>24}" for k in METRICS)
    lines = [f"estimator: {summary['estimator']}, {summary['edits']} edits; "
             "mean error after the edit (before it)", head]
    for mode, entry in summary["modes"].items():
        cells = []
        for key in METRICS:
            m, b = entry[key]["mean"], entry[key]["before_mean"]
            text = "-" if m is None else f"{m:.4g} ({b:.4g})" if b is not None else f"{m:.4g}"
            marker = "*" if key in MODE_METRICS[mode] else " "
            cells.append(f"{text + marker:>24}")
        lines.append(f"{mode:<11}{entry['edits']:>5}{entry['failures']:>5}" + "".join(cells))
    lines.append("* the quantity the edit changes; the others should stay as they were")
    for reason, count in summary.get("failure_reasons", {}).items():
        lines.append(f"{count} of {summary['edits']} edits failed: {reason}")
    if summary.get("failure_reasons"):
        lines.append("failed edits are left out of the means; with the image estimator a "
                     "face the detector cannot find usually means the generator's output left "
                     "the face distribution (a wrong generator, or a RigNet trained for "
                     "another one), or the corpus images are too small for dlib (use 256 px "
                     "or more)")
    return "\n".join(lines)
