"""Box-supervised mask losses of the released APro models: projection (unary) and GP/LP terms (SPEC §4).

Conventions shared by every box loss: ``logits`` ``(N, 1, H, W)`` (one mask per instance,
never probabilities), ``box_mask`` ``(N, 1, H, W)`` with 1 inside the instance's box and 0
outside (fractional values act as weights), ``image`` ``(N, 3, H, W)`` RGB in [0, 1] at the
logits' resolution (the image of each instance; instances of one image repeat it).
An instance whose box mask is all zero contributes nothing; if every instance is empty the
loss is an exact zero that still backpropagates (zero gradient), never NaN.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..propagation import global_propagation, local_propagation
from .._validation import check_count, check_kernel_size
from ..tree import SpanningTree
from ._inputs import (
    check_box_inputs,
    check_variant,
    box_l1,
    check_normalization,
    check_weight,
    cut_padding,
    kept_trees,
    nonempty_instances,
    normalized_guide,
    positive,
    work_dtype,
    zero_loss,
)

VARIANTS = ("gp-lp-p", "gp-lp-c", "lp-gp-c", "gp", "lp")


def _dice(x: torch.Tensor, t: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row ``1 - 2 sum(x t) / (sum x^2 + sum t^2 + eps)`` over the flattened trailing dims."""
    x, t = x.flatten(1), t.flatten(1)
    return 1.0 - 2.0 * (x * t).sum(1) / ((x * x).sum(1) + (t * t).sum(1) + eps)


