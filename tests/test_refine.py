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


# ------------------------------------------------------------------ features head (default)
def test_default_is_the_features_head_and_previous_default_still_runs():
    assert RefineSettings().model == "features"
    image, obj, box = _scene(4)
    old = RefineSettings(model="logits", steps=60, size=48, lr=0.1, margin=0.25, margin_pixels=0, final_lp=0)
    prob = refine_box(image, box, "apro", old)
    assert prob.shape == obj.shape and mask_iou(prob >= 0.5, obj) > mask_iou(box_mask(box, *obj.shape) > 0, obj)


def test_features_head_beats_free_logits_on_background_coloured_box_corners():
    """Box corners share the background's colour; the features head (known background outside
    the box, one classifier for the whole crop) removes them where free logits keep more."""
    image, obj, box = _scene(5)
    filled = box_mask(box, *obj.shape) > 0
    feat = refine_box(image, box, "apro", FAST) >= 0.5
    assert mask_iou(feat, obj) > 0.85
    corners = filled & ~obj
    assert int((feat & corners).sum()) < 0.2 * int(corners.sum())


def test_image_features_are_standardised_on_the_requested_grid():
    from apro.frozen_features import image_features

    image, _, _ = _scene()
    f = image_features(image[None], (12, 16), feature_size=64)
    assert f.shape == (1, 24 + 40 + 112, 12, 16) and f.dtype == torch.float32
    assert torch.allclose(f.mean((2, 3)), torch.zeros(1, f.shape[1]), atol=1e-4)
    assert bool(torch.isfinite(f).all())
    assert image_features(image[None], (12, 16), 64, levels=(1,)).shape[1] == 40
    with pytest.raises(ValueError, match="image"):
        image_features(image, (12, 16))
    with pytest.raises(ValueError, match="levels"):
        image_features(image[None], (12, 16), 64, levels=(5,))
    with pytest.raises(ValueError, match="feature_size"):
        image_features(image[None], (12, 16), 8)


def test_quadratic_coordinates_and_zero_initialised_head():
    from apro.frozen_features import LinearHead, quadratic_coordinates

    q = quadratic_coordinates((5, 7), torch.zeros(1, dtype=torch.float64))
    assert q.shape == (1, 5, 5, 7) and q.dtype == torch.float64
    assert torch.equal(q[0, 2], q[0, 0] ** 2) and torch.equal(q[0, 4], q[0, 0] * q[0, 1])
    assert float(q[0, 0].min()) == -1 and float(q[0, 1].max()) == 1
    head = LinearHead(6, 2)
    assert torch.equal(head(torch.randn(1, 6, 3, 4)), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError):
        LinearHead(0, 2)


def test_full_resolution_lp_moves_a_blurred_edge_onto_the_image_edge():
    from apro.refine import _full_resolution

    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 1.0  # a sharp vertical edge at x = 16
    coarse = torch.zeros(1, 1, 4, 4)
    coarse[..., 2:] = 1.0
    plain = _full_resolution(coarse, image, RefineSettings(final_lp=0))
    sharp = _full_resolution(coarse, image, RefineSettings(final_lp=10))
    assert plain.shape == sharp.shape == (1, 1, 32, 32)
    target = (torch.arange(32) >= 16).float().expand(32, 32)
    # LP mixes values only within each side of the edge, never across it
    assert float((sharp[0, 0] - target).abs().mean()) < 0.9 * float((plain[0, 0] - target).abs().mean())
    assert float(sharp[0, 0, :, :14].max()) < float(plain[0, 0, :, :14].max())


def test_parts_without_an_object_label_are_dropped():
    from apro.refine import _keep_labelled_parts

    prob = torch.zeros(10, 10)
    prob[1:4, 1:4] = 0.9   # holds the object label
    prob[6:9, 6:9] = 0.8   # a separate part without one
    labels = torch.full((10, 10), 255, dtype=torch.int64)
    labels[2, 2] = 1
    labels[0, 9] = 0
    out = _keep_labelled_parts(prob, labels)
    assert torch.equal(out[1:4, 1:4], prob[1:4, 1:4]) and float(out[6:9, 6:9].abs().max()) == 0
    image, obj, box = _scene(2)
    scr = _scribbles(obj, box)
    on = refine_sparse(image, scr, "apro", FAST)
    off = refine_sparse(image, scr, "apro", RefineSettings(steps=80, size=48, connected=False))
    assert bool(((on >= 0.5) <= (off >= 0.5)).all())  # dropping parts only removes pixels


