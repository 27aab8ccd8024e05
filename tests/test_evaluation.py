"""COCO mask AP (pycocotools), the filled-box baseline and mapping masks back to original size."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apro.data import CocoBoxDataset, collate_batch, make_synthetic_coco
from apro.evaluation import (
    encode_predictions,
    evaluate_masks,
    filled_box_predictions,
    masks_to_original_size,
    to_coco_predictions,
)

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

H, W = 60, 76
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth_eval"), 12, size=(H, W), num_classes=3, seed=11)


def _gt_predictions(ann_file):
    with open(ann_file) as f:
        data = json.load(f)
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
         "mask": mask_utils.decode(a["segmentation"]).astype(bool)}
        for a in data["annotations"]
    ]


def test_ground_truth_masks_score_100(synth):
    assert evaluate_masks(_gt_predictions(synth.eval_ann), synth.eval_ann) == {"AP": 100.0, "AP50": 100.0, "AP75": 100.0}


def test_filled_boxes_score_clearly_less_on_shapes(synth):
    boxes = filled_box_predictions(synth.eval_ann)
    assert len(boxes) == len(_gt_predictions(synth.eval_ann))
    result = evaluate_masks(boxes, synth.eval_ann)
    assert set(result) == {"AP", "AP50", "AP75"}
    assert 0 < result["AP"] < 50 and result["AP75"] < result["AP50"]
    # the box masks are exactly the annotation boxes
    with open(synth.eval_ann) as f:
        anns = json.load(f)["annotations"]
    for pred, ann in zip(boxes, anns):
        ys, xs = np.nonzero(pred["mask"])
        x, y, w, h = ann["bbox"]
        assert pred["mask"].sum() == w * h and (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_filled_boxes_score_100_on_rectangles(synth, tmp_path):
    """Sanity check of the baseline itself: when every object is its box, boxes are perfect."""
    with open(synth.eval_ann) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        m = np.zeros((H, W), np.uint8)
        m[y:y + h, x:x + w] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        ann["segmentation"], ann["area"] = rle, float(w * h)
    rect = tmp_path / "rectangles.json"
    rect.write_text(json.dumps(data))
    assert evaluate_masks(filled_box_predictions(rect), rect)["AP"] == pytest.approx(100.0)


def test_no_predictions_give_zero(synth):
    assert evaluate_masks([], synth.eval_ann) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_wrong_category_or_missing_images_lower_the_score(synth):
    gt = _gt_predictions(synth.eval_ann)
    relabelled = [dict(p, category_id=p["category_id"] % 3 + 1) for p in gt]
    assert evaluate_masks(relabelled, synth.eval_ann)["AP"] == 0.0
    half = [p for p in gt if p["image_id"] <= 6]
    partial = evaluate_masks(half, synth.eval_ann)["AP"]
    assert 0 < partial < 100
    # restricted to the predicted images, the same predictions are perfect
    assert evaluate_masks(half, synth.eval_ann, image_ids=range(1, 7))["AP"] == 100.0


def test_score_ranking_matters(synth):
    """A false positive ranked above the true masks costs AP; ranked below, it costs nothing."""
    gt = _gt_predictions(synth.eval_ann)
    empty_corner = np.zeros((H, W), bool)
    empty_corner[:2, :2] = True
    fp = [{"image_id": p["image_id"], "category_id": p["category_id"], "mask": empty_corner} for p in gt]
    low = evaluate_masks(gt + [dict(f, score=0.1) for f in fp], synth.eval_ann)["AP"]
    high = evaluate_masks(gt + [dict(f, score=1.5) for f in fp], synth.eval_ann)["AP"]
    assert low == 100.0 and high < 100.0


def test_rle_and_torch_masks_are_accepted(synth):
    gt = _gt_predictions(synth.eval_ann)
    as_torch = [dict(p, mask=torch.from_numpy(p["mask"])) for p in gt]
    as_rle = encode_predictions(gt, synth.eval_ann)
    assert all("segmentation" in r for r in as_rle)
    assert evaluate_masks(as_torch, synth.eval_ann)["AP"] == 100.0
    assert evaluate_masks(as_rle, synth.eval_ann)["AP"] == 100.0


def test_verbose_prints_only_when_asked(synth, capsys):
    evaluate_masks(_gt_predictions(synth.eval_ann), synth.eval_ann)
    assert capsys.readouterr().out == ""
    evaluate_masks(_gt_predictions(synth.eval_ann), synth.eval_ann, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(image_id=999), ValueError, r"predictions\[0\] has image_id 999"),
        (dict(category_id=42), ValueError, r"predictions\[0\] has category_id 42.*category_ids"),
        (dict(score=float("nan")), ValueError, r"predictions\[0\] has a non-finite score"),
        (dict(mask=np.zeros((H, W + 1), bool)), ValueError, r"predictions\[0\]: mask has shape \(60, 77\).*masks_to_original_size"),
        (dict(mask=np.zeros((H, W), np.float32)), TypeError, r"predictions\[0\]: 'mask' must be boolean"),
        (dict(mask=np.zeros((1, H, W), bool)), ValueError, r"predictions\[0\]: 'mask' must have shape \(H, W\)"),
    ],
    ids=["image", "category", "score", "size", "dtype", "ndim"],
)
def test_bad_predictions_raise(synth, change, error, pattern):
    pred = dict(_gt_predictions(synth.eval_ann)[0], **change)
    with pytest.raises(error, match=pattern):
        evaluate_masks([pred], synth.eval_ann)


def test_prediction_without_mask_raises(synth):
    pred = _gt_predictions(synth.eval_ann)[0]
    del pred["mask"]
    with pytest.raises(ValueError, match=r"predictions\[0\] has neither 'mask' nor 'segmentation'"):
        evaluate_masks([pred], synth.eval_ann)


def test_box_only_json_is_refused(synth):
    with pytest.raises(ValueError, match=r"train\.json.*without 'segmentation'.*evaluation JSON"):
        evaluate_masks(_gt_predictions(synth.eval_ann), synth.train_ann)


def test_masks_to_original_size_crops_padding_then_resizes():
    orig, size, padded = (30, 50), (45, 75), (64, 96)
    mask = torch.zeros(2, *padded, dtype=torch.bool)
    mask[0, 9:30, 15:45] = True            # inside the image: (6..20, 10..30) in the original
    mask[1, 50:60, 80:90] = True           # only on padding
    out = masks_to_original_size(mask, size, orig)
    assert out.dtype == torch.bool and out.shape == (2, *orig)
    expected = torch.zeros(orig, dtype=torch.bool)
    expected[6:20, 10:30] = True
    assert torch.equal(out[0], expected)
    assert not out[1].any()
    assert masks_to_original_size(torch.zeros(0, *padded), size, orig).shape == (0, *orig)
    probs = torch.full((1, *padded), 0.4)
    assert not masks_to_original_size(probs, size, orig).any()
    assert masks_to_original_size(probs, size, orig, threshold=0.3).all()
    with pytest.raises(ValueError, match="smaller than input_size"):
        masks_to_original_size(torch.zeros(1, 40, 70), size, orig)
    with pytest.raises(ValueError, match=r"\(K, Hp, Wp\)"):
        masks_to_original_size(torch.zeros(40, 70), size, orig)


def test_round_trip_through_dataset_and_padding_keeps_ap(synth):
    """GT masks carried to the network's input frame (resize, flip off, pad) and back score ~100."""
    ds = CocoBoxDataset(synth.image_dir, synth.eval_ann, train=False, short_sides=(90,), max_size=200)
    with open(synth.eval_ann) as f:
        anns = json.load(f)["annotations"]
    by_image = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    batch = collate_batch([ds[i] for i in range(len(ds))])
    hp, wp = batch["images"].shape[2:]
    outputs = []
    for target in batch["targets"]:
        group = by_image[target["image_id"]]
        masks = torch.stack([torch.from_numpy(mask_utils.decode(a["segmentation"])).float() for a in group])
        resized = F.interpolate(masks[None], size=target["size"], mode="bilinear", align_corners=False)[0]
        padded = torch.zeros(len(group), hp, wp)
        padded[:, : target["size"][0], : target["size"][1]] = resized
        labels = torch.tensor([ds.category_ids.index(a["category_id"]) for a in group])
        outputs.append({"masks": padded > 0.5, "labels": labels, "scores": torch.ones(len(group))})
    predictions = to_coco_predictions(outputs, batch["targets"], ds.category_ids)
    assert len(predictions) == len(anns) and all("segmentation" in p for p in predictions)
    result = evaluate_masks(predictions, synth.eval_ann)
    assert result["AP50"] == 100.0 and result["AP"] > 90.0
    as_masks = to_coco_predictions(outputs, batch["targets"], ds.category_ids, encode=False)
    assert as_masks[0]["mask"].shape == (H, W) and as_masks[0]["mask"].dtype == np.bool_
    with pytest.raises(ValueError, match="outputs has 1 images but targets has"):
        to_coco_predictions(outputs[:1], batch["targets"], ds.category_ids)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), H=st.integers(1, 70), W=st.integers(1, 70),
       pad_y=st.integers(0, 31), pad_x=st.integers(0, 31))
def test_masks_to_original_size_property(h, w, H, W, pad_y, pad_x):
    """Whatever the sizes, the image region maps onto the whole image and padding onto nothing."""
    masks = torch.zeros(2, H + pad_y, W + pad_x, dtype=torch.bool)
    masks[0, :H, :W] = True
    masks[1] = ~masks[0]
    out = masks_to_original_size(masks, (H, W), (h, w))
    assert out.shape == (2, h, w) and out[0].all() and not out[1].any()
