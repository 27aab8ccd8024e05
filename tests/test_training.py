"""The training engine (apro/engine/) driven by the box task (apro/tasks/box.py), on a tiny stand-in model and dataset:
atomic checkpoints, exact resume, the loss log, the LR schedule, config checks and DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from apro import engine as training
from apro.engine import (
    CheckpointError,
    LossLog,
    TrainingError,
    WarmupSchedule,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    read_log,
    save_checkpoint,
)
from apro.tasks.box import BoxConfig as TrainConfig, train
from two_ranks import identical_rank_states, run_two_ranks


class TinyBoxes(torch.utils.data.Dataset):
    """Items shaped like apro.data.CocoBoxDataset's, with a random flip and random noise
    drawn from the global RNGs (what the loop must make reproducible)."""

    num_classes = 2
    category_ids = [3, 7]

    def __init__(self, n=10, size=16):
        g = torch.Generator().manual_seed(123)
        self.images = torch.rand(n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = (image + 0.05 * torch.randn_like(image)).clamp(0, 1)
        return {"image": image, "boxes": torch.tensor([[2.0, 2.0, 9.0, 9.0]]),
                "labels": torch.tensor([i % 2]), "image_id": i}


def collate(items):
    images = torch.stack([it["image"] for it in items])
    return {"images": images, "valid": torch.ones_like(images[:, :1]),
            "targets": [{k: it[k] for k in ("boxes", "labels")} for it in items]}


class TinyModel(nn.Module):
    """Stands in for SOLOv2: same forward signature, a dict of named losses incl. 'loss'.
    Dropout makes the step depend on the global torch RNG."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, images, valid=None, targets=None):
        x = self.head(self.drop(torch.relu(self.norm(self.conv(images)))))
        a = (x[:, 0] - images.mean(1)).pow(2).mean()
        b = (x[:, 1] - torch.stack([t["labels"].float().mean() for t in targets])[:, None, None]).abs().mean()
        return {"loss": a + 0.5 * b, "loss_fit": a, "loss_label": b}


def tiny_config(out, **kw):
    base = dict(out=str(out), steps=8, batch_size=2, lr=0.05, warmup_steps=2, checkpoint_every=3,
                seed=5, schedule="step", milestones=(0.5,), grad_clip=1.0)
    base.update(kw)
    return TrainConfig(**base)


def run(config, **kw):
    torch.manual_seed(0)  # the same initial weights for every run
    return train(config, model=TinyModel(), dataset=TinyBoxes(), collate_fn=collate, progress=False, **kw)


def loss_curve(history):
    return [(r["step"], r["epoch"], r["lr"], r["loss"], r["loss_fit"], r["loss_label"]) for r in history]


# --------------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_logs_every_term(tmp_path):
    result = run(tiny_config(tmp_path, steps=24, checkpoint_every=100))
    assert result.step == 24
    rows = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert set(rows[0]) == {"step", "epoch", "lr", "loss", "loss_fit", "loss_label", "grad_norm"}
    assert sum(r["loss_fit"] for r in rows[-4:]) < 0.5 * sum(r["loss_fit"] for r in rows[:4])
    # 10 images, batch 2: 5 steps per epoch
    assert [r["epoch"] for r in rows[:11]] == [0] * 5 + [1] * 5 + [2]
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "epoch", "lr", "loss", "loss_fit", "loss_label", "grad_norm"]
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 25
    # the last step always gets a checkpoint, even off the checkpoint_every grid
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_00000024.pt"]
    assert result.checkpoint == checkpoint_path(tmp_path, 24)


