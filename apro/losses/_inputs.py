"""Boundary checks and shared plumbing of the losses (trees per instance, masked averages)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._color import imagenet_normalize
from .._validation import check_float_tensor, check_positive, check_same_grid
from ..tree import SpanningTree, minimum_spanning_tree, tree_edge_weights

# Inputs a little outside [0, 1] (interpolation round-off) are accepted.
_RANGE_SLACK = 1e-3


def check_weight(value, name: str) -> float:
    """Require a finite real number >= 0 (a loss weight)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_variant(variant, choices) -> str:
    if variant not in choices:
        raise ValueError(f"variant must be one of {', '.join(choices)}; got {variant!r}")
    return variant


def _check_unit_range(x: torch.Tensor, name: str, hint: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} must hold values in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {hint}")


def check_image(image, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """``image``: ``(N, 3, H, W)`` RGB in [0, 1] on the grid of ``like``."""
    check_float_tensor(image, "image", 4, "(N, 3, H, W)")
    if image.shape[1] != 3:
        raise ValueError(f"image must be RGB with 3 channels, shape (N, 3, H, W); got shape {tuple(image.shape)}")
    check_same_grid(like, like_name, image, "image")
    _check_unit_range(
        image,
        "image",
        "pass the RGB image in [0, 1] (divide 8-bit images by 255; undo any mean/std normalisation, "
        "each loss normalises the image itself)",
    )
    return image


def check_box_inputs(logits, box_mask, image) -> None:
    """Logits ``(N, 1, H, W)``, box mask ``(N, 1, H, W)`` in [0, 1], image ``(N, 3, H, W)``."""
    check_float_tensor(logits, "logits", 4, "(N, 1, H, W)")
    if logits.shape[1] != 1:
        raise ValueError(
            f"logits must hold one mask channel per instance, shape (N, 1, H, W); got shape {tuple(logits.shape)}"
        )
    check_box_mask(box_mask, logits)
    if image is not None:
        check_image(image, logits, "logits")


def check_box_mask(box_mask, logits: torch.Tensor) -> None:
    check_float_tensor(box_mask, "box_mask", 4, "(N, 1, H, W)")
    if box_mask.shape[1] != 1:
        raise ValueError(f"box_mask must have shape (N, 1, H, W); got shape {tuple(box_mask.shape)}")
    check_same_grid(logits, "logits", box_mask, "box_mask")
    _check_unit_range(box_mask, "box_mask", "use 1 inside the box and 0 outside")


def check_sparse_inputs(logits, labels, image, ignore_index) -> None:
    """Logits ``(B, K, H, W)``, labels ``(B, H, W)`` integer in ``[0, K)`` or ``ignore_index``."""
    check_float_tensor(logits, "logits", 4, "(B, K, H, W)")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (B, H, W), got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 class indices), got dtype {labels.dtype}")
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, H, W), got shape {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0] or labels.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}; "
            f"labels must be (B, H, W) on the logits' grid"
        )
    k = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= k))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must be class indices in [0, {k}) or ignore_index={ignore_index} for unlabeled pixels; "
            f"found {value}"
        )
    if image is not None:
        check_image(image, logits, "logits")


def check_valid(valid, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """``valid`` (None, or bool ``(B, H, W)`` like ``labels``: False on padding) on the labels'
    device; None when it marks no padding, so that callers test for padding in one place."""
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be None or a bool tensor (True on image pixels, False on padding), got "
                        f"{getattr(valid, 'dtype', type(valid).__name__)}")
    if tuple(valid.shape) != tuple(labels.shape):
        raise ValueError(f"valid has shape {tuple(valid.shape)} but labels has shape {tuple(labels.shape)}; "
                         f"it must mark the same (B, H, W) grid")
    return None if bool(valid.all()) else valid.to(labels.device)


def unlabeled_mask(labels: torch.Tensor, ignore_index: int, valid: Optional[torch.Tensor], like: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, H, W)`` mask of the unlabeled image pixels (``ignore_index``, not padding), on
    ``like``'s device: where the sparse pairwise terms average."""
    unlabeled = labels == ignore_index
    if valid is not None:
        unlabeled = unlabeled & valid
    return unlabeled.unsqueeze(1).to(device=like.device, dtype=dtype)


