"""`apro refine`, `apro demo`, `apro affinity`: outputs written, bad input -> one line, exit 2, no file."""
import json

import numpy as np
import pytest
from PIL import Image

from apro.cli import main

FAST = ["--steps", "3", "--size", "24", "--quiet"]


@pytest.fixture()
def scene(tmp_path):
    """A 40x50 PNG with a bright square object, its box, scribbles and points files."""
    rng = np.random.default_rng(0)
    img = np.full((40, 50, 3), 60, np.uint8) + rng.integers(0, 20, (40, 50, 3), dtype=np.uint8)
    img[10:30, 15:35] = (220, 180, 40)
    image = tmp_path / "image.png"
    Image.fromarray(img).save(image)
    scr = np.zeros((40, 50), np.uint8)
    scr[20, 20:30] = 1
    scr[2, :] = 2
    scribbles = tmp_path / "scribbles.png"
    p = Image.fromarray(scr, mode="P")
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.save(scribbles)
    points = tmp_path / "points.txt"
    points.write_text("# x y label\n25 20 object\n3 3 background\n45 36 0\n")
    return {"dir": tmp_path, "image": str(image), "scribbles": str(scribbles), "points": str(points)}


def _outputs(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith(("mask", "over", ".apro", "fig", "demo")))


def _error(capsys, argv, d):
    before = _outputs(d)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("apro: error: ") and "\n" not in err, err
    assert _outputs(d) == before  # no partial output, no temp file left behind
    return err


def test_refine_box_writes_mask_and_overlay(scene, capsys):
    d = scene["dir"]
    code = main(["refine", scene["image"], "--box", "12", "8", "38", "32", "-o", str(d / "mask.png"),
                 "--overlay", str(d / "overlay.png"), *FAST])
    assert code == 0
    assert "mask.png" in capsys.readouterr().out
    mask = np.array(Image.open(d / "mask.png"))
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}
    assert not mask[:8].any() and not mask[:, 38:].any()  # nothing outside the box
    assert np.array(Image.open(d / "overlay.png")).shape == (40, 50, 3)
    assert _outputs(d) == ["mask.png", "overlay.png"]


@pytest.mark.parametrize("kind", ["scribbles", "points"])
def test_refine_sparse_labels(scene, kind):
    d = scene["dir"]
    assert main(["refine", scene["image"], f"--{kind}", scene[kind], "-o", str(d / "mask.png"), *FAST]) == 0
    assert np.array(Image.open(d / "mask.png")).shape == (40, 50)


def test_points_json_format(scene):
    d = scene["dir"]
    pts = d / "points.json"
    pts.write_text(json.dumps({"points": [[25, 20, "object"], {"x": 2, "y": 2, "label": "bg"}]}))
    assert main(["refine", scene["image"], "--points", str(pts), "-o", str(d / "mask.png"), *FAST]) == 0


def test_error_cases(scene, capsys, tmp_path):
    d, image = scene["dir"], scene["image"]
    out = ["-o", str(d / "mask.png"), "--overlay", str(d / "overlay.png"), *FAST]
    box = ["--box", "12", "8", "38", "32"]
    assert "does not exist" in _error(capsys, ["refine", str(d / "missing.png"), *box, *out], d)
    (d / "notimage.png").write_text("hello")
    assert "cannot read" in _error(capsys, ["refine", str(d / "notimage.png"), *box, *out], d)
    assert "outside" in _error(capsys, ["refine", image, "--box", "100", "100", "120", "130", *out], d)
    assert "empty" in _error(capsys, ["refine", image, "--box", "20", "8", "20", "32", *out], d)
    assert "unknown --method" in _error(capsys, ["refine", image, *box, "--method", "magic", *out], d)
    empty = d / "empty.png"
    Image.fromarray(np.zeros((40, 50), np.uint8), mode="P").save(empty)
    assert "no pixel" in _error(capsys, ["refine", image, "--scribbles", str(empty), *out], d)
    small = d / "small.png"
    Image.fromarray(np.ones((20, 25), np.uint8), mode="P").save(small)
    assert "20" in _error(capsys, ["refine", image, "--scribbles", str(small), *out], d)
    assert "does not exist" in _error(capsys, ["refine", image, "--points", str(d / "nope.txt"), *out], d)
    (d / "nopoints.txt").write_text("# nothing\n")
    assert "no points" in _error(capsys, ["refine", image, "--points", str(d / "nopoints.txt"), *out], d)
    (d / "onlyobj.txt").write_text("3 3 1\n")
    assert "background" in _error(capsys, ["refine", image, "--points", str(d / "onlyobj.txt"), *out], d)
    assert "folder" in _error(capsys, ["refine", image, *box, "-o", str(d / "no" / "mask.png"), *FAST], d)
    assert "method" in _error(capsys, ["refine", image, "--scribbles", scene["scribbles"], "--method", "box", *out], d)


def test_demo_writes_the_overlay(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out), "--steps", "2", "--quiet"]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == (512, 512) and im.mode == "RGB"


