"""The task-independent training loop.

:func:`train` runs ``config.steps`` optimizer steps of a :class:`~apro.engine.task.Task`: SGD
or AdamW, linear warm-up then step or cosine decay, AMP on CUDA, DistributedDataParallel when
launched by ``torchrun`` (gloo on CPU, nccl on CUDA), rank-0-only logging and checkpointing.

Each checkpoint holds the model, optimizer, scheduler and gradient-scaler state, the step and
epoch, every rank's RNG states, the task name, the config and the per-step loss history, so
that ``resume`` continues the step count and reproduces the loss curve of an uninterrupted
run (exactly, on the CPU with a fixed seed). Data order and augmentation are functions of
``(seed, epoch, index)`` only (:mod:`apro.engine.sampling`).
"""
from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import (
    DistContext,
    broadcast_buffers,
    check_replicas_identical,
    init_distributed,
    mean_over_ranks,
    resolve_device,
)
from .errors import DataError, TrainingError
from .log import LOG_CSV, LOG_JSONL, LossLog
from .optim import WarmupSchedule, build_optimizer, build_scheduler
from .sampling import EpochSampler, SeededItems, item_seed
from .task import Task

CONFIG_JSON = "config.json"
EVALUATIONS_JSONL = "evaluations.jsonl"
_RUN_FILES = (LOG_CSV, LOG_JSONL)

Hook = Callable[[int, nn.Module], Optional[dict]]


@dataclass
class TrainResult:
    """What :func:`train` returns: the final step, the loss history (one dict per step),
    the last checkpoint written (rank 0; None elsewhere), the unwrapped model and the rows
    the evaluation hooks returned."""

    step: int
    history: list
    checkpoint: Optional[Path]
    model: nn.Module
    evaluations: list


def _check_out_dir(out: Path, resuming: bool) -> None:
    if resuming:
        return
    clash = [p.name for p in list_checkpoints(out)] + [n for n in _RUN_FILES if (out / n).exists()]
    if clash:
        raise FileExistsError(
            f"output directory {out} already holds a run ({', '.join(clash[:3])}); "
            f"resume it with --resume {out} or choose another --out"
        )


