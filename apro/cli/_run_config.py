"""A training run's config from the command line, shared by every ``apro train TASK``.

Options come from, in increasing priority: the task config's defaults, ``--config FILE.json``
and the command line. With ``--resume`` the checkpoint's own config is used instead; only the
``resumable`` options (paths, step budget, checkpointing, workers, device) may differ from it.
"""
from __future__ import annotations

from typing import Callable, Optional

from . import CommandError


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


def make_config(config_class, values: dict, source: str):
    """``config_class.from_dict(values)``, validated; bad values become one CommandError line."""
    try:
        return config_class.from_dict(values, source=source).validate()
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from None


def config_from_args(config_class, given: dict, *, task: str, resume: Optional[str], config_file: Optional[str],
                     resumable, fill: Optional[Callable[[dict], None]] = None):
    """``(config, checkpoint path to resume or None)`` from the options ``given`` on the command line.

    ``fill(values)`` may complete the values of a new run before they are validated (e.g. a
    default data folder)."""
    from ..engine import CheckpointError, load_checkpoint

    if resume is not None:
        try:
            state = load_checkpoint(resume)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
        if state.get("task", "box") != task:
            raise CommandError(f"{resume} is a checkpoint of task {state.get('task', 'box')!r}, not {task}")
        values = dict(state["config"])
        for key, value in given.items():
            if key not in resumable and _normalised(value) != _normalised(values.get(key)):
                raise CommandError(
                    f"--{key.replace('_', '-')} differs from the checkpoint's {key}={values.get(key)!r}; "
                    f"a resumed run keeps its settings (only {', '.join(sorted(resumable))} may change)"
                )
        values.update(given)
        return make_config(config_class, values, f"checkpoint {state['path']}"), state["path"]
    values = {}
    if config_file is not None:
        try:
            values = config_class.from_json(config_file).to_dict()
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise CommandError(str(err)) from None
    values.update(given)
    if fill is not None:
        fill(values)
    return make_config(config_class, values, "options"), None
