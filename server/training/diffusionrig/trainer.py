"""DiffusionRig's training loop, shared by stage 1 (generic prior) and stage 2 (personal).

What the official trainer does (adobe-research/diffusion-rig: ``utils/train_util.py``,
``diffusion/gaussian_diffusion.py``, ``scripts/train.py``), and so what this one does:

* Loss: t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps on the
  linear 1000-step schedule; the UNet predicts eps from (x_t, t, buffers, z) with
  z = encoder(x_0); loss = mean over the batch of mean_pixels(w_t (eps - eps_hat)^2) with P2's
  weight w_t = 1 / (k + SNR_t)^gamma, SNR_t = abar_t / (1 - abar_t), k = gamma = 1.
* Adam (no weight decay), gradients clipped to norm 1, no EMA; fp16 autocast with loss
  scaling on CUDA (the official runs always do); fp32 on the CPU.
* Stage 2 trains the UNet only (``train_encoder=False``). The official stage 2 freezes the
  encoder's weights but never calls ``eval()``, so its BatchNorm layers normalise with batch
  statistics and keep updating their running statistics on the album. Here the frozen
  encoder runs in eval mode: z is computed exactly as at inference (and once per photo, since
  it then never changes), and the personal checkpoint keeps the stage-1 encoder bit for bit,
  so a reference photo encodes the same with the personal and the stage-1 model.

Run folder::

    state.pt      everything to resume: model, optimiser, loss scaler, step, RNG states
                  (written atomically every ``save_every`` steps and at the end)
    model.pt      the model alone under the official names (``torch.save(state_dict)``),
                  what ``server.models.diffusionrig.load_diffusionrig`` reads
    log.jsonl     one JSON line per step: step, loss, grad_norm, lr, t (mean timestep),
                  seconds; on resume, lines past the resumed step (lost with the kill) go

A killed run resumes from its last ``state.pt`` and, on the same device, continues exactly as
the uninterrupted run would have (same batches, noise, timesteps and dropout masks).

Under torchrun (``server.training.distributed``) the UNet (and the encoder when it trains) run
in DistributedDataParallel: every process draws the step's whole batch, timesteps and noise
from the run's generator and trains on its slice, so N processes take the step one process
would (dropout masks aside, which differ per process); BatchNorm layers of a training encoder
normalise per process, as the official multi-GPU runs did. Rank 0 writes the run folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from server.checkpoints.torch_file import write_torch_file
from server.diffusion import NoiseSchedule
from server.models.diffusionrig import DiffusionRig
from server.training.progress import Progress
from server.training.runs import lock_run_folder
from server.training import distributed

STATE_FILE, MODEL_FILE, LOG_FILE = "state.pt", "model.pt", "log.jsonl"
COMPLETE_FILE = "complete.json"     # written after model.pt: the model is finished


@dataclass
class TrainConfig:
    """Hyper-parameters (defaults: the official stage 2; stage 1 used lr 1e-4, batch 32 per
    GPU on 8 GPUs, 50000 steps)."""
    steps: int = 5000
    batch_size: int = 4
    lr: float = 1e-5
    grad_clip: float = 1.0
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    train_encoder: bool = False
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"           # "auto" (fp16 on CUDA, fp32 elsewhere), "fp32", "fp16"

    def __post_init__(self):
        for name in ("steps", "batch_size", "save_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ValueError(f"precision: expected auto, fp32 or fp16, got {self.precision!r}")


class TrainingData(Protocol):
    """Training examples: aligned images in [-1, 1] and their DiffusionRig buffers."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] and buffers [B, 9, S, S] (rendered, normal, albedo), float32
        CPU tensors."""


class TensorData:
    """Training data held in memory (a personal album)."""

    def __init__(self, images: torch.Tensor, buffers: torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or buffers.shape[0] != images.shape[0] \
                or buffers.shape[2:] != images.shape[2:]:
            raise ValueError(f"expected images [N, 3, S, S] and buffers [N, C, S, S], got "
                             f"{tuple(images.shape)} and {tuple(buffers.shape)}")
        self.images, self.buffers = images.float(), buffers.float()

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.buffers[indices]


def p2_weights(schedule: NoiseSchedule, gamma: float = 1.0, k: float = 1.0) -> torch.Tensor:
    """[T] float64: 1 / (k + SNR_t)^gamma (Choi et al. 2022), SNR_t = abar_t / (1 - abar_t)."""
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float64)
    return 1.0 / (k + abar / (1.0 - abar)) ** gamma


class Trainer:
    """Trains ``model`` on ``data`` into the run folder ``out_dir`` (see the module notes).

    The model's encoder is frozen (eval mode) unless ``config.train_encoder``; the UNet trains.
    ``log`` receives progress lines (default: stderr).
    """

    def __init__(self, model: DiffusionRig, data: TrainingData, out_dir, config: TrainConfig,
                 device="cpu", log=None):
        if len(data) < 1:
            raise ValueError("training data: no examples")
        self.model, self.data, self.config = model, data, config
        self.out_dir = Path(out_dir)
        self.ctx = distributed.setup(device)
        self.device = self.ctx.device
        self.part = self.ctx.shard(config.batch_size)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.schedule = NoiseSchedule.linear()
        self.abar = torch.as_tensor(self.schedule.alphas_cumprod, dtype=torch.float32)
        self.weights = p2_weights(self.schedule, config.p2_gamma, config.p2_k).float()
        model.to(self.device)
        model.requires_grad_(True)
        model.train()
        if not config.train_encoder:
            model.encoder.requires_grad_(False).eval()
        # The modules a step runs forward, in DDP under torchrun (one forward each per step).
        self.unet = self.ctx.wrap(model.denoisingUNet)
        self.encoder = self.ctx.wrap(model.encoder) if config.train_encoder else model.encoder
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=0.0)
        fp16 = config.precision == "fp16" or (config.precision == "auto"
                                               and self.device.type == "cuda")
        self.autocast_dtype = torch.float16 if fp16 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.step = 0
        self.image_shape = tuple(data.batch([0])[0].shape[1:])
        self._latents: torch.Tensor | None = None      # frozen encoder: z per example

    # ------------------------------------------------------------------ one step
    def sample(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Batch indices (without replacement while the data allows, as the official
        stage 2 does), timesteps [B] and noise [B, 3, S, S], all from the run's generator;
        under torchrun this process's slice of them."""
        n, b = len(self.data), self.config.batch_size
        if b <= n:
            indices = torch.randperm(n, generator=self.generator)[:b]
        else:
            indices = torch.randint(n, (b,), generator=self.generator)
        t = torch.randint(self.schedule.num_steps, (b,), generator=self.generator)
        noise = torch.randn((b, *self.image_shape), generator=self.generator)
        part = self.part
        return indices[part].tolist(), t[part], noise[part]

    def latents(self, indices: list[int], images: torch.Tensor) -> torch.Tensor:
        """z [B, latent] of a batch: from the training encoder, or, when it is frozen, looked
        up in the z of every example, encoded once."""
        if self.config.train_encoder:
            return self.encoder(images)
        if self._latents is None:
            chunks = []
            with torch.no_grad(), self._autocast():
                for start in range(0, len(self.data), 16):
                    chunk, _ = self.data.batch(list(range(start, min(start + 16, len(self.data)))))
                    chunks.append(self.model.encode(chunk.to(self.device)).float())
            self._latents = torch.cat(chunks)
        return self._latents[indices]

    def loss(self, images, buffers, t, noise, z) -> torch.Tensor:
        """The P2-weighted eps loss of one batch (module notes); everything on the device."""
        abar = self.abar.to(self.device)[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * images + (1 - abar).sqrt() * noise
        eps = self.unet(x_t, t, buffers, z)
        weight = self.weights.to(self.device)[t].view(-1, 1, 1, 1)
        return (weight * (noise - eps.float()) ** 2).mean(dim=(1, 2, 3)).mean()

    def train_step(self) -> dict:
        indices, t, noise = self.sample()
        images, buffers = self.data.batch(indices)
        dev = self.device
        images, buffers, t, noise = images.to(dev), buffers.to(dev), t.to(dev), noise.to(dev)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(images, buffers, t, noise, self.latents(indices, images))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        means = self.ctx.mean({"loss": float(loss.detach()), "t": float(t.float().mean())})
        return {"step": self.step, "loss": means["loss"], "grad_norm": float(grad_norm),
                "lr": self.optimizer.param_groups[0]["lr"], "t": means["t"]}

    @torch.no_grad()
    def evaluate(self, seed: int = 1234, repeats: int = 8) -> float:
        """Mean loss over a fixed draw of examples, timesteps and noise (model in eval mode),
        comparable between steps: the training loss itself is too noisy to compare."""
        generator = torch.Generator("cpu").manual_seed(seed)
        modes = [(m, m.training) for m in (self.model.denoisingUNet, self.model.encoder)]
        self.model.eval()                  # no dropout, no BatchNorm statistics updates
        total = 0.0
        for _ in range(repeats):
            indices = torch.randint(len(self.data), (self.config.batch_size,),
                                    generator=generator).tolist()
            images, buffers = self.data.batch(indices)
            t = torch.randint(self.schedule.num_steps, (len(indices),), generator=generator)
            noise = torch.randn(images.shape, generator=generator)
            dev = self.device
            images, buffers, t, noise = images.to(dev), buffers.to(dev), t.to(dev), noise.to(dev)
            with self._autocast():
                z = (self.model.encode(images) if self.config.train_encoder
                     else self.latents(indices, images))
                total += float(self.loss(images, buffers, t, noise, z))
        for module, training in modes:
            module.train(training)
        return total / repeats

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = True) -> Path:
        """Train up to ``config.steps`` (continuing a saved run when ``resume``); returns the
        path of ``model.pt``. Under torchrun every process trains; the main one alone holds
        the run folder and writes to it."""
        main = self.ctx.is_main
        lock = lock_run_folder(self.out_dir) if main else contextlib.nullcontext()
        with lock:
            if resume and (self.out_dir / STATE_FILE).is_file():
                self.load_state()
            else:
                torch.manual_seed(self.config.seed + self.ctx.rank)     # dropout masks
                if main:
                    (self.out_dir / LOG_FILE).unlink(missing_ok=True)
            if main:
                self._truncate_log()
            if main and self.step < self.config.steps:
                # The folder's model changes from here on: until the run finishes there is
                # no model.pt for the server (or anyone) to pick up half-trained.
                (self.out_dir / COMPLETE_FILE).unlink(missing_ok=True)
                (self.out_dir / MODEL_FILE).unlink(missing_ok=True)
            self._train()
            if main and not (self.out_dir / COMPLETE_FILE).is_file():
                write_torch_file(self.model.state_dict(), self.out_dir / MODEL_FILE)
                (self.out_dir / COMPLETE_FILE).write_text(json.dumps(
                    {"steps": self.step, "config": asdict(self.config)}, indent=2))
        return self.out_dir / MODEL_FILE

    def _train(self) -> None:
        main, total = self.ctx.is_main, self.config.steps
        bar = Progress(total, self.out_dir.name, start=self.step, enabled=main, unit="step")
        with open(self.out_dir / LOG_FILE if main else os.devnull, "a") as log_file:
            while self.step < total:
                t0 = time.monotonic()
                record = self.train_step()
                record["seconds"] = round(time.monotonic() - t0, 4)
                log_file.write(json.dumps(record) + "\n")
                bar.update(1, loss=record["loss"], grad=record["grad_norm"])
                if self.step % self.config.log_every == 0 or self.step == total:
                    log_file.flush()
                if self.step % self.config.save_every == 0 or self.step == total:
                    log_file.flush()
                    self.save_state()
        bar.close()

    # ------------------------------------------------------------------ state
    def save_state(self) -> None:
        """``state.pt`` (model, optimiser, random state), written to a temporary file and
        renamed, so a kill never leaves a half-written file. ``model.pt`` is written once, when
        the run is complete."""
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ctx.distributed:                   # each process's dropout state
            ranks: list = [None] * self.ctx.world
            torch.distributed.all_gather_object(ranks, (rng["torch"], rng.get("cuda")))
            rng["torch_ranks"] = [r[0] for r in ranks]
            if "cuda" in rng:
                rng["cuda_ranks"] = [r[1] for r in ranks]
        if not self.ctx.is_main:
            return
        state = {"step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": rng, "config": asdict(self.config)}
        write_torch_file(state, self.out_dir / STATE_FILE)

    def load_state(self) -> None:
        state = torch.load(self.out_dir / STATE_FILE, map_location="cpu", weights_only=True)
        saved = state.get("config", {})
        for name in ("batch_size", "lr", "train_encoder", "seed", "p2_gamma", "p2_k"):
            if name in saved and saved[name] != getattr(self.config, name):
                raise ValueError(f"{self.out_dir} was trained with {name}={saved[name]!r}, "
                                 f"not {getattr(self.config, name)!r}: resume with the same "
                                 "settings or start a new run folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        self.generator.set_state(rng["generator"])
        mine = self.ctx.rank if len(rng.get("torch_ranks", ())) == self.ctx.world else None
        torch.set_rng_state(rng["torch"] if mine is None else rng["torch_ranks"][mine])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"] if mine is None else rng["cuda_ranks"][mine],
                                     self.device)
        self.step = int(state["step"])

    def _truncate_log(self) -> None:
        """Drop log lines past the current step (steps a killed run did after its last save)."""
        path = self.out_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