def train(
    config,
    task: Task,
    *,
    resume=None,
    model: Optional[nn.Module] = None,
    dataset: Optional[Dataset] = None,
    collate_fn: Optional[Callable] = None,
    progress: bool = True,
    stop_after: Optional[int] = None,
    hooks: Sequence[Hook] = (),
    extend_schedule: bool = False,
) -> TrainResult:
    """Train ``task`` for ``config.steps`` optimizer steps and return a :class:`TrainResult`.

    ``resume``: a checkpoint file or run directory; training continues from its step with its
    model, optimizer, scheduler and RNG states (its saved config should be passed as
    ``config``, possibly with a larger ``steps``). ``model``/``dataset``/``collate_fn``
    default to what ``task`` builds from ``config``. ``hooks``: callables
    ``hook(step, model) -> dict | None`` run on rank 0 after every checkpoint (e.g. an
    evaluation); the dicts they return are appended to ``OUT/evaluations.jsonl``.
    ``stop_after``: end after that step as if interrupted (tests).
    ``extend_schedule``: with ``resume``, re-place the LR schedule on ``config.steps`` (decay
    points at their fractions of the new total) instead of keeping the checkpoint's, whose
    decay points sit on the first run's steps (so extra steps would run at its final LR).

    A new run that fails before its first step removes the files it created (and the output
    directory, if it created it and left it empty), so it leaves no debris behind; one that
    fails later keeps its loss log (which shows what happened) and its checkpoints.
    """
    config.validate()
    out = Path(config.out)
    device_kind = "cuda" if (config.device == "auto" and torch.cuda.is_available()) or config.device.startswith("cuda") else "cpu"
    ddp = init_distributed(device_kind)
    try:
        return _train(config, task, out, ddp, resume, model, dataset, collate_fn, progress, stop_after, hooks,
                      extend_schedule)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _reschedule(optimizer, scheduler, config) -> None:
    """Give a resumed ``LambdaLR`` the :class:`WarmupSchedule` of ``config`` (its ``steps``) and
    set every group's LR to that schedule's value at the scheduler's current step."""
    scheduler.lr_lambdas = [WarmupSchedule(config) for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    for group, base, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _remove_debris(out: Path, created_dir: bool) -> None:
    """After a failure before the first step: remove the run files this call wrote."""
    for name in (*_RUN_FILES, CONFIG_JSON, EVALUATIONS_JSONL):
        (out / name).unlink(missing_ok=True)
    if created_dir:
        try:
            out.rmdir()
        except OSError:
            pass  # not empty: something else lives there


def _train(config, task, out, ddp: DistContext, resume, model, dataset, collate_fn, progress, stop_after, hooks,
           extend_schedule=False):
    device = resolve_device(config, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    state = load_checkpoint(resume, map_location="cpu") if resume is not None else None
    if state is not None and state.get("task", "box") != task.name:
        raise ValueError(f"checkpoint {state['path']} is of task {state.get('task', 'box')!r}, not {task.name!r}")
    if ddp.is_main:
        _check_out_dir(out, resuming=state is not None)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if dataset is None:
        dataset = task.build_dataset(config)
    if collate_fn is None:
        collate_fn = task.collate_fn()
    meta = task.dataset_meta(dataset)
    if model is None:
        model = task.build_model(config, meta)
    model.to(device)

    per_rank = len(dataset) // ddp.world_size
    steps_per_epoch = per_rank // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set has {len(dataset)} images, fewer than batch_size x processes = "
            f"{config.batch_size} x {ddp.world_size}; lower --batch-size or add images"
        )

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    use_amp = bool(config.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if extend_schedule:  # the restored schedule object carries the first run's steps: rebuild it
            _reschedule(optimizer, scheduler, config)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, history = int(state["step"]), list(state.get("history", []))
        rng = state.get("rng", [])
        if rng:
            set_rng_state(rng[ddp.rank] if ddp.rank < len(rng) else rng[0])
        del state
        if step >= config.steps:
            raise ValueError(f"the checkpoint is at step {step}, already >= steps={config.steps}; raise --steps to train further")
        resuming = True
    else:
        resuming = False
    history = history[:step]

    net = model
    if ddp.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )

    created_dir = False
    if ddp.is_main:
        created_dir = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
    if ddp.enabled:
        dist.barrier()
    log = LossLog(out, history) if ddp.is_main else None
    if ddp.is_main:
        (out / CONFIG_JSON).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    items = SeededItems(dataset, config.seed)
    bar = None
    if ddp.is_main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=task.describe(config), unit="step", dynamic_ncols=True)

    last_ckpt, evaluations = None, []
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    net.train()
    try:
        while step < end:
            epoch, offset = divmod(step, steps_per_epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)  # before the loader forks its workers
            sampler = EpochSampler(len(dataset), config.seed, epoch, ddp.rank, ddp.world_size,
                                   start=offset * config.batch_size)
            # Its own generator: creating a loader must not draw from the global RNG, or a
            # resumed run (new loader mid-epoch) would diverge from the uninterrupted one.
            loader = DataLoader(items, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                                collate_fn=collate_fn, num_workers=config.num_workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(item_seed(config.seed, epoch, -1)))
            batches = iter(loader)
            while step < end:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (OSError, ValueError, KeyError, RuntimeError) as err:
                    raise DataError(f"loading the batch for step {step + 1} failed: {err}") from err
                terms = _train_step(net, task, batch, optimizer, scheduler, scaler, config, device, use_amp, step, ddp)
                step += 1
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **terms}
                history.append(row)
                if log is not None:
                    log.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)
                if step % config.checkpoint_every == 0 or step == end:
                    last_ckpt = _checkpoint(out, task, model, optimizer, scheduler, scaler, step, epoch, config,
                                            history, ddp, meta)
                    if ddp.is_main:
                        evaluations += _run_hooks(hooks, step, model, out)
    except BaseException:
        if ddp.is_main and not resuming and not history:
            _remove_debris(out, created_dir)
        raise
    finally:
        if bar is not None:
            bar.close()
    if ddp.enabled:
        broadcast_buffers(model)
        check_replicas_identical(model)
    return TrainResult(step, history, last_ckpt, model, evaluations)


def _run_hooks(hooks, step: int, model: nn.Module, out: Path) -> list:
    rows = []
    for hook in hooks:
        was_training = model.training
        row = hook(step, model)
        model.train(was_training)
        if row is not None:
            row = {"step": step, **row}
            rows.append(row)
            with open(out / EVALUATIONS_JSONL, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def _train_step(net, task, batch, optimizer, scheduler, scaler, config, device, use_amp, step, ddp) -> dict:
    """One optimizer step; returns the loss terms (averaged over ranks) for the log, and with
    ``grad_clip`` set the gradients' total norm before clipping (``grad_norm``)."""
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
    with autocast:
        losses = task.losses(net, batch, device)
    if not isinstance(losses, dict) or "loss" not in losses:
        raise TrainingError("the model's training forward must return a dict of loss tensors including 'loss'")
    terms = mean_over_ranks({k: float(v.detach()) for k, v in losses.items()}, ddp, device)
    if not all(math.isfinite(v) for v in terms.values()):  # checked on rank means: all ranks stop
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise TrainingError(f"non-finite loss at step {step + 1} ({shown}); lower --lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    if config.grad_clip is not None:
        scaler.unscale_(optimizer)
        norm = nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        terms["grad_norm"] = float(norm)  # before clipping; the same on every rank (after DDP's all-reduce)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return terms


def _checkpoint(out, task, model, optimizer, scheduler, scaler, step, epoch, config, history, ddp, meta):
    rng = rng_state()
    if ddp.enabled:
        gathered = [None] * ddp.world_size
        dist.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    path = None
    if ddp.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "rng": rng,
            "task": task.name,
            "config": config.to_dict(),
            "history": history,
            "meta": meta,
        }
        path = save_checkpoint(state, checkpoint_path(out, step))
        if config.keep_checkpoints:
            for old in list_checkpoints(out)[:-config.keep_checkpoints]:
                old.unlink(missing_ok=True)
    if ddp.enabled:
        dist.barrier()
    return path