def test_affinity_command(scene, capsys):
    d = scene["dir"]
    fig = d / "fig.png"
    assert main(["affinity", scene["image"], "--pixel", "20", "15", "-o", str(fig)]) == 0
    assert Image.open(fig).format == "PNG"
    fig.unlink()
    assert "outside" in _error(capsys, ["affinity", scene["image"], "--pixel", "50", "10", "-o", str(fig)], d)


# ------------------------------------------------------------------ issue 8: help, outputs, reading, overlays
def test_help_states_the_real_defaults(capsys):
    from apro.refine import RefineSettings

    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default {RefineSettings().model})" in out and "default cnn" not in out
    assert "features" in out and "--device" in out


def test_output_must_be_png_and_not_the_input(scene, capsys):
    d, image = scene["dir"], scene["image"]
    box = ["--box", "12", "8", "38", "32", *FAST]
    for name in ("mask.jpg", "mask.txt"):
        assert ".png" in _error(capsys, ["refine", image, *box, "-o", str(d / name)], d)
        assert not (d / name).exists()
    assert ".png" in _error(capsys, ["refine", image, *box, "-o", str(d / "mask.png"), "--overlay", str(d / "over.jpeg")], d)
    before = (d / "image.png").read_bytes()
    assert "input" in _error(capsys, ["refine", image, *box, "-o", image], d)
    assert "input" in _error(capsys, ["refine", image, "--scribbles", scene["scribbles"], *FAST,
                                      "-o", str(d / "mask.png"), "--overlay", scene["scribbles"]], d)
    assert (d / "image.png").read_bytes() == before
    assert "same file" in _error(capsys, ["refine", image, *box, "-o", str(d / "mask.png"),
                                          "--overlay", str(d / "mask.png")], d)


def test_image_is_read_with_exif_orientation_and_16_bit_scaling(scene, tmp_path):
    d = scene["dir"]
    rgb = np.array(Image.open(scene["image"]))
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 50 wide x 40 high, shown rotated by 90 degrees: 40 wide x 50 high
    Image.fromarray(rgb).save(rotated, exif=exif, quality=95)
    assert main(["refine", str(rotated), "--box", "5", "10", "35", "40", "-o", str(d / "mask.png"), *FAST]) == 0
    assert np.array(Image.open(d / "mask.png")).shape == (50, 40)
    deep = tmp_path / "deep.png"
    grey = (rgb.mean(2) * 257).astype(np.uint16)  # 16-bit greyscale, full range
    Image.fromarray(grey).save(deep)
    from apro.cli.refine import load_image

    loaded = load_image(str(deep))
    assert loaded.shape == (40, 50, 3) and loaded.dtype == np.uint8
    assert abs(int(loaded[20, 25, 0]) - int(rgb[20, 25].mean())) <= 1  # scaled, not clipped to white


def test_overlay_lines_scale_with_the_image_and_points_are_visible():
    from apro.cli.refine import draw_overlay, line_width
    from apro.figures import BOX_COLOUR, OBJECT_LABEL_COLOUR

    assert line_width(40, 50) == 2 and line_width(1000, 1500) == 6
    for size in (60, 1200):
        rgb = np.zeros((size, size, 3), np.uint8)
        mask = np.zeros((size, size), bool)
        out = draw_overlay(rgb, mask, box=(size * 0.2, size * 0.2, size * 0.8, size * 0.8),
                           points=[(size // 2, size // 2, 1)])
        lw = line_width(size, size)
        row = np.all(out[:, size // 2] == BOX_COLOUR, axis=1)  # the box's top and bottom edges in one column
        assert int(row.sum()) == 2 * lw
        red = int(np.all(out == OBJECT_LABEL_COLOUR, axis=2).sum())
        assert red >= np.pi * (2 * lw) ** 2  # a disk, not a 1-pixel dot
        assert np.all(out[size // 2, size // 2 + 2 * lw + 2] == 255)  # white ring around it


def test_points_overlay_from_the_command_line(scene):
    from apro.figures import OBJECT_LABEL_COLOUR

    d = scene["dir"]
    assert main(["refine", scene["image"], "--points", scene["points"], "-o", str(d / "mask.png"),
                 "--overlay", str(d / "overlay.png"), *FAST]) == 0
    over = np.array(Image.open(d / "overlay.png"))
    assert np.all(over[20, 25] == OBJECT_LABEL_COLOUR) and np.all(over[20, 27] == OBJECT_LABEL_COLOUR)


def test_device_errors_are_one_line(scene, capsys):
    import torch

    d = scene["dir"]
    box = ["--box", "12", "8", "38", "32", "-o", str(d / "mask.png"), *FAST]
    assert "--device" in _error(capsys, ["refine", scene["image"], *box, "--device", "nonsense"], d)
    if not torch.cuda.is_available():
        assert "CUDA" in _error(capsys, ["refine", scene["image"], *box, "--device", "cuda"], d)
