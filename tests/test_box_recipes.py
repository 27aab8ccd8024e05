"""The shipped box recipes (configs/*.json) and what they add to the box task: recipe loading
against a data root, evaluation at the trained scale, a frozen and cached backbone trained
through the engine (synthetic data only; no file of ../shared/data is read)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apro.cli import main
from apro.data import CocoBoxDataset, make_synthetic_coco
from apro.engine import list_checkpoints, load_checkpoint
from apro.tasks.box import BoxConfig, build_model, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ("pennfudan", "coco_person", "coco_mini20", "coco_person_lite2", "coco_person_lp3",
           "coco_person_stage4", "coco_person_stage4_lp3", "coco_person_stage4_s4",
           "coco_person_stage4_up4", "coco_person_stage4_s4_tuned",
           "coco_person_stage4_s4_lp3", "coco_person_stage4_s4_lp3_jitter",
           "coco_person_stage4_s4_lp3_levels", "coco_person_stage4_s4_lp3_levels_warm")
VARIANT_SUFFIXES = ("_warm", "_levels", "_jitter", "_tuned", "_lite2", "_lp3", "_s4", "_up4", "_stage4")  # experiment configs: a recipe with one change, on its set
TINY = dict(fpn_channels=16, head_channels=16, mask_channels=8, mask_branch_channels=16,
            grid_sizes=[8, 4], scale_ranges=[[1, 32], [24, 4096]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("coco"), 8, size=(64, 64), num_classes=2, seed=3)


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_loads_validates_and_names_no_machine_path(name, tmp_path):
    path = CONFIGS / f"{name}.json"
    raw = json.loads(path.read_text())
    for key in ("data", "ann", "eval_ann"):
        assert raw[key] and not Path(raw[key]).is_absolute(), key
        base = name
        for suffix in VARIANT_SUFFIXES:
            base = base.removesuffix(suffix)
        assert raw[key].startswith(f"{base}/"), key
    assert "/work/" not in path.read_text()
    config = BoxConfig.from_json(path, data_root=str(tmp_path)).validate()
    assert config.data == str(tmp_path / raw["data"]) and config.eval_ann == str(tmp_path / raw["eval_ann"])
    assert config.budget_minutes and config.budget_minutes > 0 and config.description
    assert config.test_short_side <= max(config.short_sides)
    assert config.model_options["frozen_stages"] in range(5)
    # the model options are ones the model takes (random weights: nothing is loaded)
    model = build_model(BoxConfig.from_dict(dict(config.to_dict(), pretrained=False)), 3)
    assert model.mask_stride == config.model_options["mask_stride"]
    assert model.loss_stride == config.model_options.get("loss_stride", model.mask_stride)
    levels = config.model_options.get("level_loss_strides")
    assert model.level_loss_strides == (tuple(levels) if levels else None)
    assert len(model.grid_sizes) == len(config.model_options["scale_ranges"])
    assert config.backbone == raw.get("backbone", "efficientnet_lite0")


def test_recipe_paths_follow_the_data_root(tmp_path, monkeypatch):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"data": "set/images", "ann": "/abs/train.json", "steps": 3}))
    monkeypatch.setenv("APRO_DATA", str(tmp_path / "root"))
    config = BoxConfig.from_json(recipe)
    assert config.data == str(tmp_path / "root" / "set" / "images")
    assert config.ann == "/abs/train.json"  # absolute paths are kept
    assert BoxConfig.from_json(recipe, data_root="elsewhere").data == str(Path("elsewhere") / "set" / "images")
    recipe.write_text(json.dumps({"budget_minutes": 0}))
    with pytest.raises(ValueError, match="budget_minutes"):
        BoxConfig.from_json(recipe).validate()
    recipe.write_text(json.dumps({"budget_minute": 5}))
    with pytest.raises(ValueError, match="unknown option"):
        BoxConfig.from_json(recipe)


def test_test_short_side_defaults_to_the_training_scale():
    assert BoxConfig(short_sides=(288, 320)).test_short_side == 320
    assert BoxConfig(short_sides=(288, 320), test_short_side=256).test_short_side == 256
    assert BoxConfig().test_short_side == 800  # the default training sizes end at 800


def test_evaluation_scale_follows_the_config(synthetic, tmp_path, monkeypatch, capsys):
    """`apro eval box` on a run trained at short side 48 resizes the evaluation images to 48."""
    out = tmp_path / "run"
    args = ["train", "box", "--data", synthetic.image_dir, "--ann", synthetic.train_ann, "--out", str(out),
            "--steps", "1", "--batch-size", "2", "--short-sides", "48", "--max-size", "64", "--no-pretrained",
            "--warmup-steps", "1", "--quiet", "--mask-loss", "projection"]
    for key, value in TINY.items():
        args += ["--model-option", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    assert load_checkpoint(out)["config"]["test_short_side"] == 48
    seen = []
    init = CocoBoxDataset.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        if not self.train:
            seen.append(tuple(self.short_sides))

    monkeypatch.setattr(CocoBoxDataset, "__init__", spy)
    capsys.readouterr()
    assert main(["eval", "box", str(out), "--data", synthetic.image_dir, "--ann", synthetic.eval_ann, "--quiet"]) == 0
    assert seen and set(seen) == {(48,)}

    # the test thresholds are overridden for this evaluation only, and bad ones are refused
    from apro.modeling import SOLOv2

    used = []
    forward = SOLOv2.forward

    def spy_forward(self, *a, **k):
        used.append((self.mask_threshold, self.score_threshold))
        return forward(self, *a, **k)

    monkeypatch.setattr(SOLOv2, "forward", spy_forward)
    scores = tmp_path / "scores.json"
    assert main(["eval", "box", str(out), "--data", synthetic.image_dir, "--ann", synthetic.eval_ann, "--quiet",
                 "--mask-threshold", "0.35", "--score-threshold", "0.2", "--json", str(scores)]) == 0
    assert used and set(used) == {(0.35, 0.2)}
    written = json.loads(scores.read_text())
    assert (written["mask_threshold"], written["score_threshold"]) == (0.35, 0.2)
    assert "mask threshold 0.35" in capsys.readouterr().out
    for bad in ("1.5", "0", "nan"):
        assert main(["eval", "box", str(out), "--data", synthetic.image_dir, "--ann", synthetic.eval_ann,
                     "--quiet", "--mask-threshold", bad]) == 2
        assert "--mask-threshold must be in (0, 1)" in capsys.readouterr().err


def test_frozen_cached_backbone_trains_only_the_heads(synthetic, tmp_path):
    """Through the engine, a recipe with the whole backbone frozen and cached leaves every
    backbone tensor untouched, moves the FPN and heads, and resumes exactly."""
    config = BoxConfig(data=synthetic.image_dir, ann=synthetic.train_ann, out=str(tmp_path / "run"), steps=4,
                       batch_size=2, optimizer="adamw", lr=1e-3, warmup_steps=1, short_sides=(64,), max_size=64,
                       pretrained=False, mask_loss="apro", checkpoint_every=2, amp=False,
                       model_options=dict(TINY, frozen_stages=4, cache_backbone=True))
    torch.manual_seed(config.seed)
    dataset = CocoBoxDataset(config.data, config.ann, short_sides=config.short_sides, max_size=64)
    model = build_model(config, dataset.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(config, model=model, progress=False)
    end = result.model.state_dict()
    backbone = [k for k in end if k.startswith("backbone.")]
    heads = [k for k in end if k.startswith(("fpn.", "head.", "mask_features.")) and end[k].is_floating_point()]
    assert backbone and heads
    assert all(torch.equal(start[k], end[k]) for k in backbone)
    assert sum(not torch.equal(start[k], end[k]) for k in heads) > len(heads) // 2
    assert not any(p.requires_grad for p in result.model.backbone.parameters())
    assert len(result.model._feature_cache) > 0  # features were cached and reused
    # resuming from step 2 (empty cache) reproduces the uninterrupted loss curve
    resumed = train(BoxConfig.from_dict(dict(config.to_dict(), out=str(tmp_path / "again"))),
                    resume=list_checkpoints(tmp_path / "run")[0], progress=False)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in result.history]


def test_feature_cache_folder_serves_a_later_run(tmp_path, synthetic):
    """``cache_dir`` (what benchmarks/box_instance.py gives every run of an ablation): the second
    run computes no backbone features, writes no new files and trains exactly as the first."""
    options = dict(TINY, frozen_stages=4, cache_backbone=True, cache_dir=str(tmp_path / "features"))
    config = BoxConfig(data=synthetic.image_dir, ann=synthetic.train_ann, out=str(tmp_path / "a"), steps=3,
                       batch_size=2, optimizer="adamw", lr=1e-3, warmup_steps=1, short_sides=(64,), max_size=64,
                       pretrained=False, mask_loss="apro", checkpoint_every=3, amp=False, model_options=options)
    torch.manual_seed(config.seed)
    first = train(config, model=build_model(config, 3), progress=False)
    files = sorted((tmp_path / "features").rglob("*.pt"))
    assert files
    stamps = [f.stat().st_mtime_ns for f in files]
    second_config = BoxConfig.from_dict(dict(config.to_dict(), out=str(tmp_path / "b")))
    torch.manual_seed(second_config.seed)
    model = build_model(second_config, 3)
    model.backbone.forward = None  # any backbone forward would fail: every feature comes from disk
    second = train(second_config, model=model, progress=False)
    assert [r["loss"] for r in second.history] == [r["loss"] for r in first.history]
    assert sorted((tmp_path / "features").rglob("*.pt")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
