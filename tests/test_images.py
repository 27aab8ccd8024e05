"""apro.data.images.read_rgb: EXIF orientation, 16-bit inputs, modes, unreadable files."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from apro.data.images import UnreadableImageError, read_rgb


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit-per-sample PNG written by hand (Pillow cannot write 48/64-bit PNGs)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _ramp16(h=6, w=9):
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    grey = _ramp16()
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    rgb = read_rgb(path)
    assert rgb.shape == (6, 9, 3) and rgb.dtype == np.uint8
    expected = np.round(grey / 65535 * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected)
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255
    # the naive read clips to white: what this module exists to avoid
    naive = np.asarray(Image.open(path).convert("RGB"))
    assert (naive == 255).mean() > 0.9 and (rgb == 255).mean() < 0.1


def test_16bit_big_endian_and_hand_written_png(tmp_path):
    grey = _ramp16(4, 5)
    path = tmp_path / "grey16b.png"
    path.write_bytes(_png16(grey, 0))
    rgb = read_rgb(path)
    assert np.array_equal(rgb[..., 1], np.round(grey / 65535 * 255).astype(np.uint8))
    img = Image.frombytes("I;16B", (5, 4), grey.astype(">u2").tobytes())
    tiff = tmp_path / "grey16b.tif"
    img.save(tiff)
    assert np.array_equal(read_rgb(tiff)[..., 0], np.round(grey / 65535 * 255).astype(np.uint8))


def test_mode_I_within_16_bit_range_is_scaled_and_outside_is_refused(tmp_path):
    grey = _ramp16(3, 4).astype(np.int32)
    path = tmp_path / "int32.tif"
    Image.fromarray(grey, mode="I").save(path)
    assert read_rgb(path)[..., 0].max() == 255
    Image.fromarray(grey * 4, mode="I").save(path)
    with pytest.raises(UnreadableImageError, match="int32.tif.*32-bit"):
        read_rgb(path)


def test_48bit_rgb_and_64bit_rgba_png(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    path = tmp_path / "rgb48.png"
    path.write_bytes(_png16(rgb16, 2))
    got = read_rgb(path)
    assert got.shape == (5, 7, 3) and got.dtype == np.uint8
    # 8-bit value within 1 of the exact scaling (Pillow keeps the high byte)
    assert np.abs(got.astype(int) - rgb16.astype(float) * 255 / 65535).max() <= 1.0
    rgba16 = rng.integers(0, 65536, (5, 7, 4)).astype(np.uint16)
    path = tmp_path / "rgba64.png"
    path.write_bytes(_png16(rgba16, 6))
    got = read_rgb(path)
    assert got.shape == (5, 7, 3)
    assert np.abs(got.astype(int) - rgba16[..., :3].astype(float) * 255 / 65535).max() <= 1.0


def test_exif_orientation_is_applied(tmp_path):
    # stored 60 wide x 40 high, left half red; orientation 6 = "rotate 90 degrees clockwise to view"
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    img.save(path, quality=95, exif=exif)
    shown = read_rgb(path)
    assert shown.shape == (60, 40, 3)  # what a viewer shows: 40 wide, 60 high
    # rotated clockwise: the stored left (red) half is now the top half
    top, bottom = shown[:25].reshape(-1, 3).mean(0), shown[35:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    raw = read_rgb(path, exif_orientation=False)
    assert raw.shape == (40, 60, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_other_modes_give_rgb(tmp_path, mode):
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (8, 10, 3)).astype(np.uint8))
    img = base.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    got = read_rgb(path)
    assert got.shape == (8, 10, 3) and got.dtype == np.uint8
    if mode in ("L", "LA", "1"):
        assert np.array_equal(got[..., 0], got[..., 1])
    if mode == "L":
        assert np.array_equal(got[..., 0], np.asarray(img))
    if mode == "RGBA":
        assert np.array_equal(got, np.asarray(base))  # alpha dropped, colours kept
    if mode == "P":
        assert np.array_equal(got, np.asarray(img.convert("RGB")))


def test_rgba_with_transparent_pixels_keeps_stored_colours(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 1] = 200
    arr[:2, :, 3] = 0
    arr[2:, :, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    got = read_rgb(path)
    assert np.all(got[..., 1] == 200) and np.all(got[..., 0] == 0)


def test_missing_corrupt_truncated_and_folder_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_rgb(tmp_path / "nope.png")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(UnreadableImageError, match="notes.png"):
        read_rgb(bad)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UnreadableImageError, match="cut.png"):
        read_rgb(cut)
    with pytest.raises(UnreadableImageError, match="is a folder"):
        read_rgb(tmp_path)
    assert isinstance(UnreadableImageError("x"), OSError)


def test_float_image_in_unit_range_is_scaled_and_outside_refused(tmp_path):
    values = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "f.tif"
    Image.fromarray(values, mode="F").save(path)
    got = read_rgb(path)
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255
    Image.fromarray(values * 300, mode="F").save(path)
    with pytest.raises(UnreadableImageError, match="f.tif.*floating-point"):
        read_rgb(path)


def _rotated_jpeg(path, w=60, h=40):
    img = Image.fromarray(np.full((h, w, 3), 128, np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif)


def _coco(tmp_path, width, height, name="phone.jpg"):
    import json

    ann = {
        "images": [{"id": 1, "file_name": name, "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return path


def test_coco_reader_uses_read_rgb_and_the_json_size_picks_the_orientation(tmp_path):
    from apro.data import CocoBoxDataset

    _rotated_jpeg(tmp_path / "phone.jpg")
    # annotated as a viewer shows it (40 wide, 60 high): the EXIF orientation is applied
    ds = CocoBoxDataset(tmp_path, _coco(tmp_path, 40, 60), train=False, short_sides=(40,))
    assert ds.load_image(0).size == (40, 60)
    # annotated on the stored grid (60 wide, 40 high): read unrotated to match its boxes
    ds = CocoBoxDataset(tmp_path, _coco(tmp_path, 60, 40), train=False, short_sides=(40,))
    assert ds.load_image(0).size == (60, 40)
    # a 16-bit file is scaled, not clipped to white
    Image.fromarray(_ramp16(40, 60)).save(tmp_path / "grey16.png")
    ds = CocoBoxDataset(tmp_path, _coco(tmp_path, 60, 40, "grey16.png"), train=False, short_sides=(40,))
    pixels = np.asarray(ds.load_image(0))
    assert pixels.min() == 0 and pixels.max() == 255 and (pixels == 255).mean() < 0.1
    (tmp_path / "grey16.png").write_text("broken")
    with pytest.raises(OSError, match="grey16.png.*image id 1"):
        ds.load_image(0)


def test_result_is_writable_and_contiguous(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(path)
    Image.fromarray(_ramp16(4, 5)).save(tmp_path / "g.png")
    for p in (path, tmp_path / "g.png"):
        rgb = read_rgb(p)
        assert rgb.flags.writeable and rgb.flags.c_contiguous