def test_grad_norm_is_logged_before_clipping_and_only_when_clipping(tmp_path):
    def first_step(name, clip):  # SGD, no momentum / decay / warm-up: the step is lr x the (clipped) gradient
        result = run(tiny_config(tmp_path / name, steps=1, grad_clip=clip, lr=0.1, warmup_steps=0, schedule="constant",
                                 momentum=0.0, weight_decay=0.0))
        torch.manual_seed(0)
        start = dict(TinyModel().named_parameters())
        after = dict(result.model.named_parameters())
        moved = torch.sqrt(sum((after[k].detach() - start[k].detach()).pow(2).sum() for k in start))
        return result.history[0]["grad_norm"], float(moved)

    norm_free, moved_free = first_step("loose", 1e6)
    clip = norm_free / 2  # binds, and keeps the step far above float32 rounding of the weights
    norm_clipped, moved_clipped = first_step("tight", clip)
    assert moved_free == pytest.approx(0.1 * norm_free, rel=1e-4)  # the logged value is the gradient's norm
    assert norm_clipped == pytest.approx(norm_free, rel=1e-6) and norm_clipped > clip  # taken before clipping
    assert moved_clipped == pytest.approx(0.1 * clip, rel=1e-4)
    rows = run(tiny_config(tmp_path / "unclipped", steps=2, grad_clip=None)).history
    assert all("grad_norm" not in r for r in rows)


def test_resume_continues_step_count_and_loss_curve_exactly(tmp_path):
    full = run(tiny_config(tmp_path / "full"))
    # an "interrupted" run: stops after step 5 (checkpoints at 3 and 5), log has rows 1..5
    run(tiny_config(tmp_path / "cut"), stop_after=5)
    assert [r["step"] for r in read_log(tmp_path / "cut" / "log.jsonl")] == [1, 2, 3, 4, 5]
    # resume from step 3 (mid-epoch: 5 steps per epoch) into the same directory
    ckpt = checkpoint_path(tmp_path / "cut", 3)
    resumed = run(tiny_config(tmp_path / "cut"), resume=ckpt)
    assert resumed.step == 8
    assert loss_curve(resumed.history) == loss_curve(full.history)
    assert loss_curve(read_log(tmp_path / "cut" / "log.jsonl")) == loss_curve(full.history)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # resuming from a directory picks its latest checkpoint; into a fresh directory works too
    again = run(tiny_config(tmp_path / "elsewhere", steps=10), resume=tmp_path / "cut")
    assert [r["step"] for r in again.history] == list(range(1, 11))
    assert loss_curve(again.history)[:8] == loss_curve(full.history)


def test_resume_is_exact_with_loader_workers(tmp_path):
    full = run(tiny_config(tmp_path / "full", steps=6, num_workers=2))
    run(tiny_config(tmp_path / "cut", steps=6, num_workers=2), stop_after=3)
    resumed = run(tiny_config(tmp_path / "cut", steps=6, num_workers=2), resume=checkpoint_path(tmp_path / "cut", 3))
    assert loss_curve(resumed.history) == loss_curve(full.history)
    # and the data order / augmentation do not depend on the worker count
    serial = run(tiny_config(tmp_path / "serial", steps=6, num_workers=0))
    assert loss_curve(serial.history) == loss_curve(full.history)


def test_resume_past_the_end_and_into_an_existing_run_are_errors(tmp_path):
    run(tiny_config(tmp_path / "a", steps=3))
    with pytest.raises(ValueError, match="already >= steps=3"):
        run(tiny_config(tmp_path / "a", steps=3), resume=tmp_path / "a")
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(tiny_config(tmp_path / "a", steps=3))


def test_checkpoint_holds_everything_needed(tmp_path):
    run(tiny_config(tmp_path, steps=3))
    state = load_checkpoint(checkpoint_path(tmp_path, 3))
    assert {"model", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "config", "history", "meta"} <= set(state)
    assert state["step"] == 3 and state["epoch"] == 0
    assert state["meta"] == {"num_classes": 2, "category_ids": [3, 7]}
    assert TrainConfig.from_dict(state["config"]) == tiny_config(tmp_path, steps=3)
    assert state["scheduler"]["last_epoch"] == 3
    assert len(state["history"]) == 3
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1, "config": {}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(17)  # a partial write...
        raise OSError("disk full")  # ...then the crash

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2, "config": {}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


