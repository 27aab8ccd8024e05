"""Point / scribble supervised semantic segmentation losses (SPEC §4, paper Sec. 4.2).

Conventions: ``logits`` ``(B, K, H, W)`` over K classes, ``labels`` ``(B, H, W)`` int64 with
``ignore_index`` (255) on unlabeled pixels, ``image`` ``(B, 3, H, W)`` RGB in [0, 1].
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_count, check_kernel_size
from ..propagation import global_propagation, local_propagation
from ..tree import SpanningTree
from ._inputs import (
    check_sparse_inputs,
    check_valid,
    check_variant,
    check_weight,
    cut_padding,
    instance_trees,
    masked_l1,
    normalized_guide,
    positive,
    unlabeled_mask,
    work_dtype,
)
from .box import VARIANTS, two_stage_gp


def partial_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, balance: float = 0.0
) -> torch.Tensor:
    """Cross-entropy averaged over labeled pixels only (the ground-truth term ``L_g``).

    ``balance`` in [0, 1] weighs a class-c pixel by ``n_c ** -balance`` (``n_c``: labeled
    pixels of class c in the batch), normalised by the total weight: 0 is the plain mean,
    1 averages the per-class means (a few object clicks weigh as much as long background
    strokes; used by ``apro refine``).

    Args:
        logits: ``(B, K, H, W)``; labels: ``(B, H, W)`` int64, ``ignore_index`` where unlabeled.

    Returns:
        Scalar tensor; 0 (still backpropagating) when no pixel is labeled.
    """
    check_sparse_inputs(logits, labels, None, ignore_index)
    if not 0 <= float(balance) <= 1:
        raise ValueError(f"balance must be in [0, 1], got {balance!r}")
    labels = labels.to(device=logits.device, dtype=torch.long)
    per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if balance == 0:
        count = (labels != ignore_index).sum().clamp_min(1)
        return per_pixel.sum() / count
    k = logits.shape[1]
    onehot = F.one_hot(torch.where(labels == ignore_index, k, labels), k + 1)[..., :k].to(per_pixel.dtype)
    counts = onehot.flatten(0, -2).sum(0)
    weight = (onehot * counts.clamp_min(1).pow(-float(balance))).sum(-1)
    return (per_pixel * weight).sum() / weight.sum().clamp_min(torch.finfo(per_pixel.dtype).tiny)


def _apro_sparse_terms(
    logits, labels, image, variant, zeta_g, zeta_gh, zeta_s, kernel_size, iterations, weight, ignore_index, tree,
    features=None, zeta_f=1.0, feature_weight=None, valid=None,
) -> Dict[str, torch.Tensor]:
    check_sparse_inputs(logits, labels, image, ignore_index)
    valid = check_valid(valid, labels)
    check_variant(variant, VARIANTS)
    zeta_g = positive(zeta_g, "zeta_g")
    positive(zeta_s, "zeta_s")
    check_kernel_size(kernel_size)
    check_count(iterations, "iterations")
    if zeta_gh is not None:
        zeta_gh = positive(zeta_gh, "zeta_gh")
    weight = check_weight(weight, "weight")
    guide = cut_padding(normalized_guide(image, work_dtype(logits)), valid)
    p = torch.softmax(logits, 1)
    phi = p.detach().to(guide.dtype)
    unlabeled = unlabeled_mask(labels, ignore_index, valid, p, guide.dtype)
    if variant != "lp":
        tree = instance_trees(guide, tree, "the ImageNet-normalised image")

    def gp(v):
        return two_stage_gp(v, tree, zeta_g, zeta_gh, valid)

    def lp(v):
        return local_propagation(v, guide, kernel_size, zeta_s, iterations)

    extra = {}
    if features is not None:
        # GP on the network's high-level features (paper §3.2.1), from the same detached phi
        from .tree_filter import _check_features

        fw = weight if feature_weight is None else check_weight(feature_weight, "feature_weight")
        fy = global_propagation(phi, cut_padding(_check_features(features, logits), valid), positive(zeta_f, "zeta_f"))
        extra["feature"] = fw * masked_l1(p, fy, unlabeled)
    if variant == "gp-lp-p":
        return {"global": weight * masked_l1(p, gp(phi), unlabeled), "local": weight * masked_l1(p, lp(phi), unlabeled),
                **extra}
    if variant == "gp":
        return {"global": weight * masked_l1(p, gp(phi), unlabeled), **extra}
    if variant == "lp":
        return {"local": weight * masked_l1(p, lp(phi), unlabeled), **extra}
    target = lp(gp(phi)) if variant == "gp-lp-c" else gp(lp(phi))
    return {"cascade": 2.0 * weight * masked_l1(p, target, unlabeled), **extra}


def apro_sparse_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    image: torch.Tensor,
    *,
    variant: str = "gp-lp-p",
    zeta_g: float = 0.01,
    zeta_gh: Optional[float] = 0.07,
    zeta_s: float = 0.15,
    kernel_size: int = 5,
    iterations: int = 20,
    weight: float = 0.4,
    ignore_index: int = 255,
    tree: Optional[SpanningTree] = None,
    features: Optional[torch.Tensor] = None,
    zeta_f: float = 1.0,
    feature_weight: Optional[float] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """APro's unlabeled-pixel term for points / scribbles (paper Eq. 1-6; SPEC §4).

    With ``p = softmax(logits)`` and pseudo labels from the detached ``p``, each term is
    ``sum_{i unlabeled} sum_k |p_ik - y_ik| / #unlabeled``. ``GP`` is the same two-stage global
    propagation as for boxes (``zeta_g`` on the ImageNet-normalised image's tree, then
    ``zeta_gh`` with weights from the first result; ``zeta_gh=None`` runs one stage only); the
    paper gives no separate GP settings for this task. ``LP`` runs unmasked. Variants as in
    :func:`apro_box_loss`: ``"gp-lp-p"`` = ``weight * (L1(GP) + L1(LP))``, the cascades use one
    label weighted ``2 * weight``, ``"gp"`` / ``"lp"`` one term weighted ``weight`` (0.4, TEL's
    weight on VOC). Partial cross-entropy is separate (``SPARSE_LOSSES`` adds it).

    Args:
        logits: ``(B, K, H, W)``; labels: ``(B, H, W)`` int64; image: ``(B, 3, H, W)`` RGB in [0, 1].
        tree: optional ``B`` trees of the ImageNet-normalised image; built when None.
        features: optional ``(B, D, H, W)`` high-level features of the network: adds the term
            ``"feature"``, ``feature_weight * L1(p, GP_f(phi))`` over unlabeled pixels, GP on the
            features' own tree with ``zeta_f`` (paper §3.2.1: "we empirically employ high-level
            feature as input"); ``feature_weight=None`` uses ``weight``.
        valid: optional bool ``(B, H, W)``, False on pixels that are not the image's (the
            padding of a crop larger than the scaled image). They are left out of every term and
            are no neighbours of image pixels (their guide is set far away; a given ``tree``
            must then be built from that guide, so pass ``tree=None``). TEL's released code
            pads its label maps with a value apart from the unlabeled 255 (docs/semantic.md).

    Returns:
        Scalar tensor (0 when every pixel is labeled).
    """
    terms = _apro_sparse_terms(
        logits, labels, image, variant, zeta_g, zeta_gh, zeta_s, kernel_size, iterations, weight, ignore_index, tree,
        features, zeta_f, feature_weight, valid,
    )
    return sum(terms.values())


class PartialCrossEntropy(nn.Module):
    """Module form of :func:`partial_cross_entropy`: ``forward(logits, labels)``."""

    def __init__(self, ignore_index: int = 255, balance: float = 0.0):
        super().__init__()
        self.ignore_index, self.balance = ignore_index, balance

    def forward(self, logits, labels):
        return partial_cross_entropy(logits, labels, self.ignore_index, self.balance)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, balance={self.balance}"


class APRoSparseLoss(nn.Module):
    """Module form of :func:`apro_sparse_loss`: ``forward(logits, labels, image, tree=None, valid=None)``."""

    def __init__(self, variant="gp-lp-p", zeta_g=0.01, zeta_gh=0.07, zeta_s=0.15, kernel_size=5, iterations=20,
                 weight=0.4, ignore_index=255):
        super().__init__()
        self.variant = check_variant(variant, VARIANTS)
        self.zeta_g, self.zeta_gh, self.zeta_s = zeta_g, zeta_gh, zeta_s
        self.kernel_size, self.iterations = kernel_size, iterations
        self.weight, self.ignore_index = weight, ignore_index

    def forward(self, logits, labels, image, tree=None, valid=None):
        return apro_sparse_loss(
            logits, labels, image, variant=self.variant, zeta_g=self.zeta_g, zeta_gh=self.zeta_gh,
            zeta_s=self.zeta_s, kernel_size=self.kernel_size, iterations=self.iterations, weight=self.weight,
            ignore_index=self.ignore_index, tree=tree, valid=valid,
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, weight={self.weight}, ignore_index={self.ignore_index}"
