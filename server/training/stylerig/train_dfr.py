"""DFR stage: train F (w -> face parameters) through the differentiable renderer.

Loss per step: L_render(I_w, F(w)) + priors (``losses``), where I_w is the corpus image of w
and its detected landmarks; the generator is not run (the corpus holds its images). Each term
is a mean over the corpus, estimated per step: L_photo on ``batch_size`` images, L_land and
the priors on ``landmark_batch`` images (the same ones and more). The landmark term needs no
rasterisation (a sixth of the cost per image) and carries what F learns slowest, the geometry
(pose, expression, shape, camera). Where the truth is known (``tests/support/truth_world.py``,
64 px), one shared MLP: 16 images per step for 4000 steps left F's pose 5.1 deg and its jaw
3.1 deg off; 16 + 48 landmark-only images for 2000 steps, in less time, 4.3 and 2.1 deg.

Adam (the paper does not state F's optimiser); ``lr_decay`` > 0 lowers its learning rate to
zero along a cosine over that last fraction of the run.

Before the first step, F's anchors are set from the corpus (``FaceReconstructionNet``): the
input statistics of w; the camera that best maps the neutral face's landmarks onto the mean
detected landmarks (scale and offset, least squares); a grey ambient light matching the mean
brightness of the face regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from server.models.dfr import FaceParamLayout, FaceReconstructionNet
from server.checkpoints.stylerig import load_dfr, save_dfr

from server.training import distributed
from server.training.stylerig.data import TrainingData, load_face
from server.training.stylerig.face_render import FaceRenderer
from server.training.stylerig.losses import (RenderLoss, RenderLossWeights, landmark_targets,
                                             prior_terms)
from server.training.stylerig.preview import overlay, save_grid, with_points
from server.training.progress import Progress
from server.training.stylerig.run import RunDir, check_lr_decay, due, scheduled_lr, set_lr

STATISTICS_SAMPLES = 4096


@dataclass
class DFRSettings:
    face_model: str = "demo"
    embedding: str | None = None        # landmark embedding file (FLAME); None: detected
    steps: int = 100_000
    batch_size: int = 16
    lr: float = 1e-4
    lr_decay: float = 0.0               # fraction of the run over which lr falls to 0
    landmark_batch: int = 64            # images per step for L_land and the priors (>= batch)
    hidden: int = 128                   # width of each head's hidden layers
    heads: bool = True                  # one MLP per parameter group (models.dfr)
    albedo_terms: int = 4
    render_size: int = 0                # 0: the corpus' image size
    supersample: int = 2                # L_photo renders at this many times the size
    w_landmarks: float = 100.0
    w_shape: float = 1e-4
    w_expression: float = 1e-4
    w_albedo: float = 1e-2
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    preview_every: int = 1000
    also: tuple[str, ...] = ()          # more corpora in the batches (edit corpora)
    init: str | None = None             # start from this F (refining it) instead of anchors
    # Runs recorded before these settings existed: every term on the batch alone, one MLP,
    # renders sampled at pixel centres.
    ABSENT_MEANS: ClassVar[dict] = {"landmark_batch": 0, "heads": False, "supersample": 1}

    def __post_init__(self):
        check_lr_decay(self.lr_decay)
        if self.landmark_batch and self.landmark_batch < self.batch_size:
            raise ValueError(f"landmark_batch: expected 0 or at least the batch size "
                             f"({self.batch_size}), got {self.landmark_batch}")

    @property
    def images_per_step(self) -> int:
        return max(self.batch_size, self.landmark_batch)


@torch.no_grad()
def set_anchors(net: FaceReconstructionNet, data: TrainingData, renderer: FaceRenderer,
                size: int, device) -> None:
    """F's input statistics and output anchors from the corpus (see the module notes)."""
    indices = data.sample(STATISTICS_SAMPLES)
    w = data.w(indices, device)
    w_mean = w.mean(0)
    w_scale = float((w - w_mean).std()) if len(indices) > 1 else 1.0

    # Camera: least-squares scale and offset from the neutral landmarks (x, y) to the mean
    # detected ones in NDC, as DECA's orthographic projection NDC = s * (X + t).
    zero = net(w[:1]).map(torch.zeros_like)
    neutral = renderer.embedding.points(renderer.vertices(zero), renderer.model.triangles)[0, :, :2]
    pixels = torch.as_tensor(data.landmarks[indices].mean(0) + 0.5, device=device)
    ndc = torch.stack([pixels[:, 0] / data.image_size * 2 - 1,
                       1 - pixels[:, 1] / data.image_size * 2], dim=1)
    valid = torch.as_tensor(renderer.embedding.valid, device=device)
    p, q = neutral[valid].double(), ndc[valid].double()
    scale = float((q - q.mean(0)).norm() / (p - p.mean(0)).norm().clamp_min(1e-9))
    offset = (q.mean(0) / scale - p.mean(0)).tolist()

    # Light: ambient level = mean face-region brightness / mean model albedo.
    few = indices[:256]
    targets = data.targets(few, size, device)
    brightness = targets.photo[targets.region].mean() if bool(targets.region.any()) else 0.5
    level = float(brightness / renderer.model.vertex_albedo.mean().clamp_min(1e-3))
    sh = torch.zeros(9, 3, device=device)
    sh[0] = level * math.sqrt(4 * math.pi)        # uniform light: shading = sh[0] * C_0
    net.set_anchors(w_mean, max(w_scale, 1e-6), [scale, *offset], sh)


def dfr_metadata(data: TrainingData, face, step: int) -> dict[str, str]:
    return {"face_model": face.name, "face_vertices": str(face.n_vertices),
            "corpus": str(data.corpus.root), "landmarks": data.landmark_source,
            "step": str(step)}