def test_crash_while_checkpointing_during_training_keeps_the_last_good_one(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_crash_on_second(obj, f, *args, **kwargs):
        calls.append(1)
        real_save(obj, f, *args, **kwargs)
        if len(calls) == 2:
            f.truncate(100)
            raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", save_then_crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, steps=8, checkpoint_every=3))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_00000003.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = run(tiny_config(tmp_path, steps=8), resume=tmp_path)
    assert resumed.step == 8
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 9))


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pt is not readable"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="contains no checkpoint_"):
        load_checkpoint(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not written by apro train"):
        load_checkpoint(other)


def test_non_finite_loss_stops_with_the_step_and_terms(tmp_path):
    class Exploding(TinyModel):
        def forward(self, images, valid=None, targets=None):
            out = super().forward(images, valid, targets)
            out["loss_fit"] = out["loss_fit"] * float("nan")
            return out

    with pytest.raises(TrainingError, match=r"non-finite loss at step 1 .*loss_fit=nan"):
        train(tiny_config(tmp_path), model=Exploding(), dataset=TinyBoxes(), collate_fn=collate, progress=False)


def test_too_small_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(tiny_config(tmp_path, batch_size=4), model=TinyModel(), dataset=TinyBoxes(n=3),
              collate_fn=collate, progress=False)


def test_warmup_then_step_and_cosine_schedules():
    s = WarmupSchedule(TrainConfig(steps=100, warmup_steps=10, warmup_factor=0.1, milestones=(0.5, 0.8)))
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.55)
    assert [s(10), s(49), s(50), s(79), s(80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    c = WarmupSchedule(TrainConfig(steps=110, warmup_steps=10, schedule="cosine"))
    assert [c(10), c(60), c(110)] == pytest.approx([1.0, 0.5, 0.0])
    assert WarmupSchedule(TrainConfig(steps=10, warmup_steps=0, schedule="constant"))(9) == 1.0


def test_sgd_and_adamw_skip_decay_on_biases_and_norms():
    model = TinyModel()
    for name, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        opt = training.build_optimizer(model, TrainConfig(optimizer=name, weight_decay=0.05))
        assert isinstance(opt, cls)
        decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert decays[id(model.conv.weight)] == 0.05
        assert decays[id(model.conv.bias)] == 0.0 and decays[id(model.norm.weight)] == 0.0


def test_config_json_and_validation(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 7, "lr": 0.5, "short_sides": [64, 96]}))
    c = TrainConfig.from_json(f)
    assert (c.steps, c.lr, c.short_sides) == (7, 0.5, (64, 96))
    assert TrainConfig.from_dict(c.to_dict()) == c
    f.write_text(json.dumps({"stpes": 7}))
    with pytest.raises(ValueError, match=r"c\.json: unknown option\(s\) stpes"):
        TrainConfig.from_json(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="c.json is not valid JSON"):
        TrainConfig.from_json(f)
    for bad, match in (({"mask_loss": "dice"}, "mask_loss must be one of"), ({"steps": 0}, "steps must be"),
                       ({"lr": -1.0}, "lr must be"), ({"milestones": (1.5,)}, "milestones"),
                       ({"optimizer": "adam"}, "optimizer must be one of")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()


def test_loss_log_adds_a_column_when_a_new_term_appears(tmp_path):
    log = LossLog(tmp_path)
    log.append({"step": 1, "loss": 1.0})
    log.append({"step": 2, "loss": 0.5, "loss_extra": 0.25})
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines == ["step,loss,loss_extra", "1,1.0,", "2,0.5,0.25"]
    assert read_log(tmp_path / "log.jsonl")[1] == {"step": 2, "loss": 0.5, "loss_extra": 0.25}


# --------------------------------------------------------------------------------------------
# DistributedDataParallel: two CPU processes launched the way torchrun launches them

DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_training import TinyModel, TinyBoxes, collate, tiny_config
from apro.tasks.box import train
import torch.distributed as dist
cfg = tiny_config({out!r}, steps=4, checkpoint_every=2)
result = train(cfg, model=TinyModel(), dataset=TinyBoxes(), collate_fn=collate, progress=False)
import os
torch.save({{"state": result.model.state_dict(), "history": result.history}},
           {out!r} + "/rank" + os.environ["RANK"] + ".pt")
"""


def test_two_process_ddp_on_cpu_keeps_replicas_identical(tmp_path):
    proc, out = run_two_ranks(tmp_path, DDP_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = identical_rank_states(out)
    halfway = load_checkpoint(checkpoint_path(out, 2))["model"]
    assert not torch.equal(halfway["conv.weight"], r0["state"]["conv.weight"])  # steps 3-4 did train
    # the logged losses are the mean over ranks, identical on both; only rank 0 writes files
    assert r0["history"] == r1["history"]
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_00000002.pt", "checkpoint_00000004.pt"]
    ckpt = load_checkpoint(out)
    assert len(ckpt["rng"]) == 2  # each rank's RNG state, for an exact resume
    for name, value in ckpt["model"].items():
        assert torch.equal(value, r0["state"][name])


# --------------------------------------------------------------------------------------------
# Acceptance (issues 4 and 8): box-supervised training with the APro loss on a synthetic COCO set
# learns masks tighter than the filled boxes.
#
# Which mask loss is best is NOT asserted here: a 160-step CPU training follows a different
# trajectory on each CPU model, thread count and small code change (e.g. how the dynamic mask
# kernels are multiplied), so no single run can carry "APro beats projection by X"; that claim
# is measured on real data by benchmarks/box_instance.py (docs/instance.md). The assertions hold
# with a margin in every run measured, 2026-12-01, on a 2-core AMD EPYC VM (AVX-512): this
# test's settings with "seed" 0/1/2 and OMP_NUM_THREADS 1/2, both variants, with the code of
# about commit b5563a0 ("new") and of commit bb33627's working tree ("old"), and in the records
# of an earlier 2-core x86-64 VM (docs/development.md):
#
#   filled GT boxes on the held-out set: AP 30.2, AP50 59.2
#   code thr seed | projection AP / AP50 | apro AP / AP50
#   new  1   0    | 22.8 / 59.2          | 35.5 / 76.1
#   new  1   1    | 20.5 / 58.6          | 46.1 / 79.1
#   new  1   2    | 33.0 / 73.8          | 40.7 / 77.0
#   new  2   0    | 24.0 / 64.2          | 45.1 / 82.9
#   new  2   1    | 30.2 / 71.5          | 35.9 / 75.7
#   new  2   2    | 40.8 / 77.0          | 44.6 / 78.8
#   old  1   0/1/2| 30.7, 30.9, 35.6     | 35.2 / 71.5, 43.5 / 79.5, 45.2 / 76.2
#   old  2   0/1/2| 29.5, 28.6, 31.2     | 36.2 / 74.1, 35.8 / 74.1, 40.6 / 81.9
#   earlier VM, 1 thread, seed 0: projection 22.7, apro 43.6 / 78.2; 2 threads, seed 0 (three
#   runs): projection 24.1 / 27.7 / 32.3, apro 31.1 / 39.4 / 35.1.
#
# Asserted: APro's AP50 exceeds the filled boxes' by more than 8 (smallest margin seen 12.3) and
# its AP exceeds theirs (smallest margin 0.9, two threads on the earlier VM; >= 5.0 on one
# thread, which the test uses). Projection alone is not trained here: its AP fell below the
# filled boxes' in 8 of the 16 runs, so nothing robust can be asserted about it.

SMALL_SOLOV2 = {"fpn_channels": 32, "head_channels": 64, "mask_channels": 16, "mask_branch_channels": 32,
                "mask_stride": 4, "grid_sizes": [12, 8], "scale_ranges": [[1, 32], [24, 2048]]}


def test_box_supervised_apro_training_learns_masks_beyond_the_filled_boxes(tmp_path):
    """Trains through `apro train box --mask-loss apro` in a separate process with
    OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads otherwise slow training on a shared CPU)
    and one thread (repeatable on one CPU model); margins: see the table above."""
    from apro.data import make_synthetic_coco
    from apro.evaluation import evaluate_masks, filled_box_predictions

    train_set = make_synthetic_coco(tmp_path / "train", 24, size=(64, 64), num_classes=2, seed=1)
    held_out = make_synthetic_coco(tmp_path / "eval", 16, size=(64, 64), num_classes=2, seed=2)
    box = evaluate_masks(filled_box_predictions(held_out.eval_ann), held_out.eval_ann)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "pretrained": True, "model_options": SMALL_SOLOV2, "steps": 160, "batch_size": 4, "optimizer": "adamw",
        "lr": 0.002, "weight_decay": 0.05, "warmup_steps": 20, "short_sides": [64], "max_size": 64,
        "test_short_side": 64, "seed": 0, "checkpoint_every": 1000}))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "apro"
    proc = subprocess.run(
        [sys.executable, "-m", "apro", "train", "box", "--data", train_set.image_dir, "--ann", train_set.train_ann,
         "--eval-data", held_out.image_dir, "--eval-ann", held_out.eval_ann, "--config", str(config),
         "--mask-loss", "apro", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((out / "eval.json").read_text())
    assert scores["filled_boxes"]["AP"] == pytest.approx(box["AP"])  # printed beside the result
    assert "filled boxes:  mask AP" in proc.stdout
    print({"filled_box": box, "apro": scores})
    assert scores["AP50"] > box["AP50"] + 8, (scores, box)
    assert scores["AP"] > box["AP"], (scores, box)


def _disc_scene(h=32, w=32):
    """Bluish disc on a reddish background with mild noise; its tight box covers background corners."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    obj = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) <= 9.5**2)[None, None]
    image = torch.where(obj, torch.tensor([0.1, 0.3, 0.8]).view(1, 3, 1, 1), torch.tensor([0.85, 0.25, 0.15]).view(1, 3, 1, 1))
    image = (image + 0.02 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ys, xs = torch.nonzero(obj[0, 0], as_tuple=True)
    box = torch.zeros(1, 1, h, w)
    box[..., ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = 1
    return image, box, obj


@pytest.mark.parametrize("init", [0.0, 1.0])
def test_apro_mask_loss_gradient_separates_object_from_box_background(init):
    """Why APro can beat projection, on a fixed prediction (the filled box): projection's
    gradient is the same at every in-box pixel, so it cannot tell object from background;
    APro's descent raises the object's logits more than those of the box's background corners."""
    from apro.losses import box_mask_loss

    image, box, obj = _disc_scene()
    corners = (box > 0) & ~obj
    gaps = {}
    for name in ("projection", "apro"):
        logits = torch.where(box > 0, init, -4.0).requires_grad_(True)
        box_mask_loss(name, logits, box, image).backward()
        grad = logits.grad
        gaps[name] = float(grad[corners].mean() - grad[obj].mean())  # > 0: descent favours the object
    assert abs(gaps["projection"]) < 1e-7
    assert gaps["apro"] > 1e-4, gaps


DDP_DIVERGING_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_training import TinyModel, TinyBoxes, collate, tiny_config
from apro.engine import TrainingError
from apro.tasks.box import train
rank = int(os.environ["RANK"])

class OneRankOdd(TinyModel):
    calls = 0
    def forward(self, images, valid=None, targets=None):
        out = super().forward(images, valid, targets)
        OneRankOdd.calls += 1
        if rank == 1:
            out["loss_rank1_only"] = out["loss_fit"].detach() * 0 + 4.0
            if OneRankOdd.calls == 3:
                out["loss"] = out["loss"] * float("nan")
        return out

try:
    train(tiny_config({out!r}, steps=5, checkpoint_every=100), model=OneRankOdd(), dataset=TinyBoxes(),
          collate_fn=collate, progress=False)
except TrainingError as err:
    with open(os.path.join({out!r}, f"stopped_{{rank}}.txt"), "w") as f:
        f.write(f"rank {{rank}} stopped: {{err}}")
    sys.exit(3)
"""


def test_ddp_ranks_stop_together_on_a_non_finite_loss_on_one_rank(tmp_path):
    """A NaN on rank 1 only must stop both ranks at the same step (no hang in the gradient
    all-reduce), and a loss term logged by one rank only is averaged over the ranks having it."""
    proc, out = run_two_ranks(tmp_path, DDP_DIVERGING_SCRIPT)
    assert proc.returncode != 0
    for rank in (0, 1):  # one file per rank: the ranks' stdout lines can interleave
        said = (out / f"stopped_{rank}.txt").read_text()
        assert f"rank {rank} stopped: non-finite loss at step 3" in said
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss_rank1_only"] == 4.0 for r in rows)
