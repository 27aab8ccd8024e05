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
            "--quiet", "--mask-loss", "apro"]
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
