"""apro.refine: per-image masks from a box or sparse labels on images the tests draw."""
import pytest
import torch

from apro.refine import (
    BoxRefiner,
    RefineSettings,
    SparseRefiner,
    _downsample_labels,
    box_mask,
    check_box,
    mask_iou,
    refine_box,
    refine_sparse,
)

FAST = RefineSettings(steps=80, size=48)


def _scene(seed=0, h=48, w=64):
    """Textured background of two colours, a textured ellipse object; returns image, object mask, box."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    image = torch.empty(3, h, w)
    left = xx < w * 0.55
    image[:, left] = torch.tensor([0.15, 0.45, 0.2])[:, None]
    image[:, ~left] = torch.tensor([0.35, 0.3, 0.6])[:, None]
    obj = ((yy - h * 0.5) / (h * 0.3)) ** 2 + ((xx - w * 0.5) / (w * 0.22)) ** 2 <= 1
    image[:, obj] = torch.tensor([0.85, 0.6, 0.2])[:, None]
    image = (image + 0.03 * torch.randn(3, h, w, generator=g)).clamp(0, 1)
    ys, xs = torch.nonzero(obj, as_tuple=True)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return image, obj, box


def _scribbles(obj, box):
    h, w = obj.shape
    labels = torch.full((h, w), 255, dtype=torch.int64)
    cy, cx = h // 2, w // 2
    labels[cy, cx - 4 : cx + 5] = 1
    labels[2, :] = 0
    labels[:, 2] = 0
    labels[h - 3, :] = 0
    assert not obj[labels == 0].any() and obj[labels == 1].all()
    return labels


def test_apro_box_refinement_beats_the_filled_box():
    image, obj, box = _scene()
    filled = box_mask(box, *obj.shape) > 0
    prob = refine_box(image, box, "apro", FAST)
    iou, box_iou = mask_iou(prob >= 0.5, obj), mask_iou(filled, obj)
    assert box_iou < 0.85
    assert iou > 0.85 and iou > box_iou + 0.1


def test_box_result_is_zero_outside_the_box_and_a_probability():
    image, obj, box = _scene(1)
    prob = refine_box(image, box, "gp", RefineSettings(steps=10, size=32))
    assert prob.shape == obj.shape and prob.dtype == torch.float32
    assert float(prob.min()) >= 0 and float(prob.max()) <= 1
    assert float(prob[box_mask(box, *obj.shape) == 0].abs().max()) == 0


def test_box_method_returns_the_filled_box_without_fitting():
    image, obj, box = _scene()
    assert torch.equal(refine_box(image, box, "box"), box_mask(box, *obj.shape))


def test_sparse_refinement_from_scribbles():
    image, obj, box = _scene(2)
    labels = _scribbles(obj, box)
    prob = refine_sparse(image, labels, "apro", FAST)
    assert prob.shape == obj.shape
    assert mask_iou(prob >= 0.5, obj) > 0.8


def test_cnn_predictor_runs_and_returns_probabilities():
    """The CNN option (not the default: slower, see the README) is wired through both tasks."""
    image, obj, box = _scene(3)
    s = RefineSettings(steps=3, size=24, model="cnn", lr=0.01)
    prob = refine_box(image, box, "apro", s)
    assert prob.shape == obj.shape and 0 <= float(prob.min()) and float(prob.max()) <= 1
    assert torch.equal(prob, refine_box(image, box, "apro", s))
    assert refine_sparse(image, _scribbles(obj, box), "lp", s).shape == obj.shape


def test_refinement_is_deterministic_for_a_seed():
    image, _, box = _scene()
    s = RefineSettings(steps=5, size=24, seed=3)
    assert torch.equal(refine_box(image, box, "apro", s), refine_box(image, box, "apro", s))


def test_modules_wrap_the_functions():
    image, obj, box = _scene()
    s = RefineSettings(steps=5, size=24)
    assert torch.equal(BoxRefiner("lp", s)(image, box), refine_box(image, box, "lp", s))
    labels = _scribbles(obj, box)
    assert torch.equal(SparseRefiner("pce", s)(image, labels), refine_sparse(image, labels, "pce", s))


def test_bad_inputs_raise_clear_errors():
    image, obj, box = _scene()
    with pytest.raises(ValueError, match="unknown box method"):
        refine_box(image, box, "nope")
    with pytest.raises(ValueError, match="outside"):
        refine_box(image, (500, 500, 600, 600), "apro")
    with pytest.raises(ValueError, match="empty"):
        refine_box(image, (10, 10, 10, 20), "apro")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        refine_box(image * 255, box, "apro")
    with pytest.raises(ValueError, match="background"):
        refine_sparse(image, torch.full(obj.shape, 1, dtype=torch.int64), "apro")
    with pytest.raises(ValueError, match="shape"):
        refine_sparse(image, torch.zeros(3, 3, dtype=torch.int64), "apro")
    with pytest.raises(ValueError, match="steps"):
        refine_box(image, box, "apro", RefineSettings(steps=0))


def test_check_box_clips_to_the_image():
    assert check_box((-5, -5, 10, 12), 20, 30) == (0.0, 0.0, 10.0, 12.0)


def test_downsampling_keeps_one_pixel_scribbles():
    labels = torch.full((40, 40), 255, dtype=torch.int64)
    labels[10, 3:30] = 1
    labels[33, 5] = 0
    small = _downsample_labels(labels, (10, 10))
    assert (small == 1).sum() >= 6 and (small == 0).sum() == 1
    labels[10, 5] = 0  # a cell holding both classes becomes unlabeled
    assert _downsample_labels(labels, (10, 10))[2, 1] == 255


def test_mask_iou_ignores_invalid_pixels():
    a = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(a, b, valid=torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)) == 1.0
