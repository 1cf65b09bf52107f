"""Training on several GPUs: torchrun processes and DistributedDataParallel.

Every training command runs unchanged as one process, or as N processes under torchrun::

    torchrun --nproc-per-node 4 -m server.training.stylerig rignet --device cuda ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; ``setup`` joins the process group (NCCL on
CUDA, gloo on CPU) and gives each process its GPU (``cuda:LOCAL_RANK``). The conventions that
make N processes train the model one process would:

* The batch size is the global one. Each step's batch is drawn exactly as in one process (a
  pure function of the seed and the step, or the run's generator, identical on every rank)
  and rank r takes the r-th of N equal contiguous slices (``shard``); it must divide evenly.
* Losses are means over the local slice; DDP averages gradients over the ranks, so the
  update equals the one-process update up to the order of floating-point sums.
* Parameters and buffers start equal on every rank (DDP broadcasts rank 0's when it wraps a
  module); checkpoints are read by every rank and written by rank 0 only, so a run resumes the
  same at any world size.
* Logged values are means over the ranks (``mean``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world``, and its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, previews and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, batch_size: int) -> slice:
        """This rank's slice of a global batch of ``batch_size``."""
        if batch_size % self.world:
            raise ValueError(f"batch size {batch_size} does not split over {self.world} "
                             f"processes: use a multiple of {self.world}")
        local = batch_size // self.world
        return slice(self.rank * local, (self.rank + 1) * local)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel (itself in one process). Call the wrapper's
        forward exactly once per step; read attributes and state_dict from ``module``."""
        if not self.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-rank scalars averaged over the ranks that report each key (a per-mode loss
        may be absent from a rank whose slice has no sample of that mode)."""
        if not self.distributed:
            return values
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, {k: float(v) for k, v in values.items()})
        keys = dict.fromkeys(k for part in gathered for k in part)
        return {k: sum(p[k] for p in gathered if k in p) / sum(k in p for p in gathered)
                for k in keys}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup(device="cpu") -> Context:
    """This process's Context. Under torchrun (WORLD_SIZE > 1) joins the process group once
    (later calls return the same context); ``device`` "cuda" becomes this rank's GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world <= 1:
        return Context(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world, device)


def teardown(finished: bool = False) -> None:
    """Leave the process group (end of a training command). ``finished``: every rank ended
    its work normally, so wait for all of them first; a rank that leaves while rank 0 still
    writes the last checkpoint can bring the group down under it (gloo aborts)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