def train_dfr(corpus_dir, run_dir, settings: DFRSettings, device="cpu",
              progress: bool = True) -> FaceReconstructionNet:
    """Train (or resume training) F; returns it. Writes the run folder (``run``) and
    ``dfr.safetensors`` there."""
    ctx = distributed.setup(device)
    device = ctx.device
    # A step's images: the photometric batch, then the extra landmark images; each process
    # takes its slice of both, so that any number of processes trains the same F.
    photometric = ctx.shard(settings.batch_size)
    extra = ctx.shard(settings.images_per_step - settings.batch_size)
    run = RunDir(run_dir, settings, writable=ctx.is_main)
    data = TrainingData(corpus_dir, settings.also)
    if data.landmark_source == "synthetic":
        print("warning: training on synthetic landmarks (a test setting, not real landmarks)")
    face, embedding = load_face(settings.face_model, settings.embedding)
    layout = FaceParamLayout.for_model(face, settings.albedo_terms)
    size = settings.render_size or data.image_size
    renderer = FaceRenderer(face, embedding, layout, device)
    loss_fn = RenderLoss(renderer, size, RenderLossWeights(settings.w_landmarks),
                         settings.supersample)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = FaceReconstructionNet(data.corpus.num_ws, data.corpus.w_dim, layout,
                                    settings.hidden, settings.heads).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    state = run.load_checkpoint(device)
    if state is None and settings.init:
        start, _ = load_dfr(settings.init, device)
        if start.config() != net.config():
            raise ValueError(f"init: {settings.init} is an F with {start.config()}, this run "
                             f"trains {net.config()}; give the same --hidden, --heads and "
                             "--albedo-terms and face model")
        net.load_state_dict(start.state_dict())
        step = 0
    elif state is None:
        set_anchors(net, data, renderer, size, device)
        step = 0
    else:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])

    preview_indices = data.usable[:4]
    model = ctx.wrap(net)                     # DistributedDataParallel under torchrun
    bar = Progress(settings.steps, "dfr", start=step, enabled=progress and ctx.is_main)
    try:
        while step < settings.steps:
            drawn = data.batch(settings.seed, step, settings.images_per_step)
            mine = [drawn[:settings.batch_size][photometric],
                    drawn[settings.batch_size:][extra]]
            set_lr(optimizer, scheduled_lr(settings.lr, step, settings.steps, settings.lr_decay))
            p = model(data.w(np.concatenate(mine), device))
            terms = step_terms(p, data, *mine, loss_fn, settings, device)
            total = terms["render"] + sum(v for k, v in terms.items() if k.startswith("prior"))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            step += 1
            values = {"loss": float(total.detach()),
                      **{k: float(v.detach()) for k, v in terms.items()}}
            bar.update(1, loss=values["loss"])
            if due(step, settings.log_every, settings.steps):
                values = ctx.mean(values)
                if ctx.is_main:
                    run.log(step, values)
            if ctx.is_main and due(step, settings.preview_every, settings.steps):
                write_preview(run.preview_path(step), net, data, loss_fn, preview_indices,
                              device)
            if ctx.is_main and due(step, settings.checkpoint_every, settings.steps):
                checkpoint(run, step, net, optimizer, data, face)
    except KeyboardInterrupt:
        if ctx.is_main:
            checkpoint(run, step, net, optimizer, data, face)
        raise
    finally:
        bar.close()
    return net.eval()


def step_terms(p, data: TrainingData, photometric: np.ndarray, extra: np.ndarray,
               loss_fn: RenderLoss, settings: DFRSettings, device) -> dict[str, torch.Tensor]:
    """The loss terms (means) of one step: ``p`` are F's parameters of the ``photometric``
    images then the ``extra`` ones, which give only the landmark term and the priors."""
    n, size = len(photometric), loss_fn.size
    first = p.map(lambda t: t[:n])
    terms = loss_fn.terms(first, data.targets(photometric, size, device))
    land = terms["landmarks"]
    if len(extra):
        points = landmark_targets(data.landmarks[extra], data.image_size, size, device)
        land = torch.cat([land, loss_fn.landmark_term(p.map(lambda t: t[n:]), points)])
    means = {"photo": terms["photo"].mean(), "landmarks": land.mean()}
    means["render"] = means["photo"] + loss_fn.weights.landmarks * means["landmarks"]
    means.update({k: v.mean() for k, v in prior_terms(p, settings.w_shape,
                                                       settings.w_expression,
                                                       settings.w_albedo).items()})
    return means


def checkpoint(run: RunDir, step, net, optimizer, data, face) -> None:
    run.save_checkpoint(step, net, optimizer)
    save_dfr(net, run.path / "dfr.safetensors", dfr_metadata(data, face, step))


@torch.no_grad()
def write_preview(path, net, data: TrainingData, loss_fn: RenderLoss, indices: np.ndarray,
                  device) -> None:
    """One row per sample: the image with detected (green) and projected (red) landmarks,
    the render over the image, the render alone."""
    size = loss_fn.size
    target = data.targets(indices, size, device)
    buffers, points = loss_fn.renderer.render(net(data.w(indices, device)), size)
    rows = []
    for i in range(len(indices)):
        photo = target.photo[i]
        rows.append([with_points(photo, [(target.landmarks[i].cpu() - 0.5, (0, 255, 0)),
                                         (points[i].cpu() - 0.5, (255, 0, 0))]),
                     overlay(photo, buffers.rendered[i], buffers.mask[i]),
                     buffers.rendered[i]])
    save_grid(rows, path)
