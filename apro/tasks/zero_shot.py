"""Annotation-free semantic segmentation (paper Sec. 4.3, MaskCLIP+ with APro pseudo labels).

A frozen dense *unary* (MaskCLIP on a CLIP checkpoint, or the classifier-guided stand-in of
:mod:`apro.modeling.classifier_unary`) predicts class probabilities on a coarse grid; APro
refines them into soft pseudo labels along the image's affinities; the labels are written as
PNGs that ``apro train semantic --pseudo-labels DIR`` trains a target network on. No human
label is used anywhere.

Refinement (``refine="apro"``) at a working resolution (the image's long side resized to
``working_size``), the unary bilinearly upsampled to it:

1. GP, two-stage as released (SPEC §2): one minimum spanning tree of the ImageNet-normalised
   image; ``Y1 = GP(phi; edge weights from the image, zeta_gl)``, then
   ``Y2 = GP(Y1; edge weights ||Y1_k - Y1_l||^2, zeta_gh)`` (paper Eqs. 3-4);
2. LP (Eqs. 5-6): ``lp_iterations`` steps on the ``lp_kernel`` window with ``lp_zeta``,
   fed with ``Y2`` (the GP-then-LP cascade; a pseudo label is one target, not two losses).

The soft label is upsampled to the image size; its argmax is the pseudo label, with 255
(ignored by the trainer) where its top probability is below ``ignore_below``.

PNG contract (read by the semantic task): ``OUT/NAME.png``, single-channel ``'L'``, the image's
size, class index ``0..20``, 255 = ignore. ``save_soft`` also writes ``OUT/NAME.npz``
(``probs``: ``(K, h, w)`` float16 at the working resolution).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._atomic import atomic_path
from .._color import imagenet_normalize
from ..propagation import global_propagation, local_propagation
from ..tree import minimum_spanning_tree

REFINE_CHOICES = ("apro", "none")
IGNORE_INDEX = 255


@dataclass
class PseudoLabelSettings:
    """Settings of :func:`pseudo_label` (defaults: see ``docs/zero_shot.md`` for how they were chosen).

    Attributes:
        refine: ``"apro"`` (GP two-stage then LP) or ``"none"`` (the unary alone, MaskCLIP+'s recipe).
        input_size: long side the image is resized to before the unary (``None``: as is).
        working_size: long side of the grid GP and LP run on.
        zeta_gl, zeta_gh: GP's two stages (image edge weights, then the first result's);
            ``zeta_gh=None`` runs the first stage only, ``zeta_gl=None`` skips GP (LP alone).
        lp_kernel, lp_zeta, lp_iterations: LP window, bandwidth, steps (0 skips LP).
        ignore_below: pixels whose top soft probability is below this get label 255.
    """

    refine: str = "apro"
    input_size: Optional[int] = 512
    working_size: int = 160
    zeta_gl: Optional[float] = 0.05
    zeta_gh: Optional[float] = None
    lp_kernel: int = 5
    lp_zeta: float = 0.15
    lp_iterations: int = 20
    ignore_below: float = 0.0

    def __post_init__(self):
        if self.refine not in REFINE_CHOICES:
            raise ValueError(f"refine must be one of {REFINE_CHOICES}, got {self.refine!r}")
        if self.input_size is not None and self.input_size < 32:
            raise ValueError(f"input_size must be >= 32 or None, got {self.input_size}")
        if self.working_size < 8:
            raise ValueError(f"working_size must be >= 8, got {self.working_size}")
        for name in ("zeta_gl", "zeta_gh", "lp_zeta"):
            if getattr(self, name) is None and name != "lp_zeta":
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.ignore_below <= 1.0:
            raise ValueError(f"ignore_below must be in [0, 1], got {self.ignore_below}")


def _long_side(h: int, w: int, size: Optional[int], multiple: int = 1) -> tuple:
    if size is None:
        return h, w
    s = size / max(h, w)
    return (max(multiple, int(round(h * s / multiple)) * multiple),
            max(multiple, int(round(w * s / multiple)) * multiple))


def _resize(x: torch.Tensor, hw: tuple) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(1, 3, H, W)`` float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


@torch.no_grad()
def dense_unary(unary: Callable, image: torch.Tensor, input_size: Optional[int] = 512) -> torch.Tensor:
    """The unary's ``(1, K, h, w)`` probabilities on its own grid for ``image`` ``(1, 3, H, W)`` in [0, 1]."""
    h, w = image.shape[-2:]
    probs = unary(_resize(image, _long_side(h, w, input_size, 32)))
    if probs.dim() != 4 or probs.shape[0] != 1:
        raise ValueError(f"the unary must return (1, K, h, w) probabilities, got {tuple(probs.shape)}")
    return probs.float()