def test_new_settings_are_checked():
    for bad, match in ((dict(lr=-1.0), "lr"), (dict(final_lp=-1), "final_lp"), (dict(device="nonsense"), "device"),
                       (dict(feature_size=4), "feature_size"), (dict(coordinates=-1.0), "coordinates"),
                       (dict(zeta_g=0.0), "zeta_g"), (dict(model="nope"), "model"), (dict(balance=-0.5), "balance"),
                       (dict(balance=2.0), "balance")):
        with pytest.raises(ValueError, match=match):
            RefineSettings(**bad).checked()
    assert RefineSettings().learning_rate == 0.05 and RefineSettings(model="logits").learning_rate == 0.1


def test_balanced_partial_cross_entropy_averages_the_class_means():
    from apro.losses import partial_cross_entropy

    def balanced_partial_cross_entropy(logits, labels, balance):
        return partial_cross_entropy(logits, labels, balance=balance)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 8, 8, generator=g, requires_grad=True)
    labels = torch.full((1, 8, 8), 255, dtype=torch.int64)
    labels[0, 3, 3:6] = 1        # 3 object pixels
    labels[0, 0, :] = 0          # 20 background pixels
    labels[0, -1, :] = 0
    labels[0, 1:5, 0] = 0
    ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    per_class = 0.5 * (ce[labels == 1].mean() + ce[labels == 0].mean())
    assert torch.allclose(balanced_partial_cross_entropy(logits, labels, 1.0), per_class)
    assert torch.allclose(balanced_partial_cross_entropy(logits, labels, 0.0), partial_cross_entropy(logits, labels))
    half = balanced_partial_cross_entropy(logits, labels, 0.5)
    assert min(per_class, ce[labels != 255].mean()) - 1e-6 <= half <= max(per_class, ce[labels != 255].mean()) + 1e-6
    balanced_partial_cross_entropy(logits, labels, 1.0).backward()
    assert float(logits.grad[:, :, labels[0] == 255].abs().max()) == 0  # unlabeled pixels get no gradient
    none = torch.full((1, 8, 8), 255, dtype=torch.int64)
    assert float(balanced_partial_cross_entropy(logits, none, 1.0).detach()) == 0


def test_a_lone_object_click_against_long_background_strokes_still_finds_the_object():
    image, obj, box = _scene(2)
    h, w = obj.shape
    labels = torch.full((h, w), 255, dtype=torch.int64)
    labels[h // 2, w // 2] = 1
    labels[1:3, :] = 0
    labels[-3:-1, :] = 0
    labels[:, 1:3] = 0
    labels[:, -3:-1] = 0
    for balance in (0.0, 1.0):  # 1 object pixel vs ~600 background ones, with and without balancing
        prob = refine_sparse(image, labels, "apro", RefineSettings(steps=40, size=48, balance=balance))
        assert mask_iou(prob >= 0.5, obj) > 0.8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_refine_on_cuda_matches_the_cpu_result_closely():
    image, obj, box = _scene()
    s = RefineSettings(steps=40, size=48, device="cuda")
    prob = refine_box(image, box, "apro", s)
    assert prob.device.type == "cpu" and mask_iou(prob >= 0.5, obj) > 0.8
    labels = _scribbles(obj, box)
    assert mask_iou(refine_sparse(image, labels, "apro", s) >= 0.5, obj) > 0.7


def test_cuda_without_a_device_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    image, obj, box = _scene()
    with pytest.raises(ValueError, match="CUDA"):
        refine_box(image, box, "apro", RefineSettings(steps=2, size=24, device="cuda"))
