"""Training loop for box-supervised instance segmentation (issue 4; paper Sec. 4.1).

One function, :func:`train`, runs the whole loop from a :class:`TrainConfig`: SGD or AdamW,
linear warm-up then step or cosine decay, AMP on CUDA, DistributedDataParallel when launched
by ``torchrun`` (gloo on CPU, nccl on CUDA), rank-0-only logging and checkpointing.

Checkpoints are written atomically (temporary file in the same directory, fsync, rename), so
a crash while saving never leaves a truncated checkpoint behind. Each one holds the model,
optimizer, scheduler and gradient-scaler state, the step and epoch, every rank's RNG states,
the config and the per-step loss history, so that ``resume`` continues the step count and
reproduces the loss curve of an uninterrupted run (exactly, on the CPU with a fixed seed).

Data order and augmentation are functions of ``(seed, epoch, index)`` only (see
:class:`_EpochSampler` and :class:`_SeededItems`), which is what makes mid-epoch resume exact
whatever ``num_workers`` is.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ._atomic import atomic_path

CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_SUFFIX = ".pt"
LOG_CSV = "log.csv"
LOG_JSONL = "log.jsonl"
CONFIG_JSON = "config.json"
_RUN_FILES = (LOG_CSV, LOG_JSONL)

MASK_LOSSES = (
    "apro", "projection", "pairwise", "treefilter", "treefilter-local",
    "crf", "gp", "lp", "gp-lp-c", "lp-gp-c",
)
BACKBONES = ("efficientnet_lite0", "resnet50", "resnet101")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")


class CheckpointError(Exception):
    """A checkpoint file that is missing, unreadable or not written by :func:`train`."""


class DataError(Exception):
    """Loading a training batch failed; the message names the step and the cause."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says at which step and why."""


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved into every checkpoint.

    Defaults follow the SOLOv2 schedule of the released APro configs (SGD, lr 0.01 for 16
    images, momentum 0.9, weight decay 1e-4, 500 warm-up steps from 1% of the lr, decay by
    10x at 75% and 90% of training, gradient norm clipped at 35), shortened for CPU use.
    ``batch_size`` is per process: under ``torchrun`` the global batch is
    ``batch_size * world_size``.
    """

    data: str = ""
    ann: str = ""
    out: str = "runs/box"
    eval_ann: Optional[str] = None
    eval_data: Optional[str] = None

    mask_loss: str = "apro"
    backbone: str = "efficientnet_lite0"
    backbone_weights: Optional[str] = None
    pretrained: bool = True
    model_options: dict = field(default_factory=dict)

    steps: int = 1000
    batch_size: int = 2
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: tuple = (0.75, 0.9)
    gamma: float = 0.1
    warmup_steps: int = 500
    warmup_factor: float = 0.01
    grad_clip: Optional[float] = 35.0

    short_sides: tuple = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    test_short_side: int = 800
    flip: bool = True

    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 0
    amp: bool = True
    device: str = "auto"
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        self.short_sides = tuple(int(s) for s in self.short_sides)
        self.model_options = dict(self.model_options or {})

    def validate(self) -> "TrainConfig":
        """Check the values; raises ValueError naming the offending field."""
        _choice(self.mask_loss, MASK_LOSSES, "mask_loss")
        _choice(self.backbone, BACKBONES, "backbone")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.schedule, SCHEDULES, "schedule")
        for name in ("steps", "batch_size", "checkpoint_every", "max_size", "test_short_side"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "num_workers", "keep_checkpoints"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must be in (0, 1], got {self.warmup_factor!r}")
        if any(not 0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones are fractions of the steps in (0, 1], got {self.milestones!r}")
        if not self.short_sides or min(self.short_sides) < 1:
            raise ValueError(f"short_sides must be a non-empty list of sizes >= 1, got {self.short_sides!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip!r}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["short_sides"] = list(self.short_sides)
        return d

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict; unknown keys are an error naming them and ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        """Read a JSON object of options (a subset of the fields)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object of options")
        return cls.from_dict(values, source=str(path))


