"""DFR stage: train F (w -> face parameters) through the differentiable renderer.

Loss per batch (means over the batch): L_render(I_w, F(w)) + priors (``losses``), where I_w
is the corpus image of w and its detected landmarks. The generator is not run: the corpus
holds its images. Adam (the paper does not state F's optimiser); ``lr_decay`` > 0 lowers its
learning rate to zero along a cosine over that last fraction of the run.

Before the first step, F's anchors are set from the corpus (``FaceReconstructionNet``): the
input statistics of w; the camera that best maps the neutral face's landmarks onto the mean
detected landmarks (scale and offset, least squares); a grey ambient light matching the mean
brightness of the face regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from server.models.dfr import FaceParamLayout, FaceReconstructionNet
from server.checkpoints.stylerig import save_dfr

from server.training import distributed
from server.training.stylerig.data import TrainingData, load_face
from server.training.stylerig.face_render import FaceRenderer
from server.training.stylerig.losses import RenderLoss, RenderLossWeights, prior_terms
from server.training.stylerig.preview import overlay, save_grid, with_points
from server.training.progress import Progress
from server.training.stylerig.run import RunDir, due, scheduled_lr, set_lr

STATISTICS_SAMPLES = 4096


@dataclass
class DFRSettings:
    face_model: str = "demo"
    embedding: str | None = None        # landmark embedding file (FLAME); None: detected
    steps: int = 100_000
    batch_size: int = 16
    lr: float = 1e-4
    lr_decay: float = 0.0               # fraction of the run over which lr falls to 0
    hidden: int = 512
    albedo_terms: int = 4
    render_size: int = 0                # 0: the corpus' image size
    w_landmarks: float = 100.0
    w_shape: float = 1e-3
    w_expression: float = 1e-3
    w_albedo: float = 1e-2
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    preview_every: int = 1000

    def __post_init__(self):
        if not 0.0 <= self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay: expected a fraction in [0, 1], got {self.lr_decay!r}")


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
    part = ctx.shard(settings.batch_size)
    run = RunDir(run_dir, settings, writable=ctx.is_main)
    data = TrainingData(corpus_dir)
    if data.landmark_source == "synthetic":
        print("warning: training on synthetic landmarks (a test setting, not real landmarks)")
    face, embedding = load_face(settings.face_model, settings.embedding)
    layout = FaceParamLayout.for_model(face, settings.albedo_terms)
    size = settings.render_size or data.image_size
    renderer = FaceRenderer(face, embedding, layout, device)
    loss_fn = RenderLoss(renderer, size, RenderLossWeights(settings.w_landmarks))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = FaceReconstructionNet(data.corpus.num_ws, data.corpus.w_dim, layout,
                                    settings.hidden).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    state = run.load_checkpoint(device)
    if state is None:
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
            indices = data.batch(settings.seed, step, settings.batch_size)[part]
            target = data.targets(indices, size, device)
            set_lr(optimizer, scheduled_lr(settings.lr, step, settings.steps, settings.lr_decay))
            p = model(data.w(indices, device))
            terms, _ = loss_fn.terms(p, target)
            terms.update(prior_terms(p, settings.w_shape, settings.w_expression,
                                     settings.w_albedo))
            terms = {k: v.mean() for k, v in terms.items()}
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
