"""The semantic task on the engine: a tiny run learns, resume is exact, two-process DDP agrees,
bad files are refused, and the train / eval / predict commands work end to end."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apro.cli import main
from apro.engine import load_checkpoint
from apro.evaluation.semantic import ConfusionMatrix
from apro.tasks.semantic import SemanticConfig, build_train_dataset, semantic_losses, train
from two_ranks import identical_rank_states, run_two_ranks

COLOURS = {0: (90, 90, 90), 3: (220, 40, 40), 8: (40, 200, 60), 15: (40, 60, 220)}


def make_blocks(root: Path, n=8, size=(48, 64), seed=0):
    """A voc-sparse layout of coloured rectangles (class = colour) with scribble-like strokes."""
    rng = np.random.default_rng(seed)
    for d in ("images", "gt", "points", "scribbles", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = []
    h, w = size
    for i in range(n):
        name = f"blk_{i}"
        names.append(name)
        cls = [3, 15][i % 2]
        gt = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(4, h // 3), rng.integers(4, w // 3)
        gt[y0:y0 + h // 2, x0:x0 + w // 2] = cls
        rgb = np.zeros((h, w, 3), np.float64)
        for c, col in COLOURS.items():
            rgb[gt == c] = col
        rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"{name}.jpg", quality=95)
        Image.fromarray(gt, mode="L").save(root / "gt" / f"{name}.png")
        scr = np.full((h, w), 255, np.uint8)
        scr[y0 + h // 4, x0 + 2:x0 + w // 2 - 2] = cls
        scr[2, 2:w - 2] = 0
        Image.fromarray(scr, mode="L").save(root / "scribbles" / f"{name}.png")
        pts = np.full((h, w), 255, np.uint8)
        pts[y0 + h // 4, x0 + w // 4] = cls
        pts[2, 2] = 0
        Image.fromarray(pts, mode="L").save(root / "points" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("\n".join(names) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(names[:4]) + "\n")
    return names


class TinySegmenter(nn.Module):
    """Stand-in for DeepLabV3Plus: logits and features at stride 4."""

    def __init__(self, num_classes=21, channels=16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, image):
        f = self.body(image - 0.4)
        return {"logits": self.classifier(f), "features": f}

    @torch.no_grad()
    def predict(self, image, size=None):
        logits = nn.functional.interpolate(self.forward(image)["logits"], size=size or image.shape[-2:],
                                           mode="bilinear", align_corners=False)
        return logits.argmax(1)


def tiny_config(data, out, **kw):
    values = dict(data=str(data), out=str(out), labels="scribbles", loss="apro", crop=32, long_side=48,
                  scale=(0.75, 1.25), batch_size=2, steps=6, optimizer="sgd", lr=0.05, warmup_steps=2, checkpoint_every=3,
                  lp_iterations=3, device="cpu")
    values.update(kw)
    return SemanticConfig(**values).validate()


def _miou(model, data, names):
    from apro.data.voc import VocSegmentation
    from apro.tasks.semantic import predict_image

    ds = VocSegmentation(data, "val", labels="gt")
    acc = ConfusionMatrix(21)
    for i in range(len(ds)):
        item = ds[i]
        acc.update(predict_image(model, item["image"], 48), item["gt"])
    iou = acc.scores()["per_class_iou"]
    present = [v for v in iou.values() if v == v]
    return sum(present) / len(present)


def test_losses_have_the_terms_of_each_method(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 8, 8, requires_grad=True)
    feats = torch.randn(2, 16, 8, 8)
    image = torch.rand(2, 3, 32, 32)
    labels = torch.full((2, 32, 32), 255)
    labels[:, 4:8, 4:8] = 3
    expected = {"pce": {"pce", "loss"}, "treeenergy": {"pce", "treeenergy", "loss"},
                "apro": {"pce", "global", "local", "feature", "loss"}}
    for loss, keys in expected.items():
        cfg = SemanticConfig(loss=loss, lp_iterations=2, feature_weight=0.4)
        terms = semantic_losses(cfg, logits, feats, image, labels)
        assert set(terms) == keys
        if loss == "treeenergy":
            terms_tel = {k: v.detach() for k, v in terms.items()}
        assert torch.allclose(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))
        terms["loss"].backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        logits.grad = None
    no_high = semantic_losses(SemanticConfig(loss="apro", high_level=False, lp_iterations=2), logits, feats, image, labels)
    assert "feature" not in no_high
    zero = semantic_losses(SemanticConfig(loss="apro", global_weight=0, local_weight=0, feature_weight=0,
                                          lp_iterations=2), logits, feats, image, labels)
    assert torch.allclose(zero["loss"], zero["pce"]) and "feature" not in zero
    default = semantic_losses(SemanticConfig(loss="apro", lp_iterations=2), logits, feats, image, labels)
    import apro.losses.sparse as sparse

    for weights, skipped in (((0.2, 0.0), "local_propagation"), ((0.0, 0.2), "two_stage_gp")):
        with monkeypatch.context() as m:
            m.setattr(sparse, skipped, lambda *a, **k: pytest.fail(f"{skipped} ran for a weight of 0"))
            one = semantic_losses(SemanticConfig(loss="apro", global_weight=weights[0], local_weight=weights[1],
                                                 lp_iterations=2), logits, feats, image, labels)
        assert set(one) == {"pce", "global", "local", "loss"}
        kept, dropped = ("global", "local") if weights[0] else ("local", "global")
        assert float(one[dropped]) == 0.0 and torch.allclose(one[kept], default[kept])
        assert torch.allclose(one["loss"], one["pce"] + one[kept])
    assert set(default) == {"pce", "global", "local", "loss"}  # the tuned default runs no feature GP
    tel = semantic_losses(SemanticConfig(loss="treeenergy", feature_weight=0), logits, feats, image, labels)
    assert torch.allclose(tel["treeenergy"], terms_tel["treeenergy"])  # TEL keeps its high-level tree


def test_default_gp_scale_spreads_within_regions_and_not_across():
    """The default GP scales pool a prediction over a mildly textured region (a few grey levels of
    noise) but not across a colour edge; the box heads' 0.01 / 0.07 leave it nearly unchanged."""
    from apro.losses._inputs import normalized_guide
    from apro.losses.box import two_stage_gp
    from apro.tree import minimum_spanning_tree

    gen = torch.Generator().manual_seed(0)
    image = torch.empty(1, 3, 24, 24)
    image[..., :12] = torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    image[..., 12:] = torch.tensor([0.8, 0.6, 0.2]).view(3, 1, 1)
    image = (image + 0.01 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    p = torch.softmax(2 * torch.randn(1, 5, 24, 24, generator=gen), 1)
    p[:, 0, :, 12:] += 1.0  # the right half leans to class 0
    p = p / p.sum(1, keepdim=True)
    guide = normalized_guide(image)
    tree = minimum_spanning_tree(guide)
    cfg = SemanticConfig()
    y = two_stage_gp(p, tree, cfg.zeta_g, cfg.zeta_gh)
    old = two_stage_gp(p, tree, 0.01, 0.07)
    for half in (slice(0, 12), slice(12, 24)):
        spread_p = p[..., half].std((2, 3)).mean()
        assert y[..., half].std((2, 3)).mean() < 0.5 * spread_p
        assert old[..., half].std((2, 3)).mean() > 0.8 * spread_p
    # no leak over the edge: the halves keep their own class-0 share
    assert y[0, 0, :, 12:].mean() - y[0, 0, :, :12].mean() > 0.8 * (p[0, 0, :, 12:].mean() - p[0, 0, :, :12].mean())


def test_tiny_run_learns(tmp_path):
    names = make_blocks(tmp_path / "data")
    torch.manual_seed(0)
    model = TinySegmenter()
    before = _miou(model, tmp_path / "data", names)
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", steps=60, checkpoint_every=60, lr=0.1)
    result = train(cfg, model=model, progress=False)
    after = _miou(result.model, tmp_path / "data", names)
    first = np.mean([r["pce"] for r in result.history[:5]])
    last = np.mean([r["pce"] for r in result.history[-5:]])
    assert last < 0.5 * first
    assert after > 0.5 and after > before + 0.3, (before, after)


def test_resume_continues_exactly(tmp_path):
    make_blocks(tmp_path / "data")
    cfg = tiny_config(tmp_path / "data", tmp_path / "full")
    torch.manual_seed(0)
    full = train(cfg, model=TinySegmenter(), progress=False)
    cfg2 = tiny_config(tmp_path / "data", tmp_path / "part")
    torch.manual_seed(0)
    train(cfg2, model=TinySegmenter(), progress=False, stop_after=3)
    torch.manual_seed(123)  # resume must not depend on the global RNG state
    resumed = train(cfg2, model=TinySegmenter(), progress=False, resume=tmp_path / "part")
    assert [r["step"] for r in resumed.history] == list(range(1, 7))
    assert resumed.history == full.history
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(tmp_path / "part")["task"] == "semantic"


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_semantic_task import TinySegmenter, tiny_config
from apro.tasks.semantic import train
torch.manual_seed(0)
cfg = tiny_config({data!r}, {out!r}, steps=4, checkpoint_every=2)
result = train(cfg, model=TinySegmenter(), progress=False)
torch.save({{"state": result.model.state_dict(), "history": result.history}},
           {out!r} + "/rank" + os.environ["RANK"] + ".pt")
"""


def test_two_process_ddp_agrees(tmp_path):
    make_blocks(tmp_path / "data")
    proc, out = run_two_ranks(tmp_path, DDP_SCRIPT, data=str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = identical_rank_states(out)
    assert r0["history"] == r1["history"] and len(r0["history"]) == 4
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    for name, value in ckpt["model"].items():
        assert torch.equal(value, r0["state"][name])


def test_cli_train_eval_predict_and_bad_files(tmp_path, capsys):
    names = make_blocks(tmp_path / "data", n=4)
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    common = ["--data", data, "--crop", "64", "--long-side", "64", "--batch-size", "2", "--quiet", "--device", "cpu"]
    rc = main(["train", "semantic", *common, "--labels", "points", "--loss", "treeenergy", "--steps", "2",
               "--out", run])
    assert rc == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (Path(run) / "log.csv").read_text().splitlines()[0].split(",")[-3:] == ["treeenergy", "loss", "grad_norm"]
    rc = main(["eval", "semantic", run, "--data", data, "--split", "val", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and "mIoU" in printed and "aeroplane" in printed
    scores = json.loads((Path(run) / "eval_val.json").read_text())
    assert 0 <= scores["miou"] <= 1 and len(scores["per_class_iou"]) == 21 and scores["images"] == 4
    assert (Path(run) / "confusion_val.png").stat().st_size > 1000
    image = str(tmp_path / "data" / "images" / f"{names[0]}.jpg")
    assert main(["predict", "semantic", run, image, "--out", str(tmp_path / "pred"), "--quiet"]) == 0
    pred = Image.open(tmp_path / "pred" / f"{names[0]}.png")
    assert pred.mode == "P" and pred.size == (64, 48)
    assert (tmp_path / "pred" / f"{names[0]}_overlay.jpg").exists()
    capsys.readouterr()
    # resume with a larger budget continues the run; a changed loss is refused
    assert main(["train", "semantic", "--resume", run, "--steps", "3", "--quiet"]) == 0
    assert main(["train", "semantic", "--resume", run, "--steps", "4", "--loss", "pce", "--quiet"]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err
    # bad files: a label of the wrong size, a split naming a missing image, pseudo labels missing
    Image.fromarray(np.full((5, 5), 255, np.uint8), mode="L").save(tmp_path / "data" / "points" / f"{names[1]}.png")
    rc = main(["train", "semantic", *common, "--labels", "points", "--loss", "pce", "--steps", "2",
               "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{names[1]}.png is 5x5 but its image is 64x48" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()  # a run failing before its first step leaves nothing behind
    (tmp_path / "data" / "splits" / "train.txt").write_text("blk_0\nghost\n")
    rc = main(["train", "semantic", *common, "--steps", "2", "--out", str(tmp_path / "bad2")])
    assert rc == 2 and "ghost.jpg is missing" in capsys.readouterr().err
    (tmp_path / "data" / "splits" / "train.txt").write_text("\n".join(names) + "\n")
    rc = main(["train", "semantic", *common, "--pseudo-labels", str(tmp_path / "nope"), "--steps", "2",
               "--out", str(tmp_path / "bad3")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["eval", "semantic", str(tmp_path / "nothing"), "--data", data])
    assert rc == 2


def test_pseudo_labels_train_on_dense_maps(tmp_path):
    names = make_blocks(tmp_path / "data", n=4)
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for n in names:
        gt = np.array(Image.open(tmp_path / "data" / "gt" / f"{n}.png"))
        Image.fromarray(gt, mode="L").save(pseudo / f"{n}.png")
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", pseudo_labels=str(pseudo), loss="pce")
    ds = build_train_dataset(cfg)
    torch.manual_seed(0)
    item = ds[0]
    assert float((item["label"] != 255).float().mean()) > 0.5  # dense, unlike the scribbles
    bad = pseudo / f"{names[2]}.png"
    Image.fromarray(np.full((48, 64), 40, np.uint8), mode="L").save(bad)
    from apro.data.voc import VocDataError

    with pytest.raises(VocDataError, match="unknown class index 40"):
        ds[2]


def test_cli_frozen_stages_trains_only_the_last_stage(tmp_path):
    make_blocks(tmp_path / "data", n=4)
    run = tmp_path / "run"
    rc = main(["train", "semantic", "--data", str(tmp_path / "data"), "--crop", "64", "--long-side", "64",
               "--batch-size", "2", "--quiet", "--device", "cpu", "--loss", "pce", "--steps", "2",
               "--frozen-stages", "3", "--lr", "0.01", "--out", str(run)])
    assert rc == 0
    ckpt = load_checkpoint(run)
    assert ckpt["config"]["frozen_stages"] == 3
    from apro.tasks.semantic import SemanticConfig, build_model

    start = build_model(SemanticConfig(frozen_stages=3), 21).state_dict()
    trained = ckpt["model"]
    weights = [k for k in trained if k.startswith("backbone.") and k.endswith(".weight") and "bn" not in k]
    last_stage = [k for k in weights if any(k.startswith(f"backbone.blocks.{i}.") for i in range(11, 16))]
    early = [k for k in weights if k not in last_stage]
    assert last_stage and early
    assert all(torch.equal(trained[k], start[k]) for k in early)
    assert any(not torch.equal(trained[k], start[k]) for k in last_stage)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("semantic_*.json")),
                         ids=lambda p: p.stem)
def test_shipped_semantic_configs_load_and_validate(path):
    from apro.tasks.semantic import SemanticConfig

    config = SemanticConfig.from_json(path).validate()
    raw = json.loads(path.read_text())
    assert not any(isinstance(v, str) and (v.startswith("/") or ":\\" in v) for v in raw.values())
    if path.stem == "semantic_stage4":
        assert config.frozen_stages == 3 and config.lr_multipliers == {"backbone.": 0.1}


@pytest.mark.parametrize("loss", ["apro", "treeenergy"])
def test_pairwise_terms_leave_out_the_crop_padding(loss):
    """A crop whose right half is padding scores its pairwise terms as its left half alone; with
    ``ignore_padding`` false the padding counts as unlabeled image again (the earlier behaviour)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 21, 8, 8, generator=g, dtype=torch.float64)
    feats = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    image = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.full((2, 32, 32), 255)
    labels[:, 4:8, 4:8] = 3
    valid = torch.zeros(2, 32, 32, dtype=torch.bool)
    valid[..., :16] = True
    image[..., 16:] = 0.0
    cfg = SemanticConfig(loss=loss, lp_iterations=3, feature_weight=0.4)
    cut = semantic_losses(cfg, logits, feats, image, labels, valid)
    half = semantic_losses(cfg, logits[..., :4], feats[..., :4], image[..., :16], labels[..., :16])
    pairwise = [k for k in cut if k not in ("pce", "loss")]
    assert pairwise and all(torch.allclose(cut[k], half[k], rtol=1e-9, atol=1e-12) for k in pairwise)
    kept = semantic_losses(dataclasses.replace(cfg, ignore_padding=False), logits, feats, image, labels, valid)
    unmarked = semantic_losses(cfg, logits, feats, image, labels)
    assert all(torch.equal(kept[k], unmarked[k]) for k in kept)
    assert any(abs(float(kept[k]) - float(cut[k])) > 1e-4 for k in pairwise)
    with pytest.raises(ValueError, match="ignore_padding must be true or false"):
        SemanticConfig(ignore_padding="yes").validate()


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_semantic_task_takes_the_larger_efficientnet_lites(name):
    from apro.tasks.semantic import build_model

    config = SemanticConfig(backbone=name, pretrained=False)
    config.validate()
    torch.manual_seed(0)
    model = build_model(config, 21).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 64, 64))["logits"]
    assert logits.shape[:2] == (1, 21) and torch.isfinite(logits).all()
    # frozen backbone by default: only the decoder trains
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="backbone"):
        SemanticConfig(backbone="efficientnet_lite9").validate()