def _choice(value, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters; no decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


class WarmupSchedule:
    """LR multiplier at step ``s``: linear warm-up from ``warmup_factor`` over ``warmup_steps``,
    then constant, step decay by ``gamma`` at each milestone fraction, or cosine to zero."""

    def __init__(self, config: TrainConfig):
        self.steps = int(config.steps)
        self.warmup_steps = int(config.warmup_steps)
        self.warmup_factor = float(config.warmup_factor)
        self.schedule = config.schedule
        self.milestones = [int(round(m * self.steps)) for m in config.milestones]
        self.gamma = float(config.gamma)

    def __call__(self, step: int) -> float:
        if self.schedule == "step":
            factor = self.gamma ** sum(step >= m for m in self.milestones)
        elif self.schedule == "cosine":
            t = min(max(step - self.warmup_steps, 0) / max(self.steps - self.warmup_steps, 1), 1.0)
            factor = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            factor = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """A ``LambdaLR`` stepping once per optimizer step with :class:`WarmupSchedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(config))


# --------------------------------------------------------------------------------------------
# Checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same directory,
    flushed and fsynced, then renamed over ``path``. Whatever fails midway, ``path`` holds
    either its previous content or the complete new one, and no temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`train`; ``path`` may be a file or a run directory
    (its latest checkpoint is used). Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} contains no {CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX} files to resume from")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is not readable ({type(err).__name__}: {first})") from None
    missing = {"model", "step", "config"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(sorted(missing))}; it was not written by apro train")
    state["path"] = str(path)
    return state


def checkpoint_path(out_dir, step: int) -> Path:
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:08d}{CHECKPOINT_SUFFIX}"


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints in ``out_dir`` ordered by step (temporary files are ignored)."""
    found = []
    for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}"):
        stem = p.name[len(CHECKPOINT_PREFIX):-len(CHECKPOINT_SUFFIX)]
        if stem.isdigit():
            found.append((int(stem), p))
    return [p for _, p in sorted(found)]


def _rng_state() -> dict:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Loss log


