"""The task-independent part of a training run's configuration.

Each task subclasses :class:`EngineConfig` with its own fields (data, model, loss); the whole
dataclass is saved into every checkpoint and ``config.json`` of the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "constant")


def check_choice(value, choices: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class EngineConfig:
    """Optimizer, schedule, checkpointing and device settings shared by every task.

    Defaults follow the SOLOv2 schedule of the released APro configs (SGD, lr 0.01 for 16
    images, momentum 0.9, weight decay 1e-4, 500 warm-up steps from 1% of the lr, decay by
    10x at 75% and 90% of training, gradient norm clipped at 35), shortened for CPU use.
    ``batch_size`` is per process: under ``torchrun`` the global batch is
    ``batch_size * world_size``. ``milestones`` are fractions of ``steps``; a resumed run keeps
    the schedule of its checkpoint (decay points on the first run's ``steps``) unless
    :func:`apro.engine.train` is given ``extend_schedule=True``. ``lr_multipliers`` maps a
    parameter-name prefix to a factor on ``lr`` (e.g. ``{"backbone.": 0.1}`` trains a pretrained
    backbone ten times slower than a fresh head); the longest matching prefix wins.
    """

    out: str = "runs/train"

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
    lr_multipliers: dict = dataclasses.field(default_factory=dict)

    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 0
    amp: bool = True
    device: str = "auto"
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)

    def validate(self):
        """Check the values; raises ValueError naming the offending field. Returns ``self``."""
        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        check_choice(self.schedule, SCHEDULES, "schedule")
        for name in ("steps", "batch_size", "checkpoint_every"):
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
        if not isinstance(self.lr_multipliers, dict):
            raise ValueError(f"lr_multipliers must be a mapping of parameter-name prefix to factor, "
                             f"got {self.lr_multipliers!r}")
        for prefix, factor in self.lr_multipliers.items():
            if not isinstance(prefix, str) or not prefix:
                raise ValueError(f"lr_multipliers keys are parameter-name prefixes (non-empty strings), got {prefix!r}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"lr_multipliers[{prefix!r}] must be a finite number > 0, got {factor!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip!r}")
        return self

    def to_dict(self) -> dict:
        """JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        """Build from a dict; unknown keys are an error naming them and ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown option(s) {', '.join(unknown)}; known options are {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_json(cls, path):
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
