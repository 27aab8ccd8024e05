"""Tree-filter losses: LTF/TEL's tree filter as the pairwise term (SPEC §5, paper Tables 2 and 5).

The tree filter averages the prediction over the minimum spanning tree with weights
``exp(-sum of edge weights on the path / sigma)`` (:func:`apro.tree_filter`, exact two-pass
O(N)). As in TEL, the tree and its weights come from the raw RGB image in [0, 1]
(``sigma = 0.02``), not the ImageNet-normalised one.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..propagation import local_propagation, tree_filter
from ..tree import SpanningTree
from ._inputs import (
    box_l1,
    check_box_inputs,
    check_normalization,
    check_sparse_inputs,
    check_valid,
    check_weight,
    cut_padding,
    instance_trees,
    kept_trees,
    masked_l1,
    nonempty_instances,
    normalized_guide,
    positive,
    raw_guide,
    unlabeled_mask,
    work_dtype,
    zero_loss,
)

_RAW_DESC = "the raw RGB image in [0, 1]"


def _tree_filter_box_terms(logits, box_mask, image, sigma, tree, weight, local_weight, zeta_s, kernel_size, iterations,
                           normalization="instance"):
    check_box_inputs(logits, box_mask, image)
    check_normalization(normalization)
    sigma = positive(sigma, "sigma")
    weight = check_weight(weight, "weight")
    keep = nonempty_instances(box_mask)
    if not bool(keep.any()):
        z = zero_loss(logits)
        return {"treefilter": z} if local_weight is None else {"treefilter": z, "local": z}
    dtype = work_dtype(logits)
    tree = kept_trees(raw_guide(image, dtype), tree, keep, _RAW_DESC)
    if not bool(keep.all()):
        logits, box_mask, image = logits[keep], box_mask[keep], image[keep]
    p = torch.sigmoid(logits)
    b = box_mask.to(dtype)
    phi = p.detach().to(dtype)
    terms = {"treefilter": weight * box_l1(p, tree_filter(phi, tree, sigma), b, normalization)}
    if local_weight is not None:
        lw = check_weight(local_weight, "local_weight")
        guide = normalized_guide(image, dtype)
        lp = local_propagation(phi, guide, kernel_size, zeta_s, iterations, mask=b)
        terms["local"] = lw * box_l1(p, lp, b, normalization)
    return terms


def tree_filter_box_loss(
    logits: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    sigma: float = 0.02,
    tree: Optional[SpanningTree] = None,
    *,
    weight: float = 2.0,
) -> torch.Tensor:
    """Tree filter as the pairwise term of box supervision (paper Table 5, "TreeFilter").

    ``weight * sum(|TF(p) - p| B) / sum(B)`` per instance, averaged over instances, with
    ``p = sigmoid(logits)`` detached inside the filter, ``TF`` the exact tree filter on the raw RGB image's minimum spanning tree. It
    takes GP's place in APro, so it gets GP's weight 2.0 by default.

    Args:
        logits: ``(N, 1, H, W)``; box_mask: ``(N, 1, H, W)``; image: ``(N, 3, H, W)`` RGB in [0, 1].
        sigma: tree filter bandwidth (TEL: 0.02 on RGB in [0, 1]).
        tree: optional ``N`` trees built from the raw RGB image
            (``apro.minimum_spanning_tree(tree_guide("treefilter", image))``); built when None.
        weight: multiplies the term.

    Returns:
        Scalar tensor.
    """
    return sum(_tree_filter_box_terms(logits, box_mask, image, sigma, tree, weight, None, 0.15, 5, 20).values())


def tree_filter_local_box_loss(
    logits: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    sigma: float = 0.02,
    tree: Optional[SpanningTree] = None,
    *,
    weight: float = 2.0,
    local_weight: float = 1.0,
    zeta_s: float = 0.15,
    kernel_size: int = 5,
    iterations: int = 20,
) -> torch.Tensor:
    """"TreeFilter + Local Pairwise" of paper Table 5.

    The paper's Table 5 combines the tree filter with "our local pairwise term", i.e. APro's
    local affinity propagation: this is :func:`apro_box_loss` (``"gp-lp-p"``) with GP replaced
    by the tree filter, ``weight * L1(TF(p)) + local_weight * L1(LP(p))``, both masked by the
    box, LP on the ImageNet-normalised image multiplied by the box mask before the first and
    after every step.

    Returns:
        Scalar tensor.
    """
    terms = _tree_filter_box_terms(
        logits, box_mask, image, sigma, tree, weight, local_weight, zeta_s, kernel_size, iterations
    )
    return sum(terms.values())


def tree_energy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    image: torch.Tensor,
    sigma: float = 0.02,
    weight: float = 0.4,
    ignore_index: int = 255,
    tree: Optional[SpanningTree] = None,
    features: Optional[torch.Tensor] = None,
    sigma_high: float = 1.0,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Tree energy loss (TEL, CVPR 2022) for points / scribbles: its unlabeled-pixel term.

    ``weight * sum_{i unlabeled} sum_k |p_ik - TF(p)_ik| / #unlabeled`` with
    ``p = softmax(logits)`` and ``TF`` the tree filter of the detached ``p`` on the raw RGB
    image's spanning tree. With ``features`` (TEL's second, high-level tree) the filtered map is
    filtered again on the minimum spanning tree of the detached features, with edge affinity
    ``exp(-||f_k - f_l||^2 / sigma_high)`` (TEL applies no bandwidth there: ``sigma_high=1``);
    without them only the image (low-level) filter is applied. Partial cross-entropy on labeled pixels is separate
    (:func:`partial_cross_entropy`; ``SPARSE_LOSSES["treeenergy"]`` adds both).

    Args:
        logits: ``(B, K, H, W)``; labels: ``(B, H, W)`` int64, ``ignore_index`` where unlabeled;
        image: ``(B, 3, H, W)`` RGB in [0, 1].
        features: optional ``(B, D, H, W)`` high-level features of the network (detached here).
        valid: optional bool ``(B, H, W)``, False on padding: left out of the loss and cut
            from both trees (TEL's released collate pads its label maps with a value apart
            from the unlabeled 255; its trees do span the padding; see
            :func:`apro.losses.apro_sparse_loss`).

    Returns:
        Scalar tensor (0 when no pixel is unlabeled).
    """
    return sum(_tree_energy_terms(logits, labels, image, sigma, weight, ignore_index, tree,
                                  features, sigma_high, valid).values())


