"""DistributedDataParallel set-up for ``torchrun`` (gloo on CPU, nccl on CUDA) and the
collective checks the trainer runs."""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainingError


@dataclass
class DistContext:
    """This process's place in the run: rank, world size, local rank; ``owns_group`` when
    the engine created the process group (and so destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group ``torchrun`` describes (env ``WORLD_SIZE`` > 1), or reuse one
    the caller initialised. gloo on CPU, nccl on CUDA."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "gloo":
        atexit.unregister(_let_gloo_workers_finish)  # once per process, however many runs
        atexit.register(_let_gloo_workers_finish)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)


def _let_gloo_workers_finish(seconds: float = 0.2) -> None:
    """Release the GIL for a moment before interpreter shutdown.

    A gloo worker thread drops a finished collective's tensors just after the caller's wait
    returns, and that needs the GIL. DDP keeps the gloo group (and its threads) alive after
    ``destroy_process_group``, so in a script that ends right after training the release can
    fall into interpreter shutdown, where taking the GIL ends the thread and the process
    aborts ("terminate called without an active exception", SIGABRT; seen in core dumps).
    An ``atexit`` handler runs while the interpreter is still whole, so sleeping here lets
    any such release finish first.
    """
    time.sleep(seconds)


def resolve_device(config, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def mean_over_ranks(values: dict, ddp: DistContext, device) -> dict:
    """Average logged loss terms over the ranks. A term some rank lacks this step (e.g. a
    mask term when its images had no positive cell) is averaged over the ranks that have it;
    a NaN anywhere stays NaN, so every rank sees a non-finite loss alike."""
    if not ddp.enabled:
        return values
    gathered = [None] * ddp.world_size
    dist.all_gather_object(gathered, list(values))
    keys = list(dict.fromkeys(k for ks in gathered for k in ks))
    sums = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)
    counts = torch.tensor([float(k in values) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    return dict(zip(keys, (sums / counts).tolist()))


def check_replicas_identical(model: nn.Module) -> None:
    """Raise :class:`TrainingError` unless every rank holds exactly the same parameters
    (element-wise max and min over ranks coincide)."""
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise TrainingError(
            f"the {dist.get_world_size()} processes ended with different weights (max difference "
            f"{float((high - low).max()):.3g}); their updates diverged"
        )


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them
    at the start of each forward, so this changes nothing for training; it makes the final
    replicas identical, not just their parameters."""
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)