@torch.no_grad()
def apro_refine(probs: torch.Tensor, image: torch.Tensor, settings: PseudoLabelSettings) -> torch.Tensor:
    """APro soft pseudo label ``(1, K, h, w)`` at the working resolution (module docstring, steps 1-2).

    ``probs``: ``(1, K, h0, w0)`` unary probabilities (any grid); ``image``: ``(1, 3, H, W)`` in [0, 1].
    """
    hw = _long_side(*image.shape[-2:], settings.working_size)
    guide = imagenet_normalize(_resize(image, hw)).contiguous()
    phi = _resize(probs, hw).clamp_min(0).contiguous()
    y = phi
    if settings.zeta_gl is not None:
        tree = minimum_spanning_tree(guide)
        y = global_propagation(phi, tree, settings.zeta_gl)
        if settings.zeta_gh is not None:
            y = global_propagation(y, tree, settings.zeta_gh, embedding=y.contiguous())
    if settings.lp_iterations > 0:
        y = local_propagation(y.contiguous(), guide, settings.lp_kernel, settings.lp_zeta, settings.lp_iterations)
    return y / y.sum(1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def pseudo_label(unary: Callable, image: torch.Tensor, settings: PseudoLabelSettings,
                 probs: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Soft and hard pseudo label of one image.

    Args:
        unary: maps ``(1, 3, h, w)`` RGB in [0, 1] to ``(1, K, h', w')`` probabilities.
        image: ``(1, 3, H, W)`` RGB in [0, 1].
        settings: see :class:`PseudoLabelSettings`.
        probs: the unary's output when already computed (then ``unary`` is not called).

    Returns:
        ``{"soft": (1, K, h, w) at the working resolution (or the unary grid for "none"),
        "label": (H, W) uint8 with 255 below ``ignore_below``}``.
    """
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    if probs is None:
        probs = dense_unary(unary, image, settings.input_size)
    soft = apro_refine(probs, image, settings) if settings.refine == "apro" else probs
    full = _resize(soft, tuple(image.shape[-2:]))[0]
    conf, label = full.max(0)
    label = label.to(torch.uint8)
    if settings.ignore_below > 0:
        label[conf < settings.ignore_below] = IGNORE_INDEX
    return {"soft": soft, "label": label}


def write_label_png(path, label: torch.Tensor) -> None:
    """``(H, W)`` uint8 class map as a single-channel ``'L'`` PNG (atomic write)."""
    arr = label.cpu().numpy().astype(np.uint8)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr, mode="L").save(tmp, format="PNG")


def write_soft(path, soft: torch.Tensor) -> None:
    """``(1, K, h, w)`` soft label as ``NAME.npz`` with ``probs`` float16 ``(K, h, w)``."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probs=soft[0].cpu().numpy().astype(np.float16))


def split_files(data: str, split: str):
    """``(names, image paths, gt paths or None)`` of a voc-sparse (or VOC 2012) split."""
    from ..data.voc import voc_files

    files = voc_files(data, split, labels=None)
    return list(files.names), list(files.images), list(files.gts)


def pseudo_label_split(unary: Callable, data: str, out: str, settings: PseudoLabelSettings,
                       split: str = "train", names: Optional[Sequence[str]] = None,
                       save_soft: bool = False, progress: bool = True) -> Dict[str, object]:
    """Write ``OUT/NAME.png`` for every image of ``split`` (see the module docstring).

    Returns ``{"images": n, "out": out}``; also writes ``OUT/pseudo_labels.json`` with the settings.
    Images whose PNG already exists are skipped (resumable).
    """
    from ..data.voc import read_image

    all_names, images, _ = split_files(data, split)
    chosen = set(names) if names is not None else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(n, p) for n, p in zip(all_names, images) if chosen is None or n in chosen]
    iterator = todo
    if progress:
        from tqdm import tqdm
        iterator = tqdm(todo, desc=f"pseudo labels ({settings.refine})", unit="img")
    done = 0
    for name, path in iterator:
        target = out_dir / f"{name}.png"
        if target.exists() and (not save_soft or (out_dir / f"{name}.npz").exists()):
            done += 1
            continue
        image = image_tensor(read_image(path))
        result = pseudo_label(unary, image, settings)
        write_label_png(target, result["label"])
        if save_soft:
            write_soft(out_dir / f"{name}.npz", result["soft"])
        done += 1
    meta = {"split": split, "images": done, "settings": asdict(settings)}
    with atomic_path(out_dir / "pseudo_labels.json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    return {"images": done, "out": os.fspath(out_dir)}


def score_labels(label_dir: str, data: str, split: str, num_classes: int = 21) -> Dict[str, object]:
    """Scores (:meth:`~apro.evaluation.semantic.ConfusionMatrix.scores`) of ``label_dir/NAME.png``
    against the split's dense ground truth. Ground-truth void is skipped; a pseudo-label pixel
    marked 255 counts as an error (as a wrong class), so ignoring never raises the score."""
    from ..data.voc import read_label
    from ..evaluation.semantic import ConfusionMatrix

    names, _, gts = split_files(data, split)
    conf = ConfusionMatrix(num_classes)
    for name, gt_path in zip(names, gts):
        if gt_path is None:
            raise ValueError(f"{data}: split {split!r} has no ground truth to score against")
        gt = read_label(gt_path)
        pred = np.asarray(Image.open(Path(label_dir) / f"{name}.png"))
        pred = pred.astype(np.int64)
        valid = gt != IGNORE_INDEX
        wrong = pred == IGNORE_INDEX
        # An ignored pseudo-label pixel is scored as a miss: predict a class other than the truth.
        pred[wrong] = (gt[wrong].astype(np.int64) + 1) % num_classes
        pred[~valid] = 0
        conf.update(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)))
    return conf.scores()