def box_projection_loss(logits: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """Box projection loss (BoxInst; SPEC §4): Dice of the max-projections along x plus along y.

    ``Dice(x, t) = 1 - 2 sum(x t) / (sum x^2 + sum t^2 + 1e-5)`` between the column (row)
    maxima of ``sigmoid(logits)`` and of ``box_mask``; averaged over non-empty instances.
    Unweighted (the released SOLOv2 models weight it 3.0).

    Args:
        logits: ``(N, 1, H, W)`` mask logits.
        box_mask: ``(N, 1, H, W)`` filled boxes.

    Returns:
        Scalar tensor (dtype and device of ``logits``).
    """
    check_box_inputs(logits, box_mask, None)
    keep = nonempty_instances(box_mask)
    if not bool(keep.any()):
        return zero_loss(logits)
    p = torch.sigmoid(logits[keep])
    b = box_mask[keep].to(p.dtype)
    per_instance = _dice(p.amax(2), b.amax(2), 1e-5) + _dice(p.amax(3), b.amax(3), 1e-5)
    return per_instance.mean()


def two_stage_gp(values: torch.Tensor, tree: SpanningTree, zeta_gl: float, zeta_gh: Optional[float],
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The released model's GP (SPEC §2): image-weighted pass, then a pass weighted by its own result.

    ``valid`` (optional ``(B, H, W)`` bool, False on padding cut from ``tree``'s guide) keeps the
    second pass cut there too: its edge weights come from the first result, not the guide.
    """
    y = global_propagation(values, tree, zeta_gl)
    if zeta_gh is not None:
        y = global_propagation(y, tree, zeta_gh, embedding=y if valid is None else cut_padding(y, valid))
    return y


def check_gp_size(gp_size) -> Optional[tuple]:
    """None, an int ``s`` (``s x s``) or ``(h, w)``, each >= 2: the fixed grid GP runs on."""
    if gp_size is None:
        return None
    size = (gp_size, gp_size) if isinstance(gp_size, int) and not isinstance(gp_size, bool) else gp_size
    try:
        size = tuple(size)
    except TypeError:
        raise TypeError(f"gp_size must be None, an int or (height, width), got {gp_size!r}") from None
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in size):
        raise ValueError(f"gp_size must be None, an int >= 2 or (height, width) of ints >= 2, got {gp_size!r}")
    return size


def _resized(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _apro_box_terms(
    logits, box_mask, image, variant, zeta_gl, zeta_gh, zeta_s, kernel_size, iterations,
    global_weight, local_weight, tree, normalization="instance", gp_size=None,
) -> Dict[str, torch.Tensor]:
    """Weighted GP/LP terms of the non-empty instances, by name ("global", "local" or "cascade").

    ``gp_size``: run GP on that fixed grid (prediction and image resized bilinearly, the
    result resized back), as the released Mask2Former head does at 96 x 96; ``tree`` is then
    a tree of that grid. ``normalization``: see :func:`box_l1`.
    """
    check_box_inputs(logits, box_mask, image)
    check_normalization(normalization)
    gp_size = check_gp_size(gp_size)
    check_variant(variant, VARIANTS)
    zeta_gl = positive(zeta_gl, "zeta_gl")
    if zeta_gh is not None:
        zeta_gh = positive(zeta_gh, "zeta_gh")
    positive(zeta_s, "zeta_s")
    check_kernel_size(kernel_size)
    check_count(iterations, "iterations")
    gw = check_weight(global_weight, "global_weight")
    lw = check_weight(local_weight, "local_weight")
    keep = nonempty_instances(box_mask)
    if not bool(keep.any()):
        z = zero_loss(logits)
        names = {"gp-lp-p": ("global", "local"), "gp": ("global",), "lp": ("local",)}.get(variant, ("cascade",))
        return {name: z for name in names}
    guide = normalized_guide(image, work_dtype(logits))
    gp_guide = guide if gp_size is None else _resized(guide, gp_size)
    if variant != "lp":
        desc = "the ImageNet-normalised image" + ("" if gp_size is None else f" resized to {gp_size[0]}x{gp_size[1]}")
        tree = kept_trees(gp_guide, tree, keep, desc)
    if not bool(keep.all()):
        logits, box_mask, guide = logits[keep], box_mask[keep], guide[keep]
    p = torch.sigmoid(logits)
    b = box_mask.to(guide.dtype)
    phi = p.detach().to(guide.dtype)

    def gp(v):
        if gp_size is None:
            return two_stage_gp(v, tree, zeta_gl, zeta_gh)
        return _resized(two_stage_gp(_resized(v, gp_size), tree, zeta_gl, zeta_gh), v.shape[-2:])

    def lp(v):
        return local_propagation(v, guide, kernel_size, zeta_s, iterations, mask=b)

    def l1(target):
        return box_l1(p, target, b, normalization)

    if variant == "gp-lp-p":
        return {"global": gw * l1(gp(phi)), "local": lw * l1(lp(phi))}
    if variant == "gp":
        return {"global": gw * l1(gp(phi))}
    if variant == "lp":
        return {"local": lw * l1(lp(phi))}
    target = lp(gp(phi)) if variant == "gp-lp-c" else gp(lp(phi))
    return {"cascade": (gw + lw) * l1(target)}


def apro_box_loss(
    logits: torch.Tensor,
    box_mask: torch.Tensor,
    image: torch.Tensor,
    *,
    variant: str = "gp-lp-p",
    zeta_gl: float = 0.01,
    zeta_gh: Optional[float] = 0.07,
    zeta_s: float = 0.15,
    kernel_size: int = 5,
    iterations: int = 20,
    global_weight: float = 2.0,
    local_weight: float = 1.0,
    tree: Optional[SpanningTree] = None,
    normalization: str = "instance",
    gp_size=None,
) -> torch.Tensor:
    """APro pairwise terms for box supervision (paper Eqs. 2-6, Table 7; SPEC §2-4).

    With ``p = sigmoid(logits)`` and ``B = box_mask``, pseudo labels are made from ``p``
    (detached): ``GP`` is the two-stage global propagation of the released model
    (``y1 = GP(p; image, zeta_gl)``, ``GP = GP(y1; weights from y1, zeta_gh)``, one tree from
    the ImageNet-normalised image; ``zeta_gh=None`` runs the first stage only, the paper's
    Eq. 3) and ``LP`` the local propagation on the normalised image,
    multiplied by ``B`` before the first and after every step. Each term is
    ``sum(|Y - p| B) / sum(B)`` per instance (as in the released code), averaged over the
    instances. Variants:

    - ``"gp-lp-p"`` (default, best in Table 7): ``global_weight * L1(GP(p)) + local_weight * L1(LP(p))``.
    - ``"gp-lp-c"`` / ``"lp-gp-c"``: one cascaded label, ``LP(GP(p))`` / ``GP(LP(p))``, weighted by
      ``global_weight + local_weight`` (the paper does not give the cascades' weight; this keeps
      the total pull towards pseudo labels equal to the parallel variant's).
    - ``"gp"`` / ``"lp"``: one term only, with its own weight (Table 4).

    The projection (unary) term is separate: :func:`box_projection_loss`.

    Args:
        logits: ``(N, 1, H, W)``; box_mask: ``(N, 1, H, W)``; image: ``(N, 3, H, W)`` RGB in [0, 1].
        tree: optional :class:`~apro.SpanningTree` with ``N`` trees built from the
            ImageNet-normalised image (see :func:`apro.losses.tree_guide`), e.g. one tree per
            image shared by its instances via ``tree.select(image_index)``; built when None.
            With ``gp_size``: trees of the normalised image resized to ``gp_size``.
        normalization: ``"instance"`` (default, released SOLOv2 head: each instance by its
            own box area, then averaged) or ``"total"`` (released Mask2Former head: summed over
            all instances and divided by their total box area).
        gp_size: None (GP at the logits' resolution) or an int / ``(h, w)``: GP runs on that
            fixed grid, prediction and image resized bilinearly and the result resized back
            (released Mask2Former head: 96). LP always runs at the logits' resolution.

    Returns:
        Scalar tensor; gradients flow only through ``p``.
    """
    terms = _apro_box_terms(
        logits, box_mask, image, variant, zeta_gl, zeta_gh, zeta_s, kernel_size, iterations,
        global_weight, local_weight, tree, normalization, gp_size,
    )
    return sum(terms.values())


class BoxProjectionLoss(nn.Module):
    """Module form of :func:`box_projection_loss`: ``forward(logits, box_mask)``."""

    def forward(self, logits, box_mask):
        return box_projection_loss(logits, box_mask)


class APRoBoxLoss(nn.Module):
    """Module form of :func:`apro_box_loss`: ``forward(logits, box_mask, image, tree=None)``."""

    def __init__(self, variant="gp-lp-p", zeta_gl=0.01, zeta_gh=0.07, zeta_s=0.15, kernel_size=5,
                 iterations=20, global_weight=2.0, local_weight=1.0):
        super().__init__()
        self.variant = check_variant(variant, VARIANTS)
        self.zeta_gl, self.zeta_gh, self.zeta_s = zeta_gl, zeta_gh, zeta_s
        self.kernel_size, self.iterations = kernel_size, iterations
        self.global_weight, self.local_weight = global_weight, local_weight

    def forward(self, logits, box_mask, image, tree=None):
        return apro_box_loss(
            logits, box_mask, image, variant=self.variant, zeta_gl=self.zeta_gl, zeta_gh=self.zeta_gh,
            zeta_s=self.zeta_s, kernel_size=self.kernel_size, iterations=self.iterations,
            global_weight=self.global_weight, local_weight=self.local_weight, tree=tree,
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, zeta_gl={self.zeta_gl}, zeta_gh={self.zeta_gh}, zeta_s={self.zeta_s}"
