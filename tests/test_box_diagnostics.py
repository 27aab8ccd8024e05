"""The target diagnostics of benchmarks/box_instance.py (``--targets``, ``--target-quality``) on a
tiny synthetic run: the captured positives line up with their ground-truth masks, and the rows
are what their definitions say."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from apro.cli import main
from apro.data import make_synthetic_coco

REPO = Path(__file__).resolve().parent.parent
TINY = dict(fpn_channels=16, head_channels=16, mask_channels=8, mask_branch_channels=16,
            grid_sizes=[8, 4], scale_ranges=[[1, 32], [24, 4096]])


def _bench():
    spec = importlib.util.spec_from_file_location("_box_instance_bench", REPO / "benchmarks" / "box_instance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step APro run trained on the synthetic JSON that has masks (box supervision ignores them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diag")
    data = make_synthetic_coco(root / "coco", 6, size=(96, 96), num_classes=2, seed=5)
    out = root / "run"
    args = ["train", "box", "--data", data.image_dir, "--ann", data.eval_ann, "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--short-sides", "96", "--max-size", "96", "--no-pretrained", "--warmup-steps", "1",
            "--quiet", "--mask-loss", "apro", "--eval-ann", data.eval_ann]
    for key, value in TINY.items():
        args += ["--model-option", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    yield out
    torch.set_num_threads(threads)


def test_ground_truth_masks_line_up_with_the_captured_boxes(run):
    from pycocotools.coco import COCO

    bench = _bench()
    batches = list(bench._captured_losses(run, 2))
    assert batches
    coco = COCO(batches[0]["dataset"].ann_file)
    for seen in batches:
        gt = bench._gt_masks(seen, coco)
        b = seen["box_mask"]
        assert gt.shape == b.shape and seen["logits"].shape == b.shape
        per = gt.sum(dim=(1, 2, 3))
        assert (per > 0).all()
        # each positive's mask lies in its own box (up to the rounding of box edges to the grid)
        inside = (gt * b).sum(dim=(1, 2, 3)) / per
        assert (inside >= 0.9).all(), inside
        # no synthetic shape fills its box (an ellipse covers about 79 % of it, the others about 50 %)
        assert float(per.sum() / b.sum()) < 0.85


def test_target_quality_rows_follow_their_definitions(run):
    bench = _bench()
    rows = bench.target_quality([run], 2)
    table = {(r["target"], r["width"]): r for r in rows}
    names = {r["target"] for r in rows}
    assert {"filled box", "p", "GP", "GP-LP-C", "LP-GP-C", "tree filter"} <= names
    assert {label for label, _, _ in bench._LP_SETTINGS} <= names
    for r in rows:
        if r["positives"]:
            assert 0.0 <= r["iou"] <= 100.0 and 0.0 <= r["l1"] <= 1.0
    # the filled box: IoU = (mask in box) / box area and mean |B - mask| over the box = 1 - that
    box = table[("filled box", "all")]
    assert box["positives"] > 0
    assert box["iou"] / 100 == pytest.approx(1.0 - box["l1"], abs=1e-5)
    # the width bins partition the positives
    parts = sum(table[("p", label)]["positives"] for label, _, _ in bench._WIDTH_BINS[:-1])
    assert parts == table[("p", "all")]["positives"]


def test_evaluate_thresholds_matches_evaluate_model_per_threshold(run):
    """One forward pass per image for a whole scan scores what one evaluation per threshold
    scores; the model keeps its own threshold; an empty or out-of-range list is refused."""
    from apro.data import CocoBoxDataset
    from apro.tasks.box import evaluate_model, evaluate_thresholds, load_trained_model, set_test_thresholds

    model, config, _ = load_trained_model(run)
    category_ids = CocoBoxDataset(config.data, config.ann, train=True, check_files=False).category_ids
    common = dict(short_side=96, max_size=96, category_ids=category_ids, progress=False)
    own = model.mask_threshold
    scan = evaluate_thresholds(model, config.data, config.ann, [0.3, 0.6], **common)
    assert model.mask_threshold == own
    for t, got in zip([0.3, 0.6], scan):
        set_test_thresholds(model, mask_threshold=t)
        assert got == evaluate_model(model, config.data, config.ann, **common)
    for bad in ([], [0.5, 1.5]):
        with pytest.raises(ValueError, match="mask_thresholds"):
            evaluate_thresholds(model, config.data, config.ann, bad, **common)


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path):
    """The runner removes the logs of a run with no checkpoint (the trainer refuses a folder
    holding logs, so the run could never be restarted) and leaves its other files alone."""
    bench = _bench()
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("log.csv", "log.jsonl", "train_seconds.json"):
        (stale / name).write_text("x\n")
    (stale / "started.json").write_text("{}\n")
    bench._clear_unstarted(stale)
    assert sorted(p.name for p in stale.iterdir()) == ["started.json"]
    bench._clear_unstarted(tmp_path / "empty")  # nothing there: nothing to do


def test_threshold_scan_scores_both_splits_once_and_picks_on_train(run, monkeypatch, capsys):
    """``--thresholds``: AP per mask threshold on the training JSON and on val, the same numbers
    `apro eval box --mask-threshold` prints, kept on disk and not recomputed, and the table's
    choice is the threshold best on the training images."""
    import argparse

    bench = _bench()
    args = argparse.Namespace(quiet=True)
    rows = bench.threshold_scan(run, {}, [0.3, 0.7], args)
    assert set(rows["train"]) == set(rows["val"]) == {"0.3", "0.7"}
    for split in ("train", "val"):
        for scores in rows[split].values():
            assert all(0.0 <= scores[k] <= 100.0 or scores[k] == -100.0 for k in ("AP", "AP50", "AP75"))
    out = run / "eval_at_0.3.json"
    from apro.engine import load_checkpoint

    ckpt_config = load_checkpoint(run)["config"]
    assert main(["eval", "box", str(run), "--data", ckpt_config["data"], "--ann", ckpt_config["ann"], "--quiet",
                 "--mask-threshold", "0.3", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"]["AP"] == pytest.approx(rows["train"]["0.3"]["AP"])

    import apro.tasks.box as box

    def refuse(*a, **k):
        raise AssertionError("a threshold already on disk was scored again")

    monkeypatch.setattr(box, "evaluate_model", refuse)
    monkeypatch.setattr(box, "evaluate_thresholds", refuse)
    assert bench.threshold_scan(run, {}, [0.7, 0.3], args) == rows
    rows["train"]["0.3"]["AP"], rows["train"]["0.7"]["AP"] = 10.0, 20.0
    rows["val"]["0.3"]["AP"], rows["val"]["0.7"]["AP"] = 30.0, 5.0
    line = bench.threshold_table({"r": rows}).splitlines()[-1]
    assert "| 0.7 | 5.0 /" in line  # chosen on train (20 > 10), not on val (30 > 5)
    other = json.loads(json.dumps(rows))
    other["train"]["0.3"]["AP"] = 50.0  # this seed's train choice is 0.3
    means = bench.threshold_means({"solov2-apro-s0": rows, "solov2-apro-s1": other}).splitlines()[-1]
    assert means.startswith("| solov2-apro | 0,1 |")
    assert f"| 30.00 | 5.00 | {(5.0 + 30.0) / 2:.2f} / " in means  # per threshold, then at each run's choice


def test_target_quality_grid_repeats_the_released_rows_and_parses_its_settings(run):
    import argparse

    bench = _bench()
    default = {(r["target"], r["width"]): r for r in bench.target_quality([run], 2)}
    rows = bench.target_quality([run], 2, gp_scales=[(0.01, 0.07), (0.03, None)], lp_settings=[(5, 0.15, 20)])
    grid = {(r["target"], r["width"]): r for r in rows}
    assert {r["target"] for r in rows} == {"filled box", "p", "GP 0.01 / 0.07", "GP 0.03, one stage",
                                            "LP 5x5 zeta_s 0.15 T20"}
    for label, _, _ in bench._WIDTH_BINS:
        for new, old in (("GP 0.01 / 0.07", "GP"), ("LP 5x5 zeta_s 0.15 T20", "LP 5x5 T20 (released)"), ("p", "p")):
            a, b = grid[(new, label)], default[(old, label)]
            assert a["positives"] == b["positives"]
            if a["positives"]:
                assert a["iou"] == pytest.approx(b["iou"]) and a["l1"] == pytest.approx(b["l1"])
    assert bench._gp_scale("0.03,none") == (0.03, None) and bench._gp_scale("0.01,0.07") == (0.01, 0.07)
    assert bench._lp_setting("3,0.15,20") == (3, 0.15, 20)
    for bad in ("0.1", "0,0.07", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._gp_scale(bad)
    for bad in ("4,0.15,20", "3,0,20", "3,0.15"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._lp_setting(bad)
