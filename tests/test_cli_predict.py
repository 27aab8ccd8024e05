"""`apro predict box`: what it writes (viewable per-instance PNGs, RLE JSON, overlay), and the
inputs it refuses before writing anything (exit 2, one line)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import apro.cli.predict as predict_cli
from apro.cli import main
from apro.data import make_synthetic_coco

TINY = ["--model-option", "fpn_channels=16", "--model-option", "head_channels=16",
        "--model-option", "mask_channels=8", "--model-option", "mask_branch_channels=16",
        "--model-option", "grid_sizes=[8, 4]", "--model-option", "scale_ranges=[[1, 32], [24, 4096]]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    synthetic = make_synthetic_coco(root / "coco", 4, size=(64, 64), num_classes=2, seed=5)
    out = root / "run"
    assert main(["train", "box", "--data", synthetic.image_dir, "--ann", synthetic.train_ann, "--out", str(out),
                 "--steps", "1", "--batch-size", "2", "--short-sides", "64", "--max-size", "64", "--no-pretrained",
                 "--warmup-steps", "1", "--quiet", *TINY]) == 0
    return out


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("apro: error: ")
    return err[0]


def _photo(path, h=40, w=60):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(path)
    return path


def _two_overlapping(h, w):
    a = np.zeros((h, w), bool)
    b = np.zeros((h, w), bool)
    a[5:25, 5:30] = True
    b[15:35, 20:50] = True  # overlaps a
    return {"masks": np.stack([a, b]), "labels": np.array([0, 1]), "scores": np.array([0.9, 0.6], np.float32)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under NumPy 2
def test_every_instance_is_kept_viewable_and_in_the_json(run_dir, tmp_path, monkeypatch, capsys):
    from pycocotools import mask as mask_utils

    image = _photo(tmp_path / "photo.png")
    found = _two_overlapping(40, 60)
    monkeypatch.setattr(predict_cli, "segment", lambda model, rgb, *a: found)
    out = tmp_path / "pred"
    assert main(["predict", "box", str(run_dir), str(image), "-o", str(out), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "wrote 1 image(s)" in line and "2 instance(s)" in line
    assert sorted(p.name for p in out.iterdir()) == [
        "photo.json", "photo_instance_001.png", "photo_instance_002.png", "photo_overlay.png"]
    record = json.loads((out / "photo.json").read_text())
    assert (record["width"], record["height"]) == (60, 40)
    assert [r["id"] for r in record["instances"]] == [1, 2]
    for r, mask in zip(record["instances"], found["masks"]):
        png = np.asarray(Image.open(out / r["mask_png"]))
        assert png.dtype == np.uint8 and set(np.unique(png)) == {0, 255}  # viewable, not a black id map
        assert np.array_equal(png == 255, mask)  # the overlap is in both
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert r["area"] == mask.sum()
        ys, xs = np.nonzero(mask)
        assert r["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert [r["category_id"] for r in record["instances"]] == [1, 2]
    overlay = np.asarray(Image.open(out / "photo_overlay.png"))
    original = np.asarray(Image.open(image))
    anywhere = found["masks"].any(0)
    assert np.array_equal(overlay[~anywhere], original[~anywhere]) and not np.array_equal(overlay, original)


def test_no_instance_is_said_honestly(run_dir, tmp_path, monkeypatch, capsys):
    image = _photo(tmp_path / "photo.png")
    empty = {"masks": np.zeros((0, 40, 60), bool), "labels": np.zeros(0, int), "scores": np.zeros(0, np.float32)}
    monkeypatch.setattr(predict_cli, "segment", lambda model, rgb, *a: empty)
    assert main(["predict", "box", str(run_dir), str(image), "-o", str(tmp_path / "p"), "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "0 instance(s) with score >= 0.3" in line and "1 image(s) with no instance" in line
    assert json.loads((tmp_path / "p" / "photo.json").read_text())["instances"] == []


def test_mask_threshold_reaches_the_model_and_the_json(run_dir, tmp_path, monkeypatch, capsys):
    image = _photo(tmp_path / "photo.png")
    seen = []

    def segment(model, rgb, *a):
        seen.append(model.mask_threshold)
        return _two_overlapping(40, 60)

    monkeypatch.setattr(predict_cli, "segment", segment)
    assert main(["predict", "box", str(run_dir), str(image), "-o", str(tmp_path / "a"), "--quiet"]) == 0
    trained = seen[-1]
    assert json.loads((tmp_path / "a" / "photo.json").read_text())["mask_threshold"] == trained
    chosen = 0.35 if trained != 0.35 else 0.45
    assert main(["predict", "box", str(run_dir), str(image), "-o", str(tmp_path / "b"), "--quiet",
                 "--mask-threshold", str(chosen)]) == 0
    assert seen[-1] == chosen
    assert json.loads((tmp_path / "b" / "photo.json").read_text())["mask_threshold"] == chosen


def test_16bit_and_rotated_inputs_are_read_as_viewers_show_them(run_dir, tmp_path, monkeypatch, capsys):
    seen = []

    def fake(model, rgb, *a):
        seen.append(rgb)
        return {"masks": np.zeros((0,) + rgb.shape[:2], bool), "labels": np.zeros(0, int), "scores": np.zeros(0)}

    monkeypatch.setattr(predict_cli, "segment", fake)
    grey = np.linspace(0, 65535, 40 * 60).astype(np.uint16).reshape(40, 60)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    img = Image.fromarray(np.full((40, 60, 3), 100, np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert main(["predict", "box", str(run_dir), str(tmp_path / "grey16.png"), str(tmp_path / "phone.jpg"),
                 "-o", str(tmp_path / "p"), "--quiet"]) == 0
    assert seen[0].max() == 255 and (seen[0] == 255).mean() < 0.1  # scaled, not clipped to white
    assert seen[1].shape == (60, 40, 3)  # EXIF orientation applied


@pytest.mark.parametrize("case, expected", [
    ("threshold_high", "--score-threshold must be in [0, 1]"),
    ("threshold_negative", "--score-threshold must be in [0, 1]"),
    ("mask_threshold_one", "--mask-threshold must be in (0, 1)"),
    ("mask_threshold_nan", "--mask-threshold must be in (0, 1)"),
    ("out_is_file", "is a file; -o names the output folder"),
    ("out_looks_like_file", "looks like a file name"),
    ("corrupt_second", "corrupt.png"),
    ("missing_second", "does not exist"),
    ("overwrites_input", "would overwrite an input image"),
])
def test_bad_inputs_write_nothing(run_dir, tmp_path, capsys, case, expected):
    good = _photo(tmp_path / "good.png")
    out = tmp_path / "pred"
    images, extra = [str(good)], []
    if case == "threshold_high":
        extra = ["--score-threshold", "2"]
    elif case == "threshold_negative":
        extra = ["--score-threshold", "-0.1"]
    elif case == "mask_threshold_one":
        extra = ["--mask-threshold", "1"]
    elif case == "mask_threshold_nan":
        extra = ["--mask-threshold", "nan"]
    elif case == "out_is_file":
        out = tmp_path / "afile"
        out.write_text("keep me")
    elif case == "out_looks_like_file":
        out = tmp_path / "out.png"
    elif case == "corrupt_second":
        (tmp_path / "corrupt.png").write_bytes(b"not a png")
        images.append(str(tmp_path / "corrupt.png"))
    elif case == "missing_second":
        images.append(str(tmp_path / "nope.png"))
    elif case == "overwrites_input":
        out = tmp_path
        (tmp_path / "good.json").write_text("{}")
        _photo(tmp_path / "x_overlay.png")
        images = [str(tmp_path / "x_overlay.png"), str(tmp_path / "x.png")]
        _photo(tmp_path / "x.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["predict", "box", str(run_dir), *images, "-o", str(out), "--quiet", *extra]) == 2
    assert expected in _error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no staging folder left
    if case == "out_is_file":
        assert out.read_text() == "keep me"


def test_failure_midway_writes_nothing(run_dir, tmp_path, monkeypatch, capsys):
    """A file that passes the cheap up-front check but fails to decode (truncated PNG): the
    first image's outputs are not left behind."""
    good = _photo(tmp_path / "good.png", 64, 64)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:300])
    monkeypatch.setattr(predict_cli, "segment", lambda model, rgb, *a: _two_overlapping(*rgb.shape[:2]))
    out = tmp_path / "pred"
    out.mkdir()
    assert main(["predict", "box", str(run_dir), str(good), str(cut), "-o", str(out), "--quiet"]) == 2
    assert "cut.png" in _error(capsys)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.png", "good.png", "pred"]
