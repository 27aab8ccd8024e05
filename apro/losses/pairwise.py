"""BoxInst's pairwise loss (Tian et al., CVPR 2021), a comparison method of the paper (SPEC §5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._color import rgb_to_lab
from ._inputs import check_box_inputs, check_weight, nonempty_instances, positive, zero_loss

# The 8 neighbours of a 3 x 3 window with dilation 2 (centre excluded), as (dy, dx).
_DILATION = 2
_OFFSETS = tuple(
    (dy, dx) for dy in (-_DILATION, 0, _DILATION) for dx in (-_DILATION, 0, _DILATION) if (dy, dx) != (0, 0)
)


def _neighbours(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, 8, H, W)``: entry ``s`` at ``(y, x)`` is ``x[y + dy_s, x + dx_s]``."""
    h, w = x.shape[-2:]
    r = _DILATION
    padded = F.pad(x, (r, r, r, r), value=fill)
    return torch.stack([padded[..., r + dy : r + dy + h, r + dx : r + dx + w] for dy, dx in _OFFSETS], 2)


def color_similarity(image: torch.Tensor) -> torch.Tensor:
    """BoxInst colour similarity ``exp(-||LAB_i - LAB_j|| * 0.5)`` to the 8 dilated neighbours.

    ``image``: ``(N, 3, H, W)`` RGB in [0, 1]. Returns ``(N, 8, H, W)``; neighbours outside the
    image get similarity 0 (BoxInst masks them out the same way).
    """
    lab = rgb_to_lab(image.detach())
    diff = lab.unsqueeze(2) - _neighbours(lab)
    sim = torch.exp(-diff.norm(dim=1) * 0.5)
    inside = _neighbours(lab.new_ones(1, 1, *lab.shape[-2:]))[:, 0]
    return sim * inside


def _shared_color_similarity(image: torch.Tensor) -> torch.Tensor:
    """:func:`color_similarity` of ``image`` computed once per run of equal consecutive entries.

    The instances of one image come in a row (a SOLOv2 batch has tens of positives per image),
    and the similarity of a repeated image is the same; comparing neighbours is one cheap pass.
    """
    if image.shape[0] < 2:
        return color_similarity(image)
    repeats = (image[1:] == image[:-1]).flatten(1).all(1)
    if not bool(repeats.any()):
        return color_similarity(image)
    heads = torch.cat([repeats.new_ones(1), ~repeats])
    run = torch.cumsum(heads.long(), 0) - 1
    return color_similarity(image[heads])[run]


def pairwise_loss(
    logits: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    *,
    threshold: float = 0.3,
    weight: float = 1.0,
) -> torch.Tensor:
    """BoxInst pairwise loss (SPEC §5).

    For each pixel ``i`` inside the box and each of its 8 neighbours ``j`` on a 3 x 3 window
    with dilation 2 whose LAB colour similarity ``exp(-||LAB_i - LAB_j|| * 0.5)`` is at least
    ``threshold``, the loss ``-log(p_i p_j + (1 - p_i)(1 - p_j))`` with ``p = sigmoid(logits)``
    (computed stably in log space); averaged over all such pairs of all instances. As in
    BoxInst, "inside the box" is tested on the centre pixel ``i``; both orders of a pair count.

    Args:
        logits: ``(N, 1, H, W)``; box_mask: ``(N, 1, H, W)``; image: ``(N, 3, H, W)`` RGB in [0, 1]
            (BoxInst average-pools the image to mask resolution before converting to LAB).
        threshold: similarity threshold (0.3 in BoxInst).
        weight: multiplies the loss (1.0 in BoxInst, after its warm-up).

    Returns:
        Scalar tensor.
    """
    check_box_inputs(logits, box_mask, image)
    threshold = positive(threshold, "threshold")
    weight = check_weight(weight, "weight")
    keep = nonempty_instances(box_mask)
    if not bool(keep.any()):
        return zero_loss(logits)
    logits, box_mask, image = logits[keep], box_mask[keep], image[keep]
    log_fg = F.logsigmoid(logits)
    log_bg = F.logsigmoid(-logits)
    log_same = torch.logaddexp(
        log_fg.unsqueeze(2) + _neighbours(log_fg), log_bg.unsqueeze(2) + _neighbours(log_bg)
    )[:, 0]
    pair_weight = (_shared_color_similarity(image) >= threshold).to(logits.dtype) * box_mask.to(logits.dtype)
    return weight * (-log_same * pair_weight).sum() / pair_weight.sum().clamp_min(1.0)


class PairwiseLoss(nn.Module):
    """Module form of :func:`pairwise_loss`: ``forward(logits, box_mask, image)``."""

    def __init__(self, threshold: float = 0.3, weight: float = 1.0):
        super().__init__()
        self.threshold = positive(threshold, "threshold")
        self.weight = check_weight(weight, "weight")

    def forward(self, logits, box_mask, image, tree=None):
        return pairwise_loss(logits, box_mask, image, threshold=self.threshold, weight=self.weight)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, weight={self.weight}"
