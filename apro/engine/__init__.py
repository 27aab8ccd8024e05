"""The task-independent training engine: one loop for every task.

- :mod:`.config`: :class:`EngineConfig`, the optimizer/schedule/checkpoint/device fields every
  task's config extends;
- :mod:`.task`: :class:`Task`, what a task supplies (dataset, model, training forward);
- :mod:`.trainer`: :func:`train`, the loop (DDP via ``torchrun``, AMP, exact resume, hooks);
- :mod:`.checkpoint`, :mod:`.log`, :mod:`.sampling`, :mod:`.distributed`, :mod:`.optim`: its parts.
"""
from .checkpoint import CHECKPOINT_PREFIX, CHECKPOINT_SUFFIX, checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from .config import OPTIMIZERS, SCHEDULES, EngineConfig, check_choice
from .errors import CheckpointError, DataError, TrainingError
from .log import LossLog, read_log
from .optim import WarmupSchedule, build_optimizer, build_scheduler
from .task import Task
from .trainer import CONFIG_JSON, EVALUATIONS_JSONL, TrainResult, train

__all__ = [
    "CHECKPOINT_PREFIX", "CHECKPOINT_SUFFIX", "CONFIG_JSON", "EVALUATIONS_JSONL", "OPTIMIZERS", "SCHEDULES",
    "CheckpointError", "DataError", "EngineConfig", "LossLog", "Task", "TrainResult", "TrainingError",
    "WarmupSchedule", "build_optimizer", "build_scheduler", "check_choice", "checkpoint_path",
    "list_checkpoints", "load_checkpoint", "read_log", "save_checkpoint", "train",
]
