"""A training run's folder: settings, checkpoints that survive a kill, loss logs, previews.

Layout of ``run_dir``:

    settings.json       the run's settings; a resumed run must use the same ones (only the
                        step count and the logging cadence may change)
    checkpoint.pt       the last checkpoint: {'step', 'model', 'optimizer', 'settings'}; written
                        to a temporary file and renamed, so a kill never leaves half a file
    log.jsonl           one JSON object per logged step: {'step', 'time', <every loss term>}
    log.csv             the same records as CSV (rewritten at every checkpoint)
    previews/step_0001000.png   preview grids
    <model>.safetensors the exported network, refreshed at every checkpoint

``step`` always counts completed optimiser steps. On resume the log is cut back to the
checkpoint's step, so records of steps that are about to be redone do not appear twice.
Under torchrun every process reads the folder and only rank 0 writes it (``writable``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from portrait_rig.files import atomic_path, write_atomic
from server.checkpoints.torch_file import write_torch_file
from server.training.runs import lock_run_folder

# Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "preview_every")


def absent_values(settings) -> dict:
    """What a stored record (run settings, corpus manifest) written before a setting existed
    is taken to have had: the setting's default, or the value the settings class names for
    such records (``ABSENT_MEANS``, when the default changed with the setting's arrival)."""
    return {**{f.name: f.default for f in dataclasses.fields(settings)
               if f.default is not dataclasses.MISSING},
            **getattr(settings, "ABSENT_MEANS", {})}


class RunDir:
    def __init__(self, path, settings, writable: bool = True):
        self.path = Path(path)
        self.writable = writable
        if writable:
            self.lock = lock_run_folder(self.path)  # held for the rest of the process
            (self.path / "previews").mkdir(exist_ok=True)
        self.settings = json.loads(json.dumps(dataclasses.asdict(settings)))  # as stored
        self.defaults = json.loads(json.dumps(absent_values(settings)))
        self._check_settings()
        self.log_path = self.path / "log.jsonl"
        self.t0 = time.monotonic()

    def _check_settings(self) -> None:
        path = self.path / "settings.json"
        if path.is_file():
            previous = {**self.defaults, **json.loads(path.read_text())}
            for key in sorted(set(previous) | set(self.settings)):
                if key in RESUMABLE_CHANGES:
                    continue
                if previous.get(key) != self.settings.get(key):
                    raise ValueError(f"{self.path}: this run was started with {key}="
                                     f"{previous.get(key)!r}, now {key}={self.settings.get(key)!r}"
                                     "; use a new run folder or the original setting")
        if self.writable:
            write_atomic(path, json.dumps(self.settings, indent=2).encode())

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def load_checkpoint(self, device) -> dict | None:
        """The last checkpoint (tensors on ``device``), with the log cut back to its step;
        None for a fresh run."""
        if not self.checkpoint_path.is_file():
            self._truncate_log(0)
            return None
        state = torch.load(self.checkpoint_path, map_location=device, weights_only=True)
        self._truncate_log(int(state["step"]))
        return state

    def save_checkpoint(self, step: int, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
        state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "settings": self.settings}
        write_torch_file(state, self.checkpoint_path)
        self._write_csv()

    # ------------------------------------------------------------------ logs
    def log(self, step: int, terms: dict[str, float]) -> None:
        record = {"step": step, "time": round(time.monotonic() - self.t0, 3), **terms}
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.log_path.is_file():
            return []
        with open(self.log_path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def _truncate_log(self, step: int) -> None:
        if not self.writable:
            return
        kept = [r for r in self.records() if r["step"] <= step]
        write_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _write_csv(self) -> None:
        records = self.records()
        columns = list(dict.fromkeys(k for r in records for k in r))
        with atomic_path(self.path / "log.csv") as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)

    def preview_path(self, step: int) -> Path:
        return self.path / "previews" / f"step_{step:07d}.png"


def check_lr_decay(decay: float) -> None:
    """Refuse an ``lr_decay`` setting that ``scheduled_lr`` cannot follow."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"lr_decay: expected a fraction in [0, 1], got {decay!r}")


def scheduled_lr(lr: float, step: int, steps: int, decay: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of a ``steps``-step run: ``lr``, then
    over the last ``decay`` fraction of the run a cosine fall to zero (0: constant). A function
    of the step alone, so a resumed run follows the same schedule."""
    start = (1.0 - decay) * steps
    if decay <= 0 or step < start:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / (steps - start))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def due(step: int, every: int, last: int) -> bool:
    """True when ``step`` is a multiple of ``every`` (> 0) or the run's ``last`` step."""
    return step == last or (every > 0 and step % every == 0)
