"""DeepLabV3+ semantic model and the high-level-feature options of the sparse losses."""
import pytest
import torch

from apro.losses import apro_sparse_loss, tree_energy_loss
from apro.losses._inputs import masked_l1
from apro.modeling.deeplab import DeepLabV3Plus
from apro.propagation import tree_filter


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return DeepLabV3Plus(21, pretrained=True).eval()


def test_outputs_at_stride_four(lite0):
    x = torch.rand(2, 3, 64, 96)
    out = lite0(x)
    assert out["logits"].shape == (2, 21, 16, 24)
    assert out["features"].shape == (2, lite0.feature_channels, 16, 24)
    pred = lite0.predict(torch.rand(1, 3, 50, 70))
    assert pred.shape == (1, 50, 70) and pred.dtype == torch.int64
    assert lite0.predict(torch.rand(1, 3, 50, 70), size=(100, 140)).shape == (1, 100, 140)
    with pytest.raises(ValueError, match="multiples of 32"):
        lite0(torch.rand(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lite0(torch.rand(3, 64, 64))


def test_pretrained_weights_are_loaded_and_gradients_reach_the_backbone(lite0):
    fresh = DeepLabV3Plus(21, pretrained=False)
    a = dict(lite0.backbone.named_parameters())
    b = dict(fresh.backbone.named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    model = DeepLabV3Plus(21, pretrained=True).train()
    model(torch.rand(2, 3, 64, 64))["logits"].logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_batch_independence_groupnorm(lite0):
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        joint = lite0(x)["logits"]
        single = lite0(x[1:2])["logits"]
    assert torch.allclose(joint[1:2], single, atol=1e-4)


def test_resnet101_option_random_init():
    model = DeepLabV3Plus(21, backbone="resnet101", pretrained=False, channels=32)
    assert model(torch.rand(1, 3, 64, 64))["logits"].shape == (1, 21, 16, 16)
    with pytest.raises(ValueError, match="no bundled ImageNet weights"):
        DeepLabV3Plus(21, backbone="resnet101", pretrained=True)
    with pytest.raises(ValueError, match="num_classes"):
        DeepLabV3Plus(1, pretrained=False)


def _inputs():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 12, 12)
    image = torch.rand(2, 3, 12, 12)
    labels = torch.full((2, 12, 12), 255)
    labels[:, :3, :3] = 1
    return logits, image, labels


def test_tel_high_level_tree_with_constant_features_averages_everything():
    logits, image, labels = _inputs()
    flat = torch.ones(2, 5, 12, 12)  # zero feature distance: the second filter is a plain mean
    got = tree_energy_loss(logits, labels, image, weight=1.0, features=flat)
    p = torch.softmax(logits, 1)
    low = tree_filter(p, image, 0.02)
    target = low.mean((2, 3), keepdim=True).expand_as(p)
    unl = (labels == 255).unsqueeze(1).float()
    assert torch.allclose(got, masked_l1(p, target, unl), atol=1e-5)
    # without features only the image tree is used, and the two differ
    assert not torch.allclose(got, tree_energy_loss(logits, labels, image, weight=1.0), atol=1e-4)
    with pytest.raises(ValueError, match="features"):
        tree_energy_loss(logits, labels, image, features=torch.ones(2, 5, 6, 6))


def test_apro_feature_gp_term():
    logits, image, labels = _inputs()
    base = apro_sparse_loss(logits, labels, image, iterations=2, weight=0.4)
    flat = torch.ones(2, 5, 12, 12)
    with_f = apro_sparse_loss(logits, labels, image, iterations=2, weight=0.4, features=flat, feature_weight=1.0)
    p = torch.softmax(logits, 1)
    unl = (labels == 255).unsqueeze(1).float()
    expected = masked_l1(p, p.mean((2, 3), keepdim=True).expand_as(p), unl)  # GP on flat features = mean
    assert torch.allclose(with_f - base, expected, atol=1e-5)
    # features with two far-apart halves: propagation stays within each half
    halves = torch.zeros(2, 1, 12, 12)
    halves[..., 6:] = 100.0
    from apro.losses.sparse import _apro_sparse_terms

    terms = _apro_sparse_terms(logits, labels, image, "gp", 0.01, None, 0.15, 5, 2, 1.0, 255, None,
                               features=halves, zeta_f=1.0, feature_weight=1.0)
    left = p[..., :6].mean((2, 3), keepdim=True).expand(-1, -1, 12, 6)
    right = p[..., 6:].mean((2, 3), keepdim=True).expand(-1, -1, 12, 6)
    assert torch.allclose(terms["feature"], masked_l1(p, torch.cat([left, right], -1), unl), atol=1e-5)


def test_frozen_backbone_trains_the_decoder_only():
    model = DeepLabV3Plus(21, pretrained=False, freeze_backbone=True).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.rand(2, 3, 64, 64))["logits"].logsumexp(1).mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_frozen_stages_trains_the_last_backbone_stage_and_the_decoder():
    model = DeepLabV3Plus(21, pretrained=False, frozen_stages=3).train()
    assert model.frozen_stages == 3 and not model.freeze_backbone
    stages = model.backbone.stage_modules()
    model(torch.rand(2, 3, 64, 64))["logits"].logsumexp(1).mean().backward()
    for stage in stages[:4]:  # stem and stages 1-3
        assert all(not p.requires_grad and p.grad is None for p in stage.parameters())
    assert all(p.grad is not None for p in stages[4].parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    # 4 is the whole backbone, the same as freeze_backbone=True; 0 trains all of it
    assert DeepLabV3Plus(21, pretrained=False, frozen_stages=4).freeze_backbone
    assert all(p.requires_grad for p in DeepLabV3Plus(21, pretrained=False, frozen_stages=0,
                                                      freeze_backbone=True).backbone.parameters())
    with pytest.raises(ValueError, match="frozen stages"):
        DeepLabV3Plus(21, pretrained=False, frozen_stages=5)


def test_semantic_config_frozen_stages_reaches_the_model():
    from apro.tasks.semantic import SemanticConfig, build_model

    config = SemanticConfig(frozen_stages=3, pretrained=False).validate()
    model = build_model(config, 21)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable >= {"backbone", "aspp", "classifier"}
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if n.startswith("stem"))
    with pytest.raises(ValueError, match="frozen_stages"):
        SemanticConfig(frozen_stages=7).validate()
    with pytest.raises(ValueError, match="frozen_stages"):
        SemanticConfig(frozen_stages=True).validate()


def test_resnet_keeps_its_frozen_stem_unless_frozen_stages_is_given():
    default = DeepLabV3Plus(21, backbone="resnet50", pretrained=False, channels=16)
    assert not any(p.requires_grad for p in default.backbone.layer1.parameters())
    assert all(p.requires_grad for p in default.backbone.layer4.parameters())
    every = DeepLabV3Plus(21, backbone="resnet50", pretrained=False, channels=16, frozen_stages=0)
    assert all(p.requires_grad for p in every.backbone.parameters())
