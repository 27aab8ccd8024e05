import numpy as np
import pytest

from apro import classical


def mask_iou(pred, target):
    return (pred & target).sum() / (pred | target).sum()


def _scene(seed=0):
    """A noisy disc on a differently coloured noisy background, its box and two scribbles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :80]
    obj = (yy - 30) ** 2 + (xx - 42) ** 2 <= 15**2
    img = np.where(obj[..., None], [40, 90, 200], [200, 120, 60]).astype(float)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    labels = np.full(obj.shape, 255, np.uint8)
    labels[30, 35:50] = 1
    labels[3, 5:75] = 0
    labels[60, 5:75] = 0
    return img, obj, (27, 15, 58, 46), labels


def test_grabcut_finds_the_disc():
    img, obj, box, _ = _scene()
    mask = classical.grabcut(img, box)
    assert mask.shape == obj.shape and mask.dtype == bool
    assert mask_iou(mask, obj) > 0.85


def test_random_walker_from_scribbles():
    img, obj, _, labels = _scene(1)
    assert mask_iou(classical.random_walker(img, labels), obj) > 0.85


def test_dense_crf_from_box_and_scribbles():
    pytest.importorskip("pydensecrf.densecrf")
    img, obj, box, labels = _scene(2)
    assert mask_iou(classical.dense_crf_box(img, box), obj) > 0.7
    assert mask_iou(classical.dense_crf_labels(img, labels), obj) > 0.7


def test_bad_inputs_are_refused():
    img, _, _, labels = _scene()
    with pytest.raises(ValueError):
        classical.grabcut(img, (10, 10, 10, 20))
    with pytest.raises(ValueError):
        classical.random_walker(img, labels[:-1])