class LossLog:
    """Per-step loss terms written to ``log.csv`` and ``log.jsonl`` (rank 0 only).

    Rows are ``{"step", "epoch", "lr", <every loss term>}``. On resume the files are rewritten
    from the checkpoint's history, so rows logged after that checkpoint by an interrupted run
    disappear and the curve continues as if uninterrupted.
    """

    def __init__(self, out_dir, history: Sequence[dict] = ()):
        self.out_dir = Path(out_dir)
        self.rows = [dict(r) for r in history]
        self.columns: list = []
        for r in self.rows:
            self._extend_columns(r)
        self._rewrite()

    def _extend_columns(self, row: dict) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns.extend(new)
        return bool(new)

    def _rewrite(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, write in ((LOG_CSV, self._write_csv), (LOG_JSONL, self._write_jsonl)):
            with atomic_path(self.out_dir / name) as tmp, open(tmp, "w", newline="") as f:
                write(f, self.rows)

    def _write_csv(self, f, rows, header=True) -> None:
        writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
        if header:
            writer.writeheader()
        writer.writerows(rows)

    @staticmethod
    def _write_jsonl(f, rows) -> None:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        if self._extend_columns(row):
            self._rewrite()  # a new loss term appeared: the CSV header must change
            return
        with open(self.out_dir / LOG_CSV, "a", newline="") as f:
            self._write_csv(f, [row], header=False)
        with open(self.out_dir / LOG_JSONL, "a") as f:
            self._write_jsonl(f, [row])


def read_log(path) -> list:
    """Rows of a ``log.jsonl`` written by :class:`LossLog`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Data order


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**31 - 1)


class _EpochSampler(Sampler):
    """The samples of one epoch for one rank: a permutation seeded by ``(seed, epoch)``,
    split across ranks like ``DistributedSampler(drop_last=True)``, starting at ``start``.
    Yields ``(epoch, index)`` so that :class:`_SeededItems` can seed each item."""

    def __init__(self, length, seed, epoch, rank, world_size, start=0):
        g = torch.Generator().manual_seed(seed + 1_000 * epoch)
        order = torch.randperm(length, generator=g).tolist()
        per_rank = length // world_size
        self.indices = order[rank * per_rank:(rank + 1) * per_rank][start:]
        self.epoch = epoch

    def __iter__(self):
        return ((self.epoch, i) for i in self.indices)

    def __len__(self):
        return len(self.indices)


@contextmanager
def _seeded_global_rng(seed: int):
    """Seed torch, NumPy and ``random`` for one item, restoring the caller's states after."""
    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


class _SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` draws its augmentation from an RNG seeded
    by ``(seed, epoch, index)``: the same sample whichever worker loads it, and when."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with _seeded_global_rng(_item_seed(self.seed, epoch, index)):
            return self.dataset[index]


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class _Dist:
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


def _init_distributed(device_kind: str) -> _Dist:
    """Join the process group ``torchrun`` describes (env ``WORLD_SIZE`` > 1), or reuse one
    the caller initialised. gloo on CPU, nccl on CUDA."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns_group=True)


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def _mean_over_ranks(values: dict, ddp: _Dist, device) -> dict:
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


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What :func:`train` returns: the final step, the loss history (one dict per step),
    the last checkpoint written (rank 0; None elsewhere) and the unwrapped model."""

    step: int
    history: list
    checkpoint: Optional[Path]
    model: nn.Module


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The SOLOv2 model of :mod:`apro.modeling` described by ``config``."""
    from .modeling import SOLOv2

    return SOLOv2(
        num_classes,
        backbone=config.backbone,
        pretrained=config.pretrained,
        backbone_weights=config.backbone_weights,
        mask_loss=config.mask_loss,
        **config.model_options,
    )


def build_train_dataset(config: TrainConfig):
    """The training :class:`apro.data.CocoBoxDataset` described by ``config``."""
    from .data import CocoBoxDataset

    return CocoBoxDataset(
        config.data, config.ann, train=True, short_sides=config.short_sides,
        max_size=config.max_size, flip=config.flip, seed=config.seed,
    )


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
    config: TrainConfig,
    *,
    resume=None,
    model: Optional[nn.Module] = None,
    dataset: Optional[Dataset] = None,
    collate_fn: Optional[Callable] = None,
    progress: bool = True,
    stop_after: Optional[int] = None,
) -> TrainResult:
    """Train for ``config.steps`` optimizer steps and return a :class:`TrainResult`.

    ``resume``: a checkpoint file or run directory; training continues from its step with its
    model, optimizer, scheduler and RNG states (its saved config should be passed as
    ``config``, possibly with a larger ``steps``). ``model``/``dataset``/``collate_fn``
    default to the SOLOv2 model, the COCO box dataset and ``apro.data.collate_batch``
    built from ``config``; pass your own to train something else with the same loop (the
    model's ``forward(images, valid=..., targets=...)`` must return a dict of loss tensors
    including ``"loss"``). ``stop_after``: end after that step as if interrupted (tests).
    """
    config.validate()
    out = Path(config.out)
    device_kind = "cuda" if (config.device == "auto" and torch.cuda.is_available()) or config.device.startswith("cuda") else "cpu"
    ddp = _init_distributed(device_kind)
    try:
        return _train(config, out, ddp, resume, model, dataset, collate_fn, progress, stop_after)
    finally:
        if ddp.owns_group:
            dist.destroy_process_group()


def _train(config, out, ddp, resume, model, dataset, collate_fn, progress, stop_after):
    device = _resolve_device(config, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    state = load_checkpoint(resume, map_location="cpu") if resume is not None else None
    if ddp.is_main:
        _check_out_dir(out, resuming=state is not None)
        out.mkdir(parents=True, exist_ok=True)
    if ddp.enabled:
        dist.barrier()

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if dataset is None:
        dataset = build_train_dataset(config)
    if collate_fn is None:
        from .data import collate_batch as collate_fn
    if model is None:
        model = build_model(config, dataset.num_classes)
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
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step, history = int(state["step"]), list(state.get("history", []))
        rng = state.get("rng", [])
        if rng:
            _set_rng_state(rng[ddp.rank] if ddp.rank < len(rng) else rng[0])
        del state
        if step >= config.steps:
            raise ValueError(f"the checkpoint is at step {step}, already >= steps={config.steps}; raise --steps to train further")
    history = history[:step]

    net = model
    if ddp.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )

    meta = _dataset_meta(dataset)
    log = LossLog(out, history) if ddp.is_main else None
    if ddp.is_main:
        (out / CONFIG_JSON).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    items = _SeededItems(dataset, config.seed)
    bar = None
    if ddp.is_main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.mask_loss}", unit="step", dynamic_ncols=True)

    last_ckpt = None
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    net.train()
    try:
        while step < end:
            epoch, offset = divmod(step, steps_per_epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)  # before the loader forks its workers
            sampler = _EpochSampler(len(dataset), config.seed, epoch, ddp.rank, ddp.world_size,
                                    start=offset * config.batch_size)
            # Its own generator: creating a loader must not draw from the global RNG, or a
            # resumed run (new loader mid-epoch) would diverge from the uninterrupted one.
            loader = DataLoader(items, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                                collate_fn=collate_fn, num_workers=config.num_workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(_item_seed(config.seed, epoch, -1)))
            batches = iter(loader)
            while step < end:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (OSError, ValueError, KeyError, RuntimeError) as err:
                    raise DataError(f"loading the batch for step {step + 1} failed: {err}") from err
                terms = _train_step(net, batch, optimizer, scheduler, scaler, config, device, use_amp, step, ddp)
                step += 1
                row = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **terms}
                history.append(row)
                if log is not None:
                    log.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)
                if step % config.checkpoint_every == 0 or step == end:
                    last_ckpt = _checkpoint(out, model, optimizer, scheduler, scaler, step, epoch, config,
                                            history, ddp, meta)
    finally:
        if bar is not None:
            bar.close()
    if ddp.enabled:
        _broadcast_buffers(model)
        _check_replicas_identical(model)
    return TrainResult(step, history, last_ckpt, model)


def _check_replicas_identical(model: nn.Module) -> None:
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


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). DDP broadcasts them
    at the start of each forward, so this changes nothing for training; it makes the final
    replicas identical, not just their parameters."""
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def _train_step(net, batch, optimizer, scheduler, scaler, config, device, use_amp, step, ddp) -> dict:
    """One optimizer step; returns the loss terms (averaged over ranks) for the log."""
    images = batch["images"].to(device, non_blocking=True)
    valid = batch.get("valid")
    valid = valid.to(device, non_blocking=True) if valid is not None else None
    targets = _to_device(batch["targets"], device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
    with autocast:
        losses = net(images, valid=valid, targets=targets)
    if not isinstance(losses, dict) or "loss" not in losses:
        raise TrainingError("the model's training forward must return a dict of loss tensors including 'loss'")
    terms = _mean_over_ranks({k: float(v.detach()) for k, v in losses.items()}, ddp, device)
    if not all(math.isfinite(v) for v in terms.values()):  # checked on rank means: all ranks stop
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        raise TrainingError(f"non-finite loss at step {step + 1} ({shown}); lower --lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    if config.grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return terms


def _checkpoint(out, model, optimizer, scheduler, scaler, step, epoch, config, history, ddp, meta):
    rng = _rng_state()
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


def _dataset_meta(dataset) -> dict:
    """What inference needs besides the weights: the class count and the COCO category id of
    each contiguous class index."""
    meta = {}
    if getattr(dataset, "num_classes", None) is not None:
        meta["num_classes"] = int(dataset.num_classes)
    if getattr(dataset, "category_ids", None) is not None:
        meta["category_ids"] = [int(c) for c in dataset.category_ids]
    return meta


# --------------------------------------------------------------------------------------------
# Using a trained model


def load_trained_model(path, device="cpu"):
    """Rebuild the model a checkpoint of :func:`train` holds, in eval mode.

    Returns ``(model, config, meta)``: the :class:`TrainConfig` it was trained with and
    ``meta`` (``num_classes``, ``category_ids``: contiguous class -> COCO category id).
    Raises :class:`CheckpointError` for a missing or unreadable file.
    """
    state = load_checkpoint(path, map_location="cpu")
    config = TrainConfig.from_dict(state["config"], source=f"checkpoint {state['path']}")
    meta = dict(state.get("meta", {}))
    if "num_classes" not in meta:
        raise CheckpointError(f"checkpoint {state['path']} does not record num_classes; it cannot be rebuilt")
    # the weights come from the checkpoint: no ImageNet download/load, no backbone file needed
    config_for_build = dataclasses.replace(config, pretrained=False, backbone_weights=None)
    model = build_model(config_for_build, meta["num_classes"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {state['path']} does not fit the model it describes: {err}") from None
    model.to(device).eval()
    return model, config, meta


@torch.no_grad()
def predict_coco(model: nn.Module, dataset, category_ids, batch_size: int = 2, progress: bool = True) -> list:
    """Run ``model`` over an evaluation :class:`apro.data.CocoBoxDataset` (``train=False``)
    and return COCO predictions (RLE masks at original size) for
    :func:`apro.evaluation.evaluate_masks`."""
    from .data import collate_batch
    from .evaluation import to_coco_predictions

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    predictions = []
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True)
    try:
        for batch in loader:
            outputs = model(batch["images"].to(device), valid=batch["valid"].to(device))
            predictions.extend(to_coco_predictions(outputs, batch["targets"], category_ids))
    finally:
        model.train(was_training)
    return predictions


def evaluate_model(model: nn.Module, image_dir, ann_file, *, short_side: int, max_size: Optional[int],
                   category_ids, batch_size: int = 2, progress: bool = True) -> dict:
    """Mask AP, AP50, AP75 (percent) of ``model`` on a COCO JSON with masks (paper Sec. 4.1).

    Images are resized to ``short_side`` (long side capped at ``max_size``) as at training
    time; ``category_ids`` maps the model's contiguous classes to the JSON's category ids.
    """
    from .data import CocoBoxDataset
    from .evaluation import evaluate_masks

    dataset = CocoBoxDataset(image_dir, ann_file, train=False, short_sides=(short_side,), max_size=max_size, flip=False)
    missing = sorted(set(dataset.category_ids) - set(category_ids))
    if missing:
        raise ValueError(f"{ann_file} has categories {missing[:10]} the model was not trained on")
    predictions = predict_coco(model, dataset, category_ids, batch_size=batch_size, progress=progress)
    known = set(dataset.category_ids)  # a class absent from the evaluation set cannot be scored
    predictions = [p for p in predictions if p["category_id"] in known]
    return evaluate_masks(predictions, ann_file, image_ids=dataset.image_ids)