def cut_padding(guide: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``guide`` ``(B, D, H, W)`` with its padded pixels (``valid`` False) set far from every value.

    Every affinity across the image's edge (a tree path through the padding, an LP window
    reaching into it) then underflows to exactly 0: padding is no neighbour of an image pixel,
    as pixels outside the image are none in the released LP. Inside the image nothing changes
    (the minimum spanning tree restricted to the image pixels is the image's own tree).
    """
    if valid is None:
        return guide
    far = float(guide.detach().abs().amax()) + 1e3
    return guide.masked_fill(~valid.to(guide.device).unsqueeze(1), far)


def nonempty_instances(box_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``(N,)``: instances whose box mask has any positive pixel."""
    return box_mask.detach().flatten(1).amax(1) > 0


def zero_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero scalar still connected to ``logits`` (backward works and gives zero gradient)."""
    return logits.sum() * 0.0


def masked_l1(p: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(|p - target| * mask) / sum(mask)`` (SPEC §4); the target is detached.

    ``mask`` is ``(N, 1, H, W)``: with ``C`` channels in ``p`` the per-pixel L1 sums over the
    channels and the average is over masked pixels (as TEL does for its K classes).
    """
    return ((p - target.detach()).abs() * mask).sum() / mask.sum().clamp_min(1.0)


def instance_l1(p: torch.Tensor, target: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Per instance ``sum(|p - target| B) / sum(B)``, averaged over instances (SPEC §4).

    The released APro code normalises each instance by its own box area; ``p``, ``target`` and
    ``box`` are ``(N, 1, H, W)`` and every instance is expected to have a non-empty box.
    """
    per = ((p - target.detach()).abs() * box).sum((1, 2, 3)) / box.sum((1, 2, 3)).clamp_min(1.0)
    return per.mean()


NORMALIZATIONS = ("instance", "total")


def check_normalization(normalization) -> str:
    """``"instance"`` (each instance by its own box area, then averaged) or ``"total"``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}")
    return normalization


def box_l1(p: torch.Tensor, target: torch.Tensor, box: torch.Tensor, normalization: str = "instance") -> torch.Tensor:
    """``|p - target|`` masked by the box: per instance then averaged, or over the total box area.

    ``"instance"``: ``mean_n sum(|p_n - y_n| B_n) / sum(B_n)`` (released SOLOv2 head);
    ``"total"``: ``sum_n sum(|p_n - y_n| B_n) / sum_n sum(B_n)`` (released Mask2Former head).
    """
    if normalization == "total":
        return masked_l1(p, target, box)
    return instance_l1(p, target, box)


def work_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, else float32 (guides and targets are never built in half precision)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def normalized_guide(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ImageNet-normalised image GP, LP and the CRF read (SPEC §2)."""
    return imagenet_normalize(image.detach().to(dtype))


def raw_guide(image: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The raw RGB image in [0, 1] the tree filter reads (TEL)."""
    return image.detach().to(dtype)


def instance_trees(guide: torch.Tensor, tree: Optional[SpanningTree], guide_desc: str) -> SpanningTree:
    """One spanning tree per instance of ``guide`` ``(N, D, H, W)``.

    Built when ``tree`` is None, once per distinct image (instances of one image usually come
    consecutively with the same image). A given ``tree`` must hold ``N`` trees of this grid
    whose edge weights are those of ``guide``: a tree built from a differently scaled image
    would silently change the meaning of ``zeta`` / ``sigma``.
    """
    n, _, h, w = guide.shape
    if tree is None:
        keep, index = [0], [0]
        for i in range(1, n):
            if not torch.equal(guide[i], guide[keep[-1]]):
                keep.append(i)
            index.append(len(keep) - 1)
        trees = minimum_spanning_tree(guide[keep])
        return trees if len(keep) == n else trees.select(torch.tensor(index))
    if not isinstance(tree, SpanningTree):
        raise TypeError(f"tree must be an apro.SpanningTree or None, got {type(tree).__name__}")
    if (tree.height, tree.width) != (h, w):
        raise ValueError(
            f"tree is a tree of a {tree.height}x{tree.width} grid but the logits are {h}x{w}; "
            f"build it at the logits' resolution"
        )
    if tree.batch_size != n:
        raise ValueError(
            f"tree holds {tree.batch_size} trees but there are {n} predictions; pass one tree per "
            f"prediction, e.g. tree.select(image_index_of_each_instance)"
        )
    expected = tree_edge_weights(tree, guide)
    if not torch.allclose(expected, tree.weights, rtol=1e-3, atol=1e-5):
        raise ValueError(
            f"tree's edge weights do not match {guide_desc}; build it with "
            f"apro.minimum_spanning_tree(apro.losses.tree_guide(name, image)) or pass tree=None"
        )
    return tree


def kept_trees(guide: torch.Tensor, tree: Optional[SpanningTree], keep: torch.Tensor, guide_desc: str) -> SpanningTree:
    """Trees of the instances flagged in ``keep`` ``(N,)``; a given ``tree`` is checked against all N."""
    if tree is None:
        return instance_trees(guide[keep], None, guide_desc)
    tree = instance_trees(guide, tree, guide_desc)
    return tree if bool(keep.all()) else tree.select(torch.nonzero(keep.cpu()).flatten())


# Require a finite real number > 0 (zetas, sigma, thresholds).
positive = check_positive
