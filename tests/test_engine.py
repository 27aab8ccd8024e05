"""The engine's task interface (apro/engine/task.py, trainer hooks, failure clean-up, task
registry), with a task that has nothing to do with boxes."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from apro import engine
from apro.engine import EngineConfig, Task, TrainingError, load_checkpoint
from apro.tasks import get_task, load_trained_model


class _Points(torch.utils.data.Dataset):
    num_classes = 1

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.x[i].sum(0, keepdim=True)}


@dataclass
class _RegressionConfig(EngineConfig):
    width: int = 3
    bad_loss: bool = False


class _RegressionTask(Task):
    name = "regression-test"
    config_class = _RegressionConfig

    def build_dataset(self, config):
        return _Points()

    def build_model(self, config, meta):
        return nn.Linear(config.width, meta["num_classes"])

    def losses(self, net, batch, device):
        err = net(batch["x"].to(device)) - batch["y"].to(device)
        loss = err.pow(2).mean()
        if self.__dict__.get("fail"):
            loss = loss * float("nan")
        return {"loss": loss}


def _config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), steps=6, batch_size=2, lr=0.05, warmup_steps=0, checkpoint_every=3,
                optimizer="sgd", schedule="constant")
    base.update(kw)
    return _RegressionConfig(**base)


def test_a_non_box_task_trains_checkpoints_and_runs_hooks(tmp_path):
    calls = []

    def hook(step, model):
        calls.append((step, model.training))
        model.eval()  # the engine restores training mode after the hook
        return {"score": float(step)}

    result = engine.train(_config(tmp_path), _RegressionTask(), progress=False, hooks=[hook])
    assert result.step == 6 and [c[0] for c in calls] == [3, 6] and all(training for _, training in calls)
    assert result.model.training
    assert result.evaluations == [{"step": 3, "score": 3.0}, {"step": 6, "score": 6.0}]
    rows = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert rows == result.evaluations
    state = load_checkpoint(tmp_path / "run")
    assert state["task"] == "regression-test" and state["step"] == 6
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_a_run_failing_at_its_first_step_leaves_no_files(tmp_path):
    task = _RegressionTask()
    task.fail = True
    with pytest.raises(TrainingError, match="non-finite loss at step 1"):
        engine.train(_config(tmp_path), task, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_failure_in_a_folder_the_user_made_keeps_the_folder_and_its_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    task = _RegressionTask()
    task.fail = True
    with pytest.raises(TrainingError):
        engine.train(_config(tmp_path), task, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resuming_a_checkpoint_of_another_task_is_refused(tmp_path):
    engine.train(_config(tmp_path, steps=3), _RegressionTask(), progress=False)

    class Other(_RegressionTask):
        name = "other"

    with pytest.raises(ValueError, match="of task 'regression-test', not 'other'"):
        engine.train(_config(tmp_path, steps=6), Other(), resume=tmp_path / "run", progress=False)


def test_the_task_registry_names_its_tasks_and_refuses_unknown_ones(tmp_path):
    assert get_task("box").name == "box"
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    engine.train(_config(tmp_path, steps=3), _RegressionTask(), progress=False)
    with pytest.raises(engine.CheckpointError, match="unknown task 'regression-test'"):
        load_trained_model(tmp_path / "run")
