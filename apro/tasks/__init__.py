"""The tasks trained with :mod:`apro.engine`, by name, and rebuilding a trained model.

- ``box``: box-supervised instance segmentation (:mod:`apro.tasks.box`, paper Sec. 4.1).
- ``semantic``: point / scribble supervised semantic segmentation (:mod:`apro.tasks.semantic`, paper Sec. 4.2).
"""
from __future__ import annotations

import importlib

from ..engine import CheckpointError, Task, load_checkpoint

TASKS = {"box": "apro.tasks.box:BoxTask", "semantic": "apro.tasks.semantic:SemanticTask"}


def get_task(name: str) -> Task:
    """The task registered as ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks are {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def load_trained_model(path, device="cpu", task=None):
    """Rebuild the model a checkpoint of :func:`apro.engine.train` holds, in eval mode.

    ``path``: a checkpoint file or a run directory (its latest checkpoint). ``task``: the
    expected task name (an error if the checkpoint is of another task); checkpoints record
    their task (those written before tasks existed are ``box``). Returns
    ``(model, config, meta)``: the task's config the model was trained with and ``meta``
    (e.g. ``num_classes``). Raises :class:`apro.engine.CheckpointError` for a missing,
    unreadable or mismatched file.
    """
    state = load_checkpoint(path, map_location="cpu")
    name = state.get("task", "box")
    if task is not None and name != task:
        raise CheckpointError(f"checkpoint {state['path']} is of task {name!r}, not {task!r}")
    try:
        impl = get_task(name)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {state['path']}: {err}") from None
    config = impl.config_class.from_dict(state["config"], source=f"checkpoint {state['path']}")
    meta = dict(state.get("meta", {}))
    if "num_classes" not in meta:
        raise CheckpointError(f"checkpoint {state['path']} does not record num_classes; it cannot be rebuilt")
    model = impl.build_model(impl.inference_config(config), meta)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {state['path']} does not fit the model it describes: {err}") from None
    model.to(device).eval()
    return model, config, meta


__all__ = ["TASKS", "get_task", "load_trained_model"]
