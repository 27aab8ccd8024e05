"""VOC readers (voc-sparse and VOC 2012 layouts), label checks, and TEL-style augmentation."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apro.data.augmentation import SemanticAugmentation, resize_long_side
from apro.data.voc import (
    VOC_CLASSES,
    VocDataError,
    VocSegmentation,
    check_files,
    detect_layout,
    read_label,
    voc_files,
    voc_palette,
    write_label,
)


def _scene(h, w, seed):
    rng = np.random.default_rng(seed)
    gt = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(2, h // 2), rng.integers(2, w // 2)
    gt[y0:y0 + h // 3, x0:x0 + w // 3] = 1 + seed % 20
    gt[0, :] = 255
    rgb = np.stack([gt * 10, 255 - gt * 5, np.full_like(gt, 60)], -1).astype(np.uint8)
    points = np.full((h, w), 255, np.uint8)
    points[y0 + 2, x0 + 2] = gt[y0 + 2, x0 + 2]
    points[h - 2, w - 2] = 0
    return rgb, gt, points


def _save_gt(path, gt):
    write_label(path, gt, palette=True)


def make_voc_sparse(root: Path, n=4, size=(40, 56)):
    for d in ("images", "gt", "points", "scribbles", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [f"img_{i}" for i in range(n)]
    for i, name in enumerate(names):
        rgb, gt, pts = _scene(*size, i)
        Image.fromarray(rgb).save(root / "images" / f"{name}.jpg", quality=95)
        _save_gt(root / "gt" / f"{name}.png", gt)
        Image.fromarray(pts, mode="L").save(root / "points" / f"{name}.png")
        scr = np.where(gt == 255, 255, gt).astype(np.uint8)
        scr[::2] = 255
        Image.fromarray(scr, mode="L").save(root / "scribbles" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("\n".join(names[: n // 2]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(names[n // 2:]) + "\n\n")
    return names


def make_voc2012(root: Path, n=3, size=(36, 48), gt_dir="SegmentationClass"):
    (root / "JPEGImages").mkdir(parents=True)
    (root / gt_dir).mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = [f"2012_{i:06d}" for i in range(n)]
    for i, name in enumerate(names):
        rgb, gt, _ = _scene(*size, i + 7)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg")
        _save_gt(root / gt_dir / f"{name}.png", gt)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return names


def test_voc_sparse_reader(tmp_path):
    names = make_voc_sparse(tmp_path)
    assert detect_layout(tmp_path) == "voc-sparse"
    for labels in ("points", "scribbles", "gt"):
        ds = VocSegmentation(tmp_path, "train", labels=labels)
        assert len(ds) == 2 and ds.files.names == tuple(names[:2])
        item = ds[1]
        assert item["image"].shape == (3, 40, 56) and item["image"].dtype == torch.float32
        assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
        assert item["label"].shape == (40, 56) and item["label"].dtype == torch.int64
        expected = np.array(Image.open(tmp_path / ({"gt": "gt"}.get(labels, labels)) / f"{names[1]}.png"))
        assert np.array_equal(item["label"].numpy(), expected)
        gt = np.array(Image.open(tmp_path / "gt" / f"{names[1]}.png"))
        assert np.array_equal(item["gt"].numpy(), gt)
    assert check_files(VocSegmentation(tmp_path, "val", labels="points")) == 2
    assert len(VocSegmentation(tmp_path, str(tmp_path / "splits" / "val.txt"), labels=None)) == 2


@pytest.mark.parametrize("gt_dir", ["SegmentationClass", "SegmentationClassAug"])
def test_voc2012_reader(tmp_path, gt_dir):
    names = make_voc2012(tmp_path, gt_dir=gt_dir)
    assert detect_layout(tmp_path) == "voc2012"
    ds = VocSegmentation(tmp_path, "train", labels="gt")
    assert len(ds) == 3
    item = ds[2]
    gt = np.array(Image.open(tmp_path / gt_dir / f"{names[2]}.png"))
    assert np.array_equal(item["gt"].numpy(), gt) and np.array_equal(item["label"].numpy(), gt)
    # sparse labels from a directory of PNGs
    sparse = tmp_path / "mine"
    sparse.mkdir()
    for n in names:
        Image.fromarray(np.full(gt.shape, 255, np.uint8), mode="L").save(sparse / f"{n}.png")
    ds = VocSegmentation(tmp_path, "train", labels="points", sparse_dir=sparse)
    assert int((ds[0]["label"] != 255).sum()) == 0
    with pytest.raises(VocDataError, match="no points directory"):
        VocSegmentation(tmp_path, "train", labels="points")


def test_bad_files_refused(tmp_path):
    names = make_voc_sparse(tmp_path)
    # missing split entry
    (tmp_path / "splits" / "train.txt").write_text(names[0] + "\nnot_there\n")
    with pytest.raises(VocDataError, match=r"not_there\.jpg is missing \(listed in .*train\.txt\)"):
        VocSegmentation(tmp_path, "train", labels="points")
    (tmp_path / "splits" / "train.txt").write_text(names[0] + "\n")
    with pytest.raises(VocDataError, match="missing split file"):
        VocSegmentation(tmp_path, "test", labels="points")
    # wrong size
    bad = tmp_path / "points" / f"{names[0]}.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8), mode="L").save(bad)
    ds = VocSegmentation(tmp_path, "train", labels="points")
    with pytest.raises(VocDataError, match=rf"{names[0]}\.png is 10x10 but its image is 56x40"):
        ds[0]
    # unknown class index
    arr = np.full((40, 56), 255, np.uint8)
    arr[3, 3] = 21
    Image.fromarray(arr, mode="L").save(bad)
    with pytest.raises(VocDataError, match="unknown class index 21"):
        ds[0]
    # RGB colour label
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(bad)
    with pytest.raises(VocDataError, match="mode 'RGB'"):
        read_label(bad)
    # undecodable
    bad.write_bytes(b"not a png")
    with pytest.raises(VocDataError, match="cannot read label"):
        read_label(bad)
    with pytest.raises(VocDataError, match="neither"):
        detect_layout(tmp_path / "splits")


def test_palette_png_round_trip(tmp_path):
    lab = np.array([[0, 1, 20], [255, 15, 0]], np.uint8)
    write_label(tmp_path / "p.png", lab)
    im = Image.open(tmp_path / "p.png")
    assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
    assert np.array_equal(read_label(tmp_path / "p.png"), lab)
    assert len(voc_palette()) == 768 and len(VOC_CLASSES) == 21


def _aligned_pair(h=60, w=80):
    # image channel 0 = label / 20 on blocks; labels nearest, so interiors must agree
    label = torch.full((h, w), 255, dtype=torch.long)
    for k, (y, x) in enumerate([(5, 5), (5, 45), (32, 20), (30, 55)]):
        label[y:y + 20, x:x + 20] = k + 1
    image = torch.zeros(3, h, w)
    image[0] = torch.where(label == 255, torch.zeros(()), label.float() / 20)
    image[1] = torch.arange(w).float().expand(h, w) / w  # detects flips
    return image, label


def test_augmentation_exact_crop_and_flip():
    image, label = _aligned_pair()
    flips = set()
    for seed in range(12):
        aug = SemanticAugmentation(crop=32, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(seed))
        img, lab = aug(image, label)
        assert img.shape == (3, 32, 32) and lab.shape == (32, 32) and lab.dtype == torch.long
        labeled = lab != 255
        assert torch.allclose(img[0][labeled], lab[labeled].float() / 20)
        flips.add(bool(img[1, 0, 0] > img[1, 0, -1]))
    assert flips == {True, False}


def test_augmentation_scaled_keeps_alignment_and_classes():
    image, label = _aligned_pair()
    gt = label.clone()
    for seed in range(8):
        aug = SemanticAugmentation(crop=64, scale=(0.5, 2.0), long_side=100,
                                   generator=torch.Generator().manual_seed(seed))
        img, lab, g = aug(image, label, gt)
        assert torch.equal(lab, g)  # every label map gets the same geometry
        assert set(lab.unique().tolist()) <= {1, 2, 3, 4, 255}  # nearest: no new class values
        labeled = lab != 255
        if labeled.sum() == 0:
            continue
        # away from block borders the bilinear image agrees with the nearest label
        close = (img[0][labeled] - lab[labeled].float() / 20).abs() < 0.02
        assert close.float().mean() > 0.8
    # padding: a small image is padded with label 255
    aug = SemanticAugmentation(crop=128, scale=(1.0, 1.0), flip=False)
    img, lab = aug(image, label)
    assert img.shape == (3, 128, 128) and bool((lab[70:, :] == 255).all()) and float(img[:, 70:].abs().sum()) == 0


def test_augmentation_uses_global_rng_when_no_generator():
    image, label = _aligned_pair()
    aug = SemanticAugmentation(crop=32, scale=(0.7, 1.3))
    torch.manual_seed(3)
    a = aug(image, label)
    torch.manual_seed(3)
    b = aug(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="crop"):
        SemanticAugmentation(crop=4)
    with pytest.raises(ValueError, match="label shape"):
        aug(image, label[:10])
    img, labs = resize_long_side(image, [label], 40)
    assert img.shape == (3, 30, 40) and labs[0].shape == (30, 40)


REAL = Path(os.environ.get("APRO_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")) / "voc-sparse"


@pytest.mark.skipif(not (REAL / "splits").is_dir(), reason="voc-sparse data not present")
def test_real_voc_sparse_split_files():
    for split, n in (("train", 265), ("val", 276)):
        files = voc_files(REAL, split, "scribbles")
        assert len(files.names) == n
    ds = VocSegmentation(REAL, "train", labels="points")
    item = ds[0]
    assert item["label"].shape == item["gt"].shape == item["image"].shape[-2:]


def test_shrinking_keeps_sparse_clicks():
    label = torch.full((200, 240), 255, dtype=torch.long)
    clicks = [(10, 10, 3), (57, 101, 15), (150, 200, 8), (151, 201, 8), (120, 30, 0)]
    for y, x, c in clicks:
        label[y - 1:y + 2, x] = c  # 5-pixel cross, as the voc-sparse points
        label[y, x - 1:x + 2] = c
    gt = torch.zeros_like(label)
    image = torch.rand(3, 200, 240)
    aug = SemanticAugmentation(crop=64, scale=(1.0, 1.0), long_side=60, flip=False)
    img, lab, g = aug(image, label, gt)
    # every click survives the 4x shrink, at the pixel its centre lands on
    for y, x, c in clicks:
        ty, tx = int((y + 0.5) * 50 / 200), int((x + 0.5) * 60 / 240)
        assert int(lab[ty - 1:ty + 2, tx - 1:tx + 2].eq(c).sum()) >= 1, (y, x, c)
    assert set(lab.unique().tolist()) == {0, 3, 8, 15, 255}
    assert int((lab != 255).sum()) <= 2 * len(clicks)  # no smearing: a few pixels per click
    assert bool((g[:50, :60] == 0).all())  # dense maps are resized by plain nearest neighbour


def test_items_mark_the_padding_of_small_crops(tmp_path):
    make_voc_sparse(tmp_path, n=4, size=(40, 56))
    plain = VocSegmentation(tmp_path, "train", labels="points")
    assert bool(plain[0]["valid"].all()) and plain[0]["valid"].shape == (40, 56)
    padded = VocSegmentation(tmp_path, "train", labels="points",
                             transform=SemanticAugmentation(crop=64, scale=(1.0, 1.0), flip=True,
                                                            generator=torch.Generator().manual_seed(0)))
    for i in range(len(padded)):
        item = padded[i]
        valid = item["valid"]
        assert valid.dtype == torch.bool and valid.shape == (64, 64)
        assert int(valid.sum()) == 40 * 56  # the whole image, nothing else
        rows, cols = valid.any(1).nonzero().squeeze(1), valid.any(0).nonzero().squeeze(1)
        assert rows.tolist() == list(range(40)) and len(cols) == 56  # top rows; left or right (flip)
        assert bool((item["label"][~valid] == 255).all()) and float(item["image"][:, ~valid].abs().sum()) == 0
