"""mIoU from one confusion matrix (VOC devkit), checked against hand computations."""
import json
import math

import numpy as np
import pytest
import torch

from apro.evaluation.semantic import (
    ConfusionMatrix,
    confusion_matrix,
    format_iou_table,
    iou_from_confusion,
    mean_iou,
    save_confusion_png,
    write_scores_json,
)


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(pred, target, num_classes=3)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    assert torch.equal(conf, expected)
    iou = iou_from_confusion(conf)
    # class 0: tp 1, gt 2, pred 1 -> 1 / 2; class 1: tp 2, gt 2, pred 3 -> 2 / 3; class 2: 1
    assert torch.allclose(iou, torch.tensor([0.5, 2 / 3, 1.0], dtype=torch.float64))
    assert mean_iou(conf) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_split_matrix_is_not_mean_of_images():
    # image A: class 1 perfect on 1 pixel; image B: class 1 all wrong on 3 pixels
    acc = ConfusionMatrix(num_classes=2)
    acc.update(torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))
    acc.update(np.array([[0, 0, 0, 0]]), np.array([[1, 1, 1, 0]]))
    s = acc.scores(["bg", "fg"])
    # pooled: class 1 tp 1, gt 4, pred 1 -> 1/4; class 0 tp 2, gt 2, pred 5 -> 2/5
    assert s["per_class_iou"]["fg"] == pytest.approx(0.25)
    assert s["per_class_iou"]["bg"] == pytest.approx(0.4)
    assert s["miou"] == pytest.approx(0.325)
    assert s["images"] == 2
    assert s["pixel_accuracy"] == pytest.approx(3 / 6)


def test_void_ignored_and_absent_class_nan():
    target = torch.full((4, 4), 255)
    target[0, 0] = 0
    pred = torch.randint(0, 2, (4, 4))
    pred[0, 0] = 0
    conf = confusion_matrix(pred, target, num_classes=3)
    assert int(conf.sum()) == 1
    iou = iou_from_confusion(conf)
    assert iou[0] == 1.0 and math.isnan(iou[1]) and math.isnan(iou[2])
    assert mean_iou(conf) == 1.0


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="target holds class index 21"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 21), 21)
    with pytest.raises(ValueError, match="prediction holds class index"):
        confusion_matrix(torch.full((2, 2), -1), torch.zeros(2, 2, dtype=torch.long), 21)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="prediction"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_outputs(tmp_path):
    acc = ConfusionMatrix(num_classes=3)
    acc.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [1, 255]]))
    s = acc.scores(["a", "b", "c"])
    table = format_iou_table(s)
    assert "mIoU" in table and "b" in table
    write_scores_json(s, str(tmp_path / "s.json"), split="val")
    back = json.loads((tmp_path / "s.json").read_text())
    assert back["split"] == "val" and back["confusion"][1] == [0, 1, 1]
    save_confusion_png(acc.matrix, str(tmp_path / "c.png"), ["a", "b", "c"])
    assert (tmp_path / "c.png").stat().st_size > 1000
