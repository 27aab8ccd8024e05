"""CocoBoxDataset, collate_batch and make_synthetic_coco on small synthetic sets."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from apro.data import CocoBoxDataset, collate_batch, load_coco_json, make_synthetic_coco

H, W = 64, 80
# pycocotools' RLE decoder predates NumPy 2's copy keyword; its warning is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), 8, size=(H, W), num_classes=3, seed=3)


def _copy_set(synth, tmp_path, edit):
    """Copy the synthetic set, apply ``edit(data)`` to the train JSON, return (image_dir, ann_file)."""
    image_dir = tmp_path / "images"
    shutil.copytree(synth.image_dir, image_dir)
    with open(synth.train_ann) as f:
        data = json.load(f)
    edit(data)
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    return str(image_dir), str(ann)


def _gt_masks(synth):
    from pycocotools import mask as mask_utils

    with open(synth.eval_ann) as f:
        data = json.load(f)
    return {a["id"]: mask_utils.decode(a["segmentation"]).astype(bool) for a in data["annotations"]}, data


# ---------------------------------------------------------------------------------------------
# make_synthetic_coco


def test_synthetic_set_layout(synth):
    with open(synth.train_ann) as f:
        train = json.load(f)
    masks, evaluation = _gt_masks(synth)
    assert len(train["images"]) == 8 and [c["id"] for c in train["categories"]] == [1, 2, 3]
    assert all("segmentation" not in a for a in train["annotations"])
    assert [a["id"] for a in train["annotations"]] == [a["id"] for a in evaluation["annotations"]]
    per_image = np.bincount([a["image_id"] for a in train["annotations"]], minlength=9)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 3
    for ann in evaluation["annotations"]:
        m = masks[ann["id"]]
        assert m.shape == (H, W) and ann["iscrowd"] == 0 and ann["area"] == m.sum()
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        # shapes are not boxes: the mask fills clearly less than its box
        assert m.sum() < 0.85 * ann["bbox"][2] * ann["bbox"][3]
    for image in train["images"]:
        with Image.open(os.path.join(synth.image_dir, image["file_name"])) as img:
            assert img.size == (W, H) and img.mode == "RGB"


def test_synthetic_set_is_deterministic(synth, tmp_path):
    again = make_synthetic_coco(tmp_path, 8, size=(H, W), num_classes=3, seed=3)
    other = make_synthetic_coco(tmp_path / "other", 8, size=(H, W), num_classes=3, seed=4)
    for a, b in ((synth.train_ann, again.train_ann), (synth.eval_ann, again.eval_ann)):
        assert json.load(open(a)) == json.load(open(b))
    name = "000001.png"
    first = np.asarray(Image.open(os.path.join(synth.image_dir, name)))
    assert np.array_equal(first, np.asarray(Image.open(os.path.join(again.image_dir, name))))
    assert not np.array_equal(first, np.asarray(Image.open(os.path.join(other.image_dir, name))))


def test_synthetic_objects_stand_out(synth):
    """Objects differ in colour from the background next to them (else nothing is learnable)."""
    masks, data = _gt_masks(synth)
    for ann in data["annotations"]:
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        pixels = np.asarray(Image.open(os.path.join(synth.image_dir, image["file_name"])), np.float32) / 255
        m = masks[ann["id"]]
        x, y, w, h = ann["bbox"]
        ring = np.zeros_like(m)
        ring[max(y - 3, 0): y + h + 3, max(x - 3, 0): x + w + 3] = True
        all_masks = np.any([masks[a["id"]] for a in data["annotations"] if a["image_id"] == ann["image_id"]], axis=0)
        ring &= ~all_masks
        assert np.linalg.norm(pixels[m].mean(0) - pixels[ring].mean(0)) > 0.2


# ---------------------------------------------------------------------------------------------
# CocoBoxDataset


def test_items_shapes_dtypes_and_boxes_inside(synth):
    ds = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(48, 64, 96), max_size=110, seed=0)
    assert len(ds) == 8 and ds.num_classes == 3 and ds.category_ids == [1, 2, 3]
    seen_flip = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            image, boxes, labels = item["image"], item["boxes"], item["labels"]
            assert image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
            assert 0.0 <= image.min() and image.max() <= 1.0
            hh, ww = image.shape[1:]
            assert item["size"] == (hh, ww) and item["orig_size"] == (H, W)
            assert max(hh, ww) <= 110 and (min(hh, ww) in (48, 64, 96) or max(hh, ww) >= 109)
            assert boxes.dtype == torch.float32 and boxes.shape == (labels.shape[0], 4) and len(labels) >= 1
            assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 3
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= ww + 1e-4).all() and (boxes[:, 3] <= hh + 1e-4).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert isinstance(item["image_id"], int) and isinstance(item["scale"], float)
            seen_flip.add(item["flipped"])
    assert seen_flip == {True, False}


def test_boxes_follow_the_object_through_resize_and_flip(synth):
    """The box of each item bounds the (resized, possibly flipped) GT mask of its object."""
    masks, data = _gt_masks(synth)
    ds = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(96,), max_size=None, seed=1)
    ann_by_image = {}
    for ann in data["annotations"]:
        ann_by_image.setdefault(ann["image_id"], []).append(ann)
    for i in range(len(ds)):
        item = ds[i]
        hh, ww = item["size"]
        for box, ann in zip(item["boxes"], ann_by_image[item["image_id"]]):
            m = torch.from_numpy(masks[ann["id"]]).float()[None, None]
            m = torch.nn.functional.interpolate(m, size=(hh, ww), mode="nearest")[0, 0] > 0
            if item["flipped"]:
                m = m.flip(-1)
            ys, xs = torch.nonzero(m, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(box, tight, atol=1.5), (box, tight)


def test_flip_mirrors_image_and_boxes(synth):
    flipping = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(72,), seed=5)
    plain = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(72,), flip=False, seed=5)
    flipped_any = False
    for i in range(len(flipping)):
        a, b = flipping[i], plain[i]
        assert not b["flipped"]
        if not a["flipped"]:
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
            continue
        flipped_any = True
        ww = b["image"].shape[-1]
        assert torch.equal(a["image"], b["image"].flip(-1))
        mirrored = torch.stack([ww - b["boxes"][:, 2], b["boxes"][:, 1], ww - b["boxes"][:, 0], b["boxes"][:, 3]], 1)
        assert torch.allclose(a["boxes"], mirrored)
        assert torch.equal(a["labels"], b["labels"])
    assert flipped_any


def test_augmentation_is_seeded(synth):
    def draws(seed, epoch):
        ds = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(48, 56, 64, 72), seed=seed)
        ds.set_epoch(epoch)
        return [(ds[i]["size"], ds[i]["flipped"]) for i in range(len(ds))]

    assert draws(0, 0) == draws(0, 0)
    assert draws(0, 0) != draws(0, 1)
    assert draws(0, 0) != draws(1, 0)
    ds = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(48, 56, 64, 72), seed=0)
    assert torch.equal(ds[3]["image"], ds[3]["image"])  # same item twice: same augmentation


def test_image_cache_gives_the_same_items_and_reads_each_size_once(synth, monkeypatch):
    cached = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(48, 64), seed=3, cache_images=True)
    plain = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(48, 64), seed=3)
    reads = []
    load = cached.load_image
    monkeypatch.setattr(cached, "load_image", lambda i: reads.append(i) or load(i))
    seen = set()
    for epoch in range(4):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(cached)):
            a, b = cached[i], plain[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
            assert a["flipped"] == b["flipped"] and a["size"] == b["size"]
            seen.add((i, a["size"]))
    assert len(reads) == len(seen) < 4 * len(cached)  # one decode per (item, size), flips included


def test_eval_mode_uses_largest_short_side_and_no_flip(synth):
    ds = CocoBoxDataset(synth.image_dir, synth.train_ann, train=False, short_sides=(32, 96), max_size=1000)
    for i in range(len(ds)):
        item = ds[i]
        assert not item["flipped"] and item["size"] == (96, 120) and item["scale"] == pytest.approx(1.5)


def test_masks_are_never_read_in_training(synth, tmp_path):
    """Train JSON has no masks; and garbage masks in the JSON change nothing."""
    with open(synth.eval_ann) as f:
        data = json.load(f)
    for ann in data["annotations"]:
        ann["segmentation"] = "not a mask"
    garbage = tmp_path / "garbage_masks.json"
    garbage.write_text(json.dumps(data))
    a = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(64,), seed=2)
    b = CocoBoxDataset(synth.image_dir, str(garbage), short_sides=(64,), seed=2)
    for i in range(len(a)):
        assert torch.equal(a[i]["boxes"], b[i]["boxes"]) and torch.equal(a[i]["image"], b[i]["image"])


def test_crowd_annotations_are_ignored(synth, tmp_path):
    def edit(data):
        data["annotations"][0]["iscrowd"] = 1

    image_dir, ann = _copy_set(synth, tmp_path, edit)
    full = CocoBoxDataset(synth.image_dir, synth.train_ann, train=False, short_sides=(64,))
    ds = CocoBoxDataset(image_dir, ann, train=False, short_sides=(64,))
    assert sum(len(ds[i]["boxes"]) for i in range(len(ds))) == sum(len(full[i]["boxes"]) for i in range(len(full))) - 1


# ---------------------------------------------------------------------------------------------
# bad data


def test_corrupt_json_raises_with_file_and_position(synth, tmp_path):
    text = open(synth.train_ann).read()
    bad = tmp_path / "corrupt.json"
    bad.write_text(text[:-20])
    with pytest.raises(ValueError, match=r"corrupt\.json.*not valid JSON.*line 1 column \d+ \(char \d+\)"):
        CocoBoxDataset(synth.image_dir, str(bad))
    bad.write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(ValueError, match=r"corrupt\.json.*line 2 column 18"):
        CocoBoxDataset(synth.image_dir, str(bad))


def test_missing_annotation_file(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoBoxDataset(synth.image_dir, str(tmp_path / "nope.json"))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda d: d["annotations"][2].pop("bbox"), r"train\.json.*annotations\[2\] \(annotation id 3\).*missing.*'bbox'"),
        (lambda d: d["annotations"][1].pop("category_id"), r"train\.json.*annotation id 2.*missing.*'category_id'"),
        (lambda d: d["images"][4].pop("file_name"), r"train\.json.*images\[4\] \(image id 5\).*missing.*'file_name'"),
        (lambda d: d.pop("categories"), r"train\.json.*no 'categories'"),
        (lambda d: d["annotations"][3].update(category_id=99), r"train\.json.*annotation id 4 \(image_id \d+\).*category_id 99.*not in 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=1234), r"train\.json.*annotation id 1 refers to image_id 1234"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"train\.json.*annotation id 1 .*bbox \[1, 2, 3\]"),
        (lambda d: d["images"][0].update(height=0), r"train\.json.*image id 1 .*height/width"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"train\.json.*duplicate annotation id 1"),
    ],
    ids=["no-bbox", "no-category", "no-file-name", "no-categories", "unknown-category", "unknown-image",
         "short-bbox", "zero-height", "duplicate-id"],
)
def test_bad_records_raise_naming_file_and_record(synth, tmp_path, edit, pattern):
    image_dir, ann = _copy_set(synth, tmp_path, edit)
    with pytest.raises(ValueError, match=pattern):
        CocoBoxDataset(image_dir, ann)


def test_missing_image_file_raises_naming_file_and_image(synth, tmp_path):
    image_dir, ann = _copy_set(synth, tmp_path, lambda d: None)
    os.remove(os.path.join(image_dir, "000003.png"))
    with pytest.raises(FileNotFoundError, match=r"1 image file.*000003\.png.*\(image id 3\)"):
        CocoBoxDataset(image_dir, ann)
    lazy = CocoBoxDataset(image_dir, ann, check_files=False)
    index = lazy.image_ids.index(3)
    with pytest.raises(FileNotFoundError, match=r"000003\.png.*image id 3.*train\.json"):
        lazy[index]


def test_corrupt_or_mismatched_image_raises(synth, tmp_path):
    image_dir, ann = _copy_set(synth, tmp_path, lambda d: None)
    with open(os.path.join(image_dir, "000002.png"), "wb") as f:
        f.write(b"\x89PNG this is not an image")
    Image.new("RGB", (W + 4, H)).save(os.path.join(image_dir, "000004.png"))
    ds = CocoBoxDataset(image_dir, ann, train=False)
    with pytest.raises(OSError, match=r"cannot read image file .*000002\.png.*image id 2"):
        ds[ds.image_ids.index(2)]
    with pytest.raises(ValueError, match=r"000004\.png.*image id 4.*84x64.*says 80x64"):
        ds[ds.image_ids.index(4)]


def test_grey_and_rgba_images_become_rgb(synth, tmp_path):
    image_dir, ann = _copy_set(synth, tmp_path, lambda d: None)
    for name, mode in (("000001.png", "L"), ("000002.png", "RGBA")):
        path = os.path.join(image_dir, name)
        Image.open(path).convert(mode).save(path)
    ds = CocoBoxDataset(image_dir, ann, train=False, short_sides=(64,))
    assert ds[0]["image"].shape == (3, H, W) and ds[1]["image"].shape == (3, H, W)


def test_degenerate_and_outside_boxes_are_skipped_with_one_warning(synth, tmp_path, caplog):
    def edit(data):
        anns = data["annotations"]
        first_image = anns[0]["image_id"]
        n_first = sum(a["image_id"] == first_image for a in anns)
        # image 1: every box degenerate -> the image is skipped in training
        for a in anns:
            if a["image_id"] == first_image:
                a["bbox"] = [10, 10, 0.5, 20]
        # an image with several boxes: one zero-size and one outside the image
        multi = [a for a in anns if sum(b["image_id"] == a["image_id"] for b in anns) >= 3][0]["image_id"]
        group = [a for a in anns if a["image_id"] == multi]
        group[0]["bbox"] = [5, 5, 0, 0]
        group[1]["bbox"] = [W + 5, 3, 10, 10]
        data["_expect"] = (first_image, n_first, multi, group[0]["id"], group[1]["id"])

    image_dir, ann = _copy_set(synth, tmp_path, edit)
    first_image, n_first, multi, zero_id, outside_id = json.load(open(ann))["_expect"]
    with caplog.at_level(logging.WARNING, logger="apro.data"):
        ds = CocoBoxDataset(image_dir, ann, short_sides=(64,))
        for i in range(len(ds)):
            ds[i]
        ds.set_epoch(1)
        for i in range(len(ds)):
            ds[i]
    messages = [r.getMessage() for r in caplog.records]
    zero = [m for m in messages if f"annotation id {zero_id} " in m]
    outside = [m for m in messages if f"annotation id {outside_id} " in m]
    assert len(zero) == 1 and "train.json" in zero[0] and f"image id {multi}" in zero[0] and "degenerate" in zero[0]
    assert len(outside) == 1 and "outside the image" in outside[0]
    skipped = [m for m in messages if f"skipping image id {first_image} " in m]
    assert len(skipped) == 1 and "train.json" in skipped[0] and "no usable box" in skipped[0]
    assert len(messages) == n_first + 3
    assert first_image not in ds.image_ids and len(ds) == 7
    assert len(ds[ds.image_ids.index(multi)]["boxes"]) == 1
    # evaluation mode keeps the image, with no boxes
    kept = CocoBoxDataset(image_dir, ann, train=False, short_sides=(64,))
    item = kept[kept.image_ids.index(first_image)]
    assert item["boxes"].shape == (0, 4) and item["labels"].shape == (0,)


def test_partly_outside_box_is_clipped(synth, tmp_path):
    def edit(data):
        data["annotations"][0]["bbox"] = [-10.0, -5.0, 30.0, 25.0]

    image_dir, ann = _copy_set(synth, tmp_path, edit)
    ds = CocoBoxDataset(image_dir, ann, train=False, short_sides=(H,))
    image_id = json.load(open(ann))["annotations"][0]["image_id"]
    assert ds[ds.image_ids.index(image_id)]["boxes"][0].tolist() == [0.0, 0.0, 20.0, 20.0]


def test_no_usable_image_raises(synth, tmp_path):
    def edit(data):
        for a in data["annotations"]:
            a["bbox"] = [0, 0, 1, 1]

    image_dir, ann = _copy_set(synth, tmp_path, edit)
    with pytest.raises(ValueError, match=r"train\.json.*no image with a usable box"):
        CocoBoxDataset(image_dir, ann)


def test_bad_arguments(synth):
    with pytest.raises(FileNotFoundError, match="image_dir"):
        CocoBoxDataset(synth.image_dir + "_missing", synth.train_ann)
    with pytest.raises(ValueError, match="short_sides"):
        CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=())
    with pytest.raises(TypeError, match="max_size"):
        CocoBoxDataset(synth.image_dir, synth.train_ann, max_size=10.5)
    with pytest.raises(TypeError, match="size must be a pair"):
        make_synthetic_coco("/nonexistent", 1, size=64)


def test_load_coco_json_returns_the_data(synth):
    data = load_coco_json(synth.eval_ann)
    assert set(data) >= {"images", "annotations", "categories"}


# ---------------------------------------------------------------------------------------------
# collate_batch


def test_collate_pads_to_multiple_of_32(synth):
    ds = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(40, 50, 70), max_size=100, seed=0)
    items = [ds[i] for i in range(4)]
    batch = collate_batch(items)
    images, valid, targets = batch["images"], batch["valid"], batch["targets"]
    hmax = max(it["image"].shape[1] for it in items)
    wmax = max(it["image"].shape[2] for it in items)
    assert images.shape[:2] == (4, 3) and valid.shape[:2] == (4, 1)
    hp, wp = images.shape[2:]
    assert hp % 32 == 0 and wp % 32 == 0 and hmax <= hp < hmax + 32 and wmax <= wp < wmax + 32
    assert valid.shape[2:] == (hp, wp) and images.dtype == valid.dtype == torch.float32
    for i, item in enumerate(items):
        _, h, w = item["image"].shape
        assert torch.equal(images[i, :, :h, :w], item["image"])
        assert valid[i, 0, :h, :w].eq(1).all() and valid[i].sum() == h * w
        assert images[i].sum() == pytest.approx(item["image"].sum().item(), rel=1e-5)
        assert "image" not in targets[i] and torch.equal(targets[i]["boxes"], item["boxes"])
        assert targets[i]["image_id"] == item["image_id"]


def test_collate_works_in_a_dataloader(synth):
    ds = CocoBoxDataset(synth.image_dir, synth.train_ann, short_sides=(64,), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_batch)
    batches = list(loader)
    assert [b["images"].shape[0] for b in batches] == [3, 3, 2]
    assert batches[0]["images"].shape[2:] == (64, 96)


def test_collate_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        collate_batch([])
    with pytest.raises(ValueError, match=r"items\[0\]"):
        collate_batch([{"image": torch.zeros(1, 4, 4)}])
