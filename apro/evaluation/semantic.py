"""Semantic segmentation scores: one confusion matrix over a split, mIoU as VOC's devkit computes it.

The PASCAL VOC devkit (``VOCevalseg.m``) accumulates one ``K x K`` confusion matrix over every
pixel of every image of the split (rows: ground truth, columns: prediction), skipping pixels
whose ground truth is void (255), then scores class ``c`` by
``IoU_c = conf[c, c] / (sum_j conf[c, j] + sum_i conf[i, c] - conf[c, c])`` and reports the mean
over the ``K`` classes. It does not average per-image IoUs. A class absent from both the ground
truth and the predictions of the whole split has no defined IoU; the devkit's mean would turn
NaN, so here such a class is reported as NaN and left out of the mean (it never happens on a
VOC split, where every class occurs).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch

VOID = 255


def _as_long(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor or numpy array, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {x.dtype}")
    return x.to(torch.long)


def confusion_matrix(
    prediction, target, num_classes: int = 21, ignore_index: int = VOID
) -> torch.Tensor:
    """Pixel confusion matrix of one image or a batch.

    Args:
        prediction: integer class map ``(..., H, W)`` with values in ``[0, num_classes)``.
        target: ground truth of the same shape, values in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: ``K`` (21 for VOC: background + 20 classes).
        ignore_index: void label of ``target``; those pixels are not counted.

    Returns:
        ``(K, K)`` int64 tensor on the CPU, ``conf[g, p]`` = number of pixels with ground truth
        ``g`` predicted as ``p``.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    prediction = _as_long(prediction, "prediction")
    target = _as_long(target, "target")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
    prediction = prediction.reshape(-1).cpu()
    target = target.reshape(-1).cpu()
    keep = target != ignore_index
    prediction, target = prediction[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target[(target < 0) | (target >= num_classes)][0])
        raise ValueError(f"target holds class index {bad}, outside [0, {num_classes}) and not {ignore_index}")
    if prediction.numel() and (int(prediction.min()) < 0 or int(prediction.max()) >= num_classes):
        bad = int(prediction[(prediction < 0) | (prediction >= num_classes)][0])
        raise ValueError(f"prediction holds class index {bad}, outside [0, {num_classes})")
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``conf[c,c] / (row_c + col_c - conf[c,c])``; NaN where the union is empty.

    Args:
        conf: ``(K, K)`` confusion matrix (rows ground truth, columns prediction).

    Returns:
        ``(K,)`` float64 tensor.
    """
    conf = _check_conf(conf)
    tp = conf.diagonal()
    union = conf.sum(1) + conf.sum(0) - tp
    iou = tp / union.clamp_min(1)
    return torch.where(union > 0, iou, torch.full_like(iou, math.nan))


def mean_iou(conf: torch.Tensor) -> float:
    """Mean of :func:`iou_from_confusion` over the classes with a defined IoU (NaN if none)."""
    iou = iou_from_confusion(conf)
    valid = ~torch.isnan(iou)
    return float(iou[valid].mean()) if bool(valid.any()) else math.nan


def _check_conf(conf) -> torch.Tensor:
    if isinstance(conf, np.ndarray):
        conf = torch.from_numpy(conf)
    if not torch.is_tensor(conf) or conf.dim() != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be a square (K, K) matrix, got {getattr(conf, 'shape', type(conf))}")
    if bool((conf < 0).any()):
        raise ValueError("conf must not hold negative counts")
    return conf.to(torch.float64)


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over a split; :meth:`scores` gives mIoU and per-class IoU.

    ``update(prediction, target)`` for each image (or batch), then ``scores(class_names)``.
    ``merge(other)`` adds another accumulator (e.g. from another process).
    """

    def __init__(self, num_classes: int = 21, ignore_index: int = VOID):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.images = 0

    def update(self, prediction, target) -> None:
        """Add one image ``(H, W)`` or a batch ``(B, H, W)``."""
        self.matrix += confusion_matrix(prediction, target, self.num_classes, self.ignore_index)
        self.images += 1 if _as_long(target, "target").dim() <= 2 else int(target.shape[0])

    def merge(self, other: "ConfusionMatrix") -> None:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix
        self.images += other.images

    def scores(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """``{"miou", "pixel_accuracy", "per_class_iou": {name: iou}, "images", "confusion"}``.

        IoUs are fractions in [0, 1] (NaN, written as None in JSON, for a class with an empty union).
        """
        return semantic_scores(self.matrix, class_names, images=self.images)


def semantic_scores(conf: torch.Tensor, class_names: Optional[Sequence[str]] = None, images: Optional[int] = None):
    """Scores of a confusion matrix: see :meth:`ConfusionMatrix.scores`."""
    conf_f = _check_conf(conf)
    k = conf_f.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names for {k} classes")
    iou = iou_from_confusion(conf_f)
    total = float(conf_f.sum())
    return {
        "miou": mean_iou(conf_f),
        "pixel_accuracy": float(conf_f.diagonal().sum()) / total if total else math.nan,
        "per_class_iou": {n: float(v) for n, v in zip(names, iou.tolist())},
        "images": images,
        "confusion": torch.as_tensor(conf).to(torch.long).tolist(),
    }


def format_iou_table(scores: Dict[str, object]) -> str:
    """A plain-text table: one ``class  IoU%`` line per class, then mIoU."""
    per = scores["per_class_iou"]
    width = max([len(n) for n in per] + [5])
    lines = [f"{'class':<{width}}  IoU (%)"]
    for name, value in per.items():
        lines.append(f"{name:<{width}}  " + ("    n/a" if value != value else f"{100 * value:7.2f}"))
    lines.append(f"{'mIoU':<{width}}  {100 * scores['miou']:7.2f}")
    return "\n".join(lines)


def write_scores_json(scores: Dict[str, object], path: str, **extra) -> None:
    """Write ``scores`` (plus ``extra`` keys) as JSON; NaN becomes null."""
    def clean(v):
        if isinstance(v, float) and v != v:
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    data = clean(dict(scores, **extra))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def save_confusion_png(conf: torch.Tensor, path: str, class_names: Optional[Sequence[str]] = None,
                       title: Optional[str] = None) -> None:
    """Row-normalised confusion matrix (each ground-truth class sums to 1) as a PNG heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf_f = _check_conf(conf).numpy()
    k = conf_f.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    rows = conf_f.sum(1, keepdims=True)
    norm = np.divide(conf_f, rows, out=np.zeros_like(conf_f), where=rows > 0)
    size = max(4.0, 0.35 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