def _check_features(features, logits) -> torch.Tensor:
    if not torch.is_tensor(features) or features.dim() != 4:
        raise ValueError(f"features must be a (B, D, H, W) tensor, got {getattr(features, 'shape', type(features))}")
    if features.shape[0] != logits.shape[0] or features.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"features {tuple(features.shape)} must match the logits' batch and size "
                         f"{tuple(logits.shape)}")
    return features.detach().to(work_dtype(logits))


def _tree_energy_terms(logits, labels, image, sigma, weight, ignore_index, tree, features=None,
                       sigma_high=1.0, valid=None) -> Dict[str, torch.Tensor]:
    check_sparse_inputs(logits, labels, image, ignore_index)
    valid = check_valid(valid, labels)
    sigma = positive(sigma, "sigma")
    weight = check_weight(weight, "weight")
    dtype = work_dtype(logits)
    tree = instance_trees(cut_padding(raw_guide(image, dtype), valid), tree, _RAW_DESC)
    p = torch.softmax(logits, 1)
    unlabeled = unlabeled_mask(labels, ignore_index, valid, p, dtype)
    target = tree_filter(p.detach().to(dtype), tree, sigma)
    if features is not None:
        target = tree_filter(target, cut_padding(_check_features(features, logits), valid),
                             positive(sigma_high, "sigma_high"))
    return {"treeenergy": weight * masked_l1(p, target, unlabeled)}


class TreeFilterBoxLoss(nn.Module):
    """Module form of :func:`tree_filter_box_loss`: ``forward(logits, box_mask, image, tree=None)``."""

    def __init__(self, sigma: float = 0.02, weight: float = 2.0):
        super().__init__()
        self.sigma = positive(sigma, "sigma")
        self.weight = check_weight(weight, "weight")

    def forward(self, logits, box_mask, image, tree=None):
        return tree_filter_box_loss(logits, box_mask, image, self.sigma, tree, weight=self.weight)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, weight={self.weight}"


class TreeFilterLocalBoxLoss(nn.Module):
    """Module form of :func:`tree_filter_local_box_loss`."""

    def __init__(self, sigma=0.02, weight=2.0, local_weight=1.0, zeta_s=0.15, kernel_size=5, iterations=20):
        super().__init__()
        self.sigma = positive(sigma, "sigma")
        self.weight, self.local_weight = weight, local_weight
        self.zeta_s, self.kernel_size, self.iterations = zeta_s, kernel_size, iterations

    def forward(self, logits, box_mask, image, tree=None):
        return tree_filter_local_box_loss(
            logits, box_mask, image, self.sigma, tree, weight=self.weight, local_weight=self.local_weight,
            zeta_s=self.zeta_s, kernel_size=self.kernel_size, iterations=self.iterations,
        )

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, weight={self.weight}, local_weight={self.local_weight}"


class TreeEnergyLoss(nn.Module):
    """Module form of :func:`tree_energy_loss`: ``forward(logits, labels, image, tree=None, valid=None)``."""

    def __init__(self, sigma: float = 0.02, weight: float = 0.4, ignore_index: int = 255):
        super().__init__()
        self.sigma = positive(sigma, "sigma")
        self.weight = check_weight(weight, "weight")
        self.ignore_index = ignore_index

    def forward(self, logits, labels, image, tree=None, valid=None):
        return tree_energy_loss(logits, labels, image, self.sigma, self.weight, self.ignore_index, tree,
                                valid=valid)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, weight={self.weight}, ignore_index={self.ignore_index}"
