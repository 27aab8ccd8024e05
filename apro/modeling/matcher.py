"""Hungarian matching of queries to ground-truth boxes for a query-based, box-supervised head.

The released Box2Mask / APro Mask2Former head assigns queries to objects with a bipartite
(Hungarian) matching whose "ground-truth masks" are the filled box masks. Here the cost of
giving query ``q`` object ``k`` is

    C[q, k] = class_weight * (-softmax(class_logits_q)[label_k])
            + projection_weight * (Dice_x(q, k) + Dice_y(q, k))

where ``Dice_x`` / ``Dice_y`` compare the max-projections of ``sigmoid(mask_logits_q)`` along
x / y with those of box ``k``'s mask, exactly the box projection loss
(:func:`apro.losses.box_projection_loss`) of the pair. The assignment minimises the summed
cost with :func:`scipy.optimize.linear_sum_assignment`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


def hungarian_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of rows to columns.

    Args:
        cost: ``(Q, K)`` finite costs (rows = queries, columns = objects).
    Returns:
        ``(rows, cols)``: int64 tensors of length ``min(Q, K)`` on the CPU, sorted by row;
        every column is used once when ``Q >= K``.
    """
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2:
        raise ValueError(f"cost must be a (Q, K) tensor, got {getattr(cost, 'shape', type(cost).__name__)}")
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    values = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(values).all():
        raise ValueError("cost contains NaN or inf values")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(values)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def classification_cost(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-softmax(class_logits)[:, labels]``: ``(Q, C + 1)`` logits (last = no object), ``(K,)`` labels -> ``(Q, K)``."""
    if class_logits.dim() != 2:
        raise ValueError(f"class_logits must have shape (Q, C + 1), got {tuple(class_logits.shape)}")
    return -class_logits.float().softmax(-1)[:, labels.to(class_logits.device)]


def _pairwise_dice(x: torch.Tensor, t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - 2 x.t / (|x|^2 + |t|^2 + eps)`` for every pair of rows: ``(Q, L)``, ``(K, L)`` -> ``(Q, K)``."""
    numerator = 2.0 * x @ t.t()
    denominator = (x * x).sum(1)[:, None] + (t * t).sum(1)[None, :] + eps
    return 1.0 - numerator / denominator


def projection_cost(mask_logits: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """Box projection loss of every (query, box) pair: ``(Q, h, w)``, ``(K, h, w)`` -> ``(Q, K)``.

    ``Dice(max_y p_q, max_y B_k) + Dice(max_x p_q, max_x B_k)`` with ``p = sigmoid(mask_logits)``,
    the same Dice as :func:`apro.losses.box_projection_loss` (eps 1e-5).
    """
    if mask_logits.dim() != 3 or box_masks.dim() != 3 or mask_logits.shape[-2:] != box_masks.shape[-2:]:
        raise ValueError(f"mask_logits (Q, h, w) and box_masks (K, h, w) must share the grid, got "
                         f"{tuple(mask_logits.shape)} and {tuple(box_masks.shape)}")
    p = torch.sigmoid(mask_logits.float())
    b = box_masks.to(p)
    return _pairwise_dice(p.amax(1), b.amax(1)) + _pairwise_dice(p.amax(2), b.amax(2))


class HungarianMatcher(nn.Module):
    """Assigns queries to objects (boxes) by class cost plus box-projection cost, per image.

    Args:
        class_weight: weight of the classification cost (Mask2Former: 2.0).
        projection_weight: weight of the projection cost (the projection loss's 5.0).
    """

    def __init__(self, class_weight: float = 2.0, projection_weight: float = 5.0):
        super().__init__()
        if not class_weight >= 0 or not projection_weight >= 0:
            raise ValueError(f"class_weight and projection_weight must be >= 0, got {class_weight!r}, "
                             f"{projection_weight!r}")
        self.class_weight = float(class_weight)
        self.projection_weight = float(projection_weight)

    def cost(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
             box_masks: torch.Tensor) -> torch.Tensor:
        """``(Q, C + 1)``, ``(Q, h, w)``, ``(K,)``, ``(K, h, w)`` -> ``(Q, K)`` matching costs."""
        return (self.class_weight * classification_cost(class_logits, labels)
                + self.projection_weight * projection_cost(mask_logits, box_masks))

    @torch.no_grad()
    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                labels: Sequence[torch.Tensor], box_masks: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of the batch.

        Args:
            class_logits: ``(B, Q, C + 1)``; mask_logits: ``(B, Q, h, w)``.
            labels: per image ``(K_b,)`` class indices; box_masks: per image ``(K_b, h, w)``.
        Returns:
            per image ``(query_index, object_index)`` int64 CPU tensors of length ``min(Q, K_b)``.
        """
        if class_logits.dim() != 3 or mask_logits.dim() != 4 or class_logits.shape[:2] != mask_logits.shape[:2]:
            raise ValueError(f"class_logits (B, Q, C + 1) and mask_logits (B, Q, h, w) must agree, got "
                             f"{tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
        if len(labels) != class_logits.shape[0] or len(box_masks) != class_logits.shape[0]:
            raise ValueError(f"labels and box_masks need one entry per image ({class_logits.shape[0]}), got "
                             f"{len(labels)} and {len(box_masks)}")
        out = []
        for b in range(class_logits.shape[0]):
            if labels[b].numel() == 0:
                out.append(hungarian_assignment(class_logits.new_zeros(class_logits.shape[1], 0)))
                continue
            out.append(hungarian_assignment(self.cost(class_logits[b], mask_logits[b], labels[b], box_masks[b])))
        return out

    def extra_repr(self) -> str:
        return f"class_weight={self.class_weight}, projection_weight={self.projection_weight}"
