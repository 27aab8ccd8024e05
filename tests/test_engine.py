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


def test_lr_multipliers_scale_the_groups_they_name_and_refuse_typos():
    from apro.engine import build_optimizer, build_scheduler

    net = nn.Sequential()
    net.add_module("backbone", nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    net.add_module("head", nn.Linear(4, 1))
    plain = build_optimizer(net, EngineConfig(lr=0.1, weight_decay=0.5))
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(2, 0.1, 0.5), (4, 0.1, 0.0)]
    cfg = EngineConfig(lr=0.1, weight_decay=0.5, lr_multipliers={"backbone.": 0.1, "backbone.1.": 0.5},
                       warmup_steps=0, schedule="cosine", steps=10).validate()
    opt = build_optimizer(net, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(net.named_parameters())
    assert lr_of[id(names["head.weight"])] == pytest.approx(0.1)
    assert lr_of[id(names["backbone.0.weight"])] == pytest.approx(0.01)
    assert lr_of[id(names["backbone.1.weight"])] == pytest.approx(0.05)  # the longest prefix wins
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # the base rate first (what the log shows)
    sched = build_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    ratios = {round(g["lr"] / base, 6) for g, base in zip(opt.param_groups, sched.base_lrs)}
    assert len(ratios) == 1 and 0 < ratios.pop() < 1  # one schedule scales every group alike
    with pytest.raises(ValueError, match="'bacbone.' match no trainable parameter"):
        build_optimizer(net, EngineConfig(lr_multipliers={"bacbone.": 0.1}))
    for bad in ({"backbone.": 0}, {"backbone.": float("nan")}, {"": 0.1}, ["backbone."]):
        with pytest.raises(ValueError, match="lr_multipliers"):
            EngineConfig(lr_multipliers=bad).validate()
