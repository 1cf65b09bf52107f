"""RigNet stage: self-supervised training with the frozen F and generator (Tewari et al. 2020,
sec. 5).

Each step draws pairs (w, v) of corpus latents and, per pair, an edit mode (pose, expression or
lighting). With p_w = F(w), p_v = F(v) and their control vectors c_w, c_v (F frozen):

* Reconstruction, L_rec = ||RigNet(w, c_w) - w||^2 (mean over the W+ entries), and the same
  for v: feeding a face's own controls must not move its latent.
* Editing, one way: w_hat = RigNet(w, c_w with the mode's controls of c_v), p_hat = F(w_hat).
  p_edit = p_v with the mode's parameters of p_hat; L_edit = L_render(I_v, p_edit): the edited
  face must show v's pose (or expression, or light) - rendered with everything else of v, it
  must reproduce v's image and landmarks.
* Consistency: p_consist = p_hat with the mode's parameters of p_w;
  L_consist = L_render(I_w, p_consist): everything the edit should not touch must stay w's.
* Two-way (siamese) cycle: the same with the roles of w and v swapped (v_hat =
  RigNet(v, c_v with the mode's controls of c_w), compared with I_w and I_v), by the same
  network.

L = w_rec L_rec + w_render (w_edit L_edit + w_consist L_consist) (each averaged over both
directions).

``w_control`` > 0 adds the same two demands in F's parameter space, on the controls
standardised as RigNet standardises them (d = (controls of F(w_hat) - request) / scale):
w_control (w_edit mean(d^2 over the edited controls) + w_consist mean(d^2 over the others)),
each averaged per edit, then over the edits.
The paper has only the rendering terms; they carry little gradient for what few pixels show
(a small image's expression, a light's direction), and there this term is what makes RigNet
follow the request (measured in docs/stylerig_training.md). ``--w-control 0`` trains the
paper's objective exactly. ``--w-render 0`` keeps L_rec and this term alone: no face is
rendered and no image read, so a step costs a small fraction of one with L_render and RigNet
can see many times the pairs in the same time (the 'control-only' rows of the docs' table).

Gradients reach RigNet through F and the renderer; F's and the generator's weights never
change and the generator is not run at all (the corpus holds I_w and I_v) except for
previews. Optimiser: AdaDelta, as in the paper (``lr_decay`` > 0: its learning rate falls to
zero along a cosine over that last fraction of the run).

Before the first step RigNet's control standardisation and its light map (how a rig's light
request becomes the code F would read, ``RigNet.request_controls``) are set from F's controls
over the corpus (``RigNet.set_control_statistics``); neither changes during training.

Under torchrun each process trains on its slice of every step's pairs with DDP
(``server.training.distributed``): the same result as one process at the same batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from server.checkpoints.stylegan import load_generator
from server.models.dfr import FaceParams
from server.checkpoints.stylerig import load_dfr
from server.models.rignet import MODES, RigNet, mix_controls
from server.checkpoints.stylerig import save_rignet

from server.training import distributed
from server.training.stylerig.corpus import to_pipeline_images
from server.renderer import sh_basis
from server.training.stylerig.evaluate import hemisphere_normals
from server.training.stylerig.data import MODE_STREAM, PARTNER_STREAM, TrainingData, load_face, step_rng
from server.training.stylerig.face_render import FaceRenderer
from server.training.stylerig.losses import RenderLoss, RenderLossWeights, Targets
from server.training.stylerig.preview import overlay, save_grid
from server.training.progress import Progress
from server.training.stylerig.run import RunDir, check_lr_decay, due, scheduled_lr, set_lr

STATISTICS_SAMPLES = 4096


@dataclass
class RigNetSettings:
    dfr: str = ""                        # F, a save_dfr file (the DFR stage's dfr.safetensors)
    face_model: str = "demo"             # must be the model F was trained with
    embedding: str | None = None
    modes: tuple[str, ...] = ("pose", "expression", "lighting")
    steps: int = 100_000
    batch_size: int = 8
    latent_dim: int = 32
    lr: float = 1.0                      # AdaDelta (torch's and Zeiler's defaults)
    lr_decay: float = 0.0                # fraction of the run over which lr falls to 0
    rho: float = 0.9
    eps: float = 1e-6
    render_size: int = 0                 # 0: the corpus' image size
    supersample: int = 2                 # L_render renders at this many times the size
    w_rec: float = 1.0
    w_edit: float = 1.0
    w_consist: float = 1.0
    w_control: float = 1.0               # the edit and consistency in F's parameter space
    w_render: float = 1.0                # L_edit and L_consist as renders (0: not rendered)
    w_landmarks: float = 100.0           # lambda_land inside L_render
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    preview_every: int = 1000

    # Runs started before a setting existed were trained with these values.
    ABSENT_MEANS: ClassVar[dict] = {"w_control": 0.0, "supersample": 1}

    def __post_init__(self):
        check_lr_decay(self.lr_decay)
        self.modes = tuple(self.modes)
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            raise ValueError(f"modes: expected a non-empty subset of {', '.join(MODES)}, "
                             f"got {list(self.modes)}")


class Pairs:
    """The pairs and modes of one step: ``w_index``, ``v_index`` [B] and ``modes`` [B]."""

    def __init__(self, data: TrainingData, settings: RigNetSettings, step: int,
                 part: slice = slice(None)):
        b = settings.batch_size
        self.w_index = data.batch(settings.seed, step, b)
        partners = data.batch(settings.seed, step, b, PARTNER_STREAM)
        # A face paired with itself teaches nothing: shift such partners to another face.
        same = partners == self.w_index
        if same.any():
            position = np.searchsorted(data.usable, partners[same])
            partners[same] = data.usable[(position + 1) % len(data.usable)]
        self.v_index = partners
        rng = step_rng(settings.seed, step, MODE_STREAM)
        self.modes = [settings.modes[i] for i in rng.integers(0, len(settings.modes), b)]
        # This process's pairs (``part`` of the step's batch, distributed training).
        self.w_index, self.v_index = self.w_index[part], self.v_index[part]
        self.modes = self.modes[part]


def control_terms(d2: torch.Tensor, modes: list[str], layout) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """L_control's two halves from d2 [B, controls], the squared standardised errors of each
    edit's controls against its request: (mean over the edited controls, mean over the
    others), each per edit, then over the edits - the same under DDP, whose processes hold
    different modes (and so different numbers of edited controls)."""
    edited = torch.stack([layout.mode_mask(m, d2.device) for m in modes]).to(d2.dtype)
    return (((d2 * edited).sum(1) / edited.sum(1)).mean(),
            ((d2 * (1 - edited)).sum(1) / (1 - edited).sum(1)).mean())


class RigNetObjective:
    """The losses of one batch (see the module notes). ``rignet`` may be RigNet in
    DistributedDataParallel."""

    def __init__(self, rignet, dfr, loss: RenderLoss, settings: RigNetSettings):
        self.rignet, self.dfr, self.loss, self.settings = rignet, dfr, loss, settings
        self.layout = getattr(rignet, "module", rignet).layout

    @property
    def renders(self) -> bool:
        """Whether the rendering terms count (else the targets are not read: pass None)."""
        return self.settings.w_render > 0

    def __call__(self, w: torch.Tensor, v: torch.Tensor, target_w: Targets | None,
                 target_v: Targets | None, modes: list[str]) -> dict[str, torch.Tensor]:
        s, b = self.settings, w.shape[0]
        with torch.no_grad():
            p_w, p_v = self.dfr(w), self.dfr(v)
        c_w, c_v = p_w.controls(self.layout), p_v.controls(self.layout)
        # One RigNet pass: reconstructions of w and v, then the two edits.
        latents = torch.cat([w, v, w, v])
        controls = torch.cat([c_w, c_v, mix_controls(c_w, c_v, modes, self.layout),
                              mix_controls(c_v, c_w, modes, self.layout)])
        out = self.rignet(latents, controls)
        rec = ((out[: 2 * b] - latents[: 2 * b]) ** 2).mean()

        p_hat = self.dfr(out[2 * b:])                    # [w_hat; v_hat], grads through F
        both_modes = modes + modes
        result = {"rec": rec}
        total = s.w_rec * rec
        if self.renders:
            sources = FaceParams.cat([p_v, p_w])         # whose image each edit must match
            originals = FaceParams.cat([p_w, p_v])
            p_edit = sources.take(p_hat, both_modes)
            p_consist = p_hat.take(originals, both_modes)
            targets = Targets.cat([target_v, target_w, target_w, target_v])
            terms = self.loss.terms(FaceParams.cat([p_edit, p_consist]), targets)
            edit, consist = terms["render"][: 2 * b], terms["render"][2 * b:]
            total = total + s.w_render * (s.w_edit * edit.mean() + s.w_consist * consist.mean())
            result.update(edit=edit.mean(), consist=consist.mean(),
                          edit_photo=terms["photo"][: 2 * b].mean(),
                          edit_landmarks=terms["landmarks"][: 2 * b].mean())
            for mode in s.modes:
                chosen = torch.tensor([m == mode for m in both_modes], device=edit.device)
                if bool(chosen.any()):
                    result[f"edit_{mode}"] = edit[chosen].mean()
        # The same demands in F's standardised parameters (see the module notes).
        scale = getattr(self.rignet, "module", self.rignet).control_scale
        control_edit, control_consist = control_terms(
            ((p_hat.controls(self.layout) - controls[2 * b:]) / scale) ** 2, both_modes,
            self.layout)
        total = total + s.w_control * (s.w_edit * control_edit + s.w_consist * control_consist)
        result.update(loss=total, control_edit=control_edit, control_consist=control_consist)
        return result


@torch.no_grad()
def set_control_statistics(rignet: RigNet, dfr, data: TrainingData, device) -> None:
    indices = data.sample(STATISTICS_SAMPLES)
    controls = torch.cat([dfr(data.w(chunk, device)).controls(rignet.layout)
                          for chunk in np.array_split(indices, max(1, len(indices) // 256))])
    # The light map is fitted to the shading of a frontal view's normals, what F's images
    # show of a light (the same hemisphere ``evaluate`` scores light on).
    rignet.set_control_statistics(controls, sh_basis(hemisphere_normals()).to(device))


def train_rignet(corpus_dir, run_dir, settings: RigNetSettings, device="cpu",
                 generator: str | None = None, progress: bool = True) -> RigNet:
    """Train (or resume training) RigNet; writes the run folder and ``rignet.safetensors``.
    ``generator`` (default: the corpus' generator, if the file is there) is used for the
    preview images only."""
    ctx = distributed.setup(device)
    device = ctx.device
    part = ctx.shard(settings.batch_size)
    run = RunDir(run_dir, settings, writable=ctx.is_main)
    data = TrainingData(corpus_dir)
    dfr, meta = load_dfr(settings.dfr, device)
    face, embedding = load_face(settings.face_model, settings.embedding)
    if meta.get("face_vertices") not in (None, str(face.n_vertices)):
        raise ValueError(f"{settings.dfr} was trained with the face model "
                         f"{meta.get('face_model')!r} ({meta.get('face_vertices')} vertices), "
                         f"not {face.name!r} ({face.n_vertices})")
    if (dfr.num_ws, dfr.w_dim) != (data.corpus.num_ws, data.corpus.w_dim):
        raise ValueError(f"{settings.dfr} reads [{dfr.num_ws}, {dfr.w_dim}] latents, the corpus "
                         f"holds [{data.corpus.num_ws}, {data.corpus.w_dim}]")
    size = settings.render_size or data.image_size
    renderer = FaceRenderer(face, embedding, dfr.layout, device)
    loss = RenderLoss(renderer, size, RenderLossWeights(settings.w_landmarks),
                      settings.supersample)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        rignet = RigNet(data.corpus.num_ws, data.corpus.w_dim, settings.latent_dim,
                        layout=dfr.layout.control_layout()).to(device)
    optimizer = torch.optim.Adadelta(rignet.parameters(), lr=settings.lr, rho=settings.rho,
                                     eps=settings.eps)
    state = run.load_checkpoint(device)
    upgraded = state is not None and "light_map" not in state["model"]   # saved without one
    if state is None or upgraded:
        set_control_statistics(rignet, dfr, data, device)
    if state is None:
        step = 0
    else:
        rignet.load_state_dict({**rignet.state_dict(), **state["model"]})
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    objective = RigNetObjective(ctx.wrap(rignet), dfr, loss, settings)
    G = _preview_generator(generator, data, device) if ctx.is_main else None
    # File names, not paths (they move); the generator is identified by its fingerprint.
    manifest = data.corpus.manifest
    metadata = {"corpus": Path(data.corpus.root).name, "dfr": Path(settings.dfr).name,
                "generator": Path(str(manifest.get("generator"))).name,
                "generator_fingerprint": str(manifest.get("generator_fingerprint", "")),
                "face_model": face.name, "face_vertices": str(face.n_vertices),
                "modes": ",".join(settings.modes)}
    if upgraded and ctx.is_main:         # a finished run's file gets its light map too
        _checkpoint(run, step, rignet, optimizer, metadata)

    bar = Progress(settings.steps, "rignet", start=step, enabled=progress and ctx.is_main)
    try:
        while step < settings.steps:
            pairs = Pairs(data, settings, step, part)
            set_lr(optimizer, scheduled_lr(settings.lr, step, settings.steps, settings.lr_decay))
            targets = ((data.targets(pairs.w_index, size, device),
                        data.targets(pairs.v_index, size, device)) if objective.renders
                       else (None, None))
            terms = objective(data.w(pairs.w_index, device), data.w(pairs.v_index, device),
                              *targets, pairs.modes)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            step += 1
            values = {k: float(v.detach()) for k, v in terms.items()}
            bar.update(1, loss=values["loss"])
            if due(step, settings.log_every, settings.steps):
                values = ctx.mean(values)
                if ctx.is_main:
                    run.log(step, values)
            if ctx.is_main and due(step, settings.preview_every, settings.steps):
                write_preview(run.preview_path(step), rignet, dfr, data, loss, settings, G,
                              device)
            if ctx.is_main and due(step, settings.checkpoint_every, settings.steps):
                _checkpoint(run, step, rignet, optimizer, metadata)
    except KeyboardInterrupt:
        if ctx.is_main:
            _checkpoint(run, step, rignet, optimizer, metadata)
        raise
    finally:
        bar.close()
    return rignet.eval()


def _checkpoint(run: RunDir, step: int, rignet, optimizer, metadata) -> None:
    run.save_checkpoint(step, rignet, optimizer)
    save_rignet(rignet, run.path / "rignet.safetensors", {**metadata, "step": str(step)})


def _preview_generator(path, data: TrainingData, device):
    path = path or data.corpus.manifest.get("generator")
    if path and Path(path).is_file():
        return load_generator(path, device)
    return None


@torch.no_grad()
def write_preview(path, rignet, dfr, data: TrainingData, loss: RenderLoss,
                  settings: RigNetSettings, G, device, pairs: int = 4) -> None:
    """One row per pair (w, v): I_w, I_v, then per mode the edit of w towards v - the
    generator's image of w_hat when a generator is at hand, and F(w_hat) rendered over I_w."""
    chosen = data.usable[: pairs + 1]
    w_index, v_index = chosen[:-1], chosen[1:]
    size, layout = loss.size, rignet.layout
    w, v = data.w(w_index, device), data.w(v_index, device)
    target_w = data.targets(w_index, size, device)
    target_v = data.targets(v_index, size, device)
    c_w, c_v = dfr(w).controls(layout), dfr(v).controls(layout)
    rows = [[target_w.photo[i], target_v.photo[i]] for i in range(len(w_index))]
    for mode in settings.modes:
        w_hat = rignet(w, mix_controls(c_w, c_v, [mode] * len(w_index), layout))
        buffers, _ = loss.renderer.render(dfr(w_hat), size)
        images = (to_pipeline_images(G.synthesis(w_hat), size) if G is not None else None)
        for i, row in enumerate(rows):
            if images is not None:
                row.append(images[i])
            row.append(overlay(target_w.photo[i], buffers.rendered[i], buffers.mask[i]))
    save_grid(rows, path)
