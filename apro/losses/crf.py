"""MAL's mean-field CRF loss (Lan et al., CVPR 2023), a comparison method of the paper (SPEC §5, Table 6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_count, check_kernel_size
from ._inputs import (
    check_box_inputs,
    check_weight,
    nonempty_instances,
    normalized_guide,
    positive,
    work_dtype,
    zero_loss,
)
from .box import _dice

# MAL's value clamp ("truncation") and its normaliser's epsilon.
_LOW, _HIGH = 0.1, 0.9
_NORM_EPS = 1e-6


def _window(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, k*k, H, W)`` shifted copies (zero outside the image)."""
    r = k // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r))
    return torch.stack([padded[..., dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)], 2)


def crf_kernel(guide: torch.Tensor, zeta: float = 0.1, kernel_size: int = 3) -> torch.Tensor:
    """``exp(-sum_c (I_j - I_i)^2 / (2 zeta^2))`` over the k x k window incl. the centre.

    ``guide``: ``(N, C, H, W)`` (the ImageNet-normalised image). Returns ``(N, k*k, H, W)``;
    neighbours outside the image get 0 (MAL's far-away padding).
    """
    inside = _window(guide.new_ones(1, 1, *guide.shape[-2:]), kernel_size)[:, 0]
    d = (_window(guide, kernel_size) - guide.unsqueeze(2)).pow(2).sum(1)
    return torch.exp(-d / (2.0 * zeta**2)) * inside


@torch.no_grad()
def mean_field_target(
    probs: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    *,
    zeta: float = 0.1,
    kernel_size: int = 3,
    iterations: int = 100,
) -> torch.Tensor:
    """MAL's mean-field refinement of a foreground probability into a hard target.

    ``x = clamp(p * B, 0.1, 0.9)``; each step, with ``k_ij`` from :func:`crf_kernel` on the
    ImageNet-normalised image, ``q_c(i) = prod_j x_c(j)^{k_ij}`` (computed as
    ``exp(sum_j k_ij log x_c(j))``) for background ``c = 0`` (``x_0 = 1 - x``) and foreground
    (``x_1 = x``), foreground times ``B``, ``x = clamp(q_1 / (q_0 + q_1 + 1e-6), 0.1, 0.9)``.
    After ``iterations`` steps the target is ``x > 0.5``.

    Args:
        probs: ``(N, 1, H, W)`` foreground probabilities; box_mask: ``(N, 1, H, W)``;
        image: ``(N, 3, H, W)`` RGB in [0, 1].

    Returns:
        ``(N, 1, H, W)`` float {0, 1}, no gradient.
    """
    zeta = positive(zeta, "zeta")
    k = check_kernel_size(kernel_size)
    iterations = check_count(iterations, "iterations")
    guide = normalized_guide(image, work_dtype(probs))
    # Negligible weights are zeroed: as float32 denormals they slow every step ~10x.
    kernel = crf_kernel(guide, zeta, k)
    kernel = kernel.masked_fill(kernel < 1e-20, 0.0)
    b = box_mask.to(guide.dtype)
    x = (probs.detach().to(guide.dtype) * b).clamp(_LOW, _HIGH)
    r = k // 2
    h, w = x.shape[-2:]
    # Element-wise shifted multiply-adds only: unfold / reductions spin up threads even on
    # tiny masks, which costs far more than the arithmetic here.
    weights = [kernel[:, s : s + 1] for s in range(k * k)]
    energy = x.new_empty(x.shape[0], 2, h, w)
    for _ in range(iterations):
        # Channel 0: background 1 - x, channel 1: foreground x; energy_c = -sum_j k_ij log x_c(j).
        neg_log = F.pad(-torch.log(torch.cat([1.0 - x, x], 1)), (r, r, r, r))
        energy.zero_()
        for s, weight in enumerate(weights):
            dy, dx = divmod(s, k)
            energy.addcmul_(weight, neg_log[..., dy : dy + h, dx : dx + w])
        q = torch.exp(-energy)
        q_bg, q_fg = q[:, :1], q[:, 1:] * b
        x = (q_fg / (_NORM_EPS + q_fg + q_bg)).clamp(_LOW, _HIGH)
    return (x > 0.5).to(probs.dtype)


def crf_loss(
    logits: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    *,
    weight: float = 1.0,
    zeta: float = 0.1,
    kernel_size: int = 3,
    iterations: int = 100,
) -> torch.Tensor:
    """MAL's CRF loss (SPEC §5): Dice between ``sigmoid(logits)`` and its mean-field hard target.

    The target is :func:`mean_field_target` of the detached prediction. MAL applies a Dice
    loss to it (``1 - 2 sum(p t) / (sum p^2 + 0.001 + sum t^2 + 0.001)`` per instance,
    averaged); so does this. MAL feeds the mean of a student and an EMA teacher prediction to
    the CRF; here (no teacher) the prediction itself is used.

    Args:
        logits: ``(N, 1, H, W)``; box_mask: ``(N, 1, H, W)``; image: ``(N, 3, H, W)`` RGB in [0, 1].
        weight: multiplies the loss (``BOX_MASK_LOSSES["crf"]`` uses 0.375, MAL's 0.5 : 4 ratio
            to its projection loss, applied to the projection weight 3.0).
        zeta, kernel_size, iterations: mean-field settings (MAL: 0.1, 3, 100).

    Returns:
        Scalar tensor.
    """
    check_box_inputs(logits, box_mask, image)
    weight = check_weight(weight, "weight")
    keep = nonempty_instances(box_mask)
    if not bool(keep.any()):
        return zero_loss(logits)
    logits, box_mask, image = logits[keep], box_mask[keep], image[keep]
    p = torch.sigmoid(logits)
    target = mean_field_target(p, box_mask, image, zeta=zeta, kernel_size=kernel_size, iterations=iterations)
    return weight * _dice(p, target, 0.002).mean()


class CRFLoss(nn.Module):
    """Module form of :func:`crf_loss`: ``forward(logits, box_mask, image)``."""

    def __init__(self, weight: float = 1.0, zeta: float = 0.1, kernel_size: int = 3, iterations: int = 100):
        super().__init__()
        self.weight = check_weight(weight, "weight")
        self.zeta = positive(zeta, "zeta")
        self.kernel_size = check_kernel_size(kernel_size)
        self.iterations = check_count(iterations, "iterations")

    def forward(self, logits, box_mask, image, tree=None):
        return crf_loss(
            logits, box_mask, image, weight=self.weight, zeta=self.zeta, kernel_size=self.kernel_size,
            iterations=self.iterations,
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, zeta={self.zeta}, kernel_size={self.kernel_size}, iterations={self.iterations}"
