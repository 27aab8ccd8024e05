"""SOLOv2 (Wang et al., NeurIPS 2020) trained from boxes with APro's mask losses (paper Sec. 4.1).

The image is divided into ``S x S`` grids on several pyramid levels. For every cell a category
branch predicts class scores and a kernel branch predicts the weights of a 1x1 convolution
(dynamic kernel) that, applied to a unified mask feature map, gives that cell's instance mask.
Box supervision replaces the mask targets (SPEC §4): a ground-truth box makes positive the
cells of its centre region on the level(s) whose scale range holds it, and each positive's
mask logits are trained with ``apro.losses.box_mask_loss`` against the filled box mask.
Inference keeps confident cells, decodes their masks and suppresses duplicates with Matrix NMS.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..losses import BOX_MASK_LOSSES, PROJECTION_WEIGHT, box_mask_loss, box_projection_loss, tree_guide
from ..losses.registry import check_box_loss
from .._validation import check_threshold
from ..tree import minimum_spanning_tree
from ._inputs import check_forward_inputs
from ._feature_cache import cached_backbone_features, check_cache_dir, check_cacheable
from .backbones import build_backbone
from .fpn import FPN

# Mask losses whose pairwise term runs on a minimum spanning tree of the image: the tree is
# built here once per image (from ``apro.losses.tree_guide``) and shared by its instances.
_TREE_LOSSES = frozenset({"gp", "apro", "gp-lp-c", "lp-gp-c", "treefilter", "treefilter-local"})


# ---------------------------------------------------------------------------------------------
# Focal loss
# ---------------------------------------------------------------------------------------------
def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = "sum") -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017) on independent sigmoids.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` where the target is 1 and
    ``1 - p`` elsewhere. ``logits`` and ``targets`` (float in {0, 1}) have the same shape.
    ``reduction``: "sum", "mean" or "none".
    """
    if logits.shape != targets.shape:
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    targets = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * (1 - p_t).pow(gamma) * ce
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


class FocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss`."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction)


# ---------------------------------------------------------------------------------------------
# Matrix NMS
# ---------------------------------------------------------------------------------------------
def matrix_nms(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
               kernel: str = "gaussian", sigma: float = 2.0) -> torch.Tensor:
    """Matrix NMS (SOLOv2 paper, Sec. 3.3.4): decayed scores, in the input order.

    With masks sorted by descending score, mask ``j`` decays by
    ``min_{i < j} f(iou_ij) / f(max_{k < i} iou_ki)``, where IoUs count only between masks of
    the same label, and ``f(iou) = exp(-sigma iou^2)`` ("gaussian") or ``1 - iou`` ("linear").
    The highest-scored mask keeps its score.

    Args:
        masks: ``(N, H, W)`` binary masks (bool or float in {0, 1}).
        labels: ``(N,)`` integer class of each mask.
        scores: ``(N,)`` float scores.
    Returns:
        ``(N,)`` decayed scores (same dtype/device as ``scores``).
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(masks.shape)}")
    n = masks.shape[0]
    if labels.shape != (n,) or scores.shape != (n,):
        raise ValueError(f"labels and scores must have shape ({n},), got {tuple(labels.shape)} "
                         f"and {tuple(scores.shape)}")
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    if n == 0:
        return scores.clone()
    order = torch.argsort(scores, descending=True)
    flat = masks[order].reshape(n, -1).to(torch.float32)
    area = flat.sum(1)
    inter = flat @ flat.t()
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
    sorted_labels = labels[order]
    iou = torch.triu(iou, diagonal=1) * (sorted_labels[:, None] == sorted_labels[None, :])
    compensate = iou.max(0).values[:, None]  # row i: largest IoU of mask i with a higher one
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou.pow(2) - compensate.pow(2)))
    else:
        decay = (1 - iou) / (1 - compensate).clamp(min=1e-6)
    # Column j's entries with i >= j are f(0)/f(.) >= 1 and row 0 gives f(iou_0j) <= 1, so the
    # column minimum is the minimum over i < j (and 1 for the first mask).
    coefficient = decay.min(0).values
    out = torch.empty_like(scores)
    out[order] = scores[order] * coefficient.to(scores.dtype)
    return out


class MatrixNMS(nn.Module):
    """Module form of :func:`matrix_nms`."""

    def __init__(self, kernel: str = "gaussian", sigma: float = 2.0):
        super().__init__()
        self.kernel, self.sigma = kernel, sigma

    def forward(self, masks, labels, scores):
        return matrix_nms(masks, labels, scores, self.kernel, self.sigma)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def _check_boxes(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int | None, name: str):
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} boxes must be a (K, 4) tensor of xyxy pixels, got "
                         f"{getattr(boxes, 'shape', type(boxes).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (boxes.shape[0],):
        raise ValueError(f"{name} labels must be a ({boxes.shape[0]},) tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{name} boxes contain NaN or inf")
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"{name} box {k} {boxes[k].tolist()} is empty or degenerate "
                         "(need x2 > x1 and y2 > y1); drop it in the dataset")
    if labels.numel() and num_classes is not None:
        if labels.dtype.is_floating_point or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"{name} labels must be integers in [0, {num_classes}), got "
                             f"{labels.tolist()[:8]}")


def grid_targets(boxes: torch.Tensor, labels: torch.Tensor, image_size: tuple[int, int],
                 grid_sizes: Sequence[int], scale_ranges: Sequence[tuple[float, float]],
                 sigma: float = 0.2, background: int = -1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SOLOv2 grid assignment from boxes.

    An instance goes to every level whose ``(low, high)`` range holds ``sqrt(w h)`` of its
    box (bounds inclusive). On an ``S x S`` grid over the ``image_size = (H, W)`` input, its
    positive cells are those hit by the centre region (box centre, half-size ``sigma`` times
    the box half-size), limited to the 3 x 3 cells around the cell of the centre. Larger
    instances are written first so that a smaller one wins a shared cell.

    Args:
        boxes: ``(K, 4)`` xyxy in input pixels. labels: ``(K,)`` class indices.
    Returns:
        per level ``(category (S, S) int64 with `background` where negative,
        instance (S, S) int64 index into boxes, -1 where negative)``, on the CPU.
    """
    if len(grid_sizes) != len(scale_ranges):
        raise ValueError(f"grid_sizes ({len(grid_sizes)}) and scale_ranges ({len(scale_ranges)}) "
                         "must have one entry per level")
    _check_boxes(boxes, labels, None, "targets")
    height, width = image_size
    boxes = boxes.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu", torch.int64)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    scale = (w * h).sqrt()
    order = torch.argsort(w * h, descending=True, stable=True).tolist()
    out = []
    for s, (low, high) in zip(grid_sizes, scale_ranges):
        category = torch.full((s, s), background, dtype=torch.int64)
        instance = torch.full((s, s), -1, dtype=torch.int64)
        for k in order:
            if not (low <= float(scale[k]) <= high):
                continue
            x1, y1, x2, y2 = boxes[k].tolist()
            cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
            half_w, half_h = 0.5 * (x2 - x1) * sigma, 0.5 * (y2 - y1) * sigma

            def cell(v: float, extent: float) -> int:
                return min(max(int(math.floor(v / extent * s)), 0), s - 1)

            col, row = cell(cx, width), cell(cy, height)
            top = max(cell(cy - half_h, height), row - 1)
            bottom = min(cell(cy + half_h, height), row + 1)
            left = max(cell(cx - half_w, width), col - 1)
            right = min(cell(cx + half_w, width), col + 1)
            category[top:bottom + 1, left:right + 1] = labels[k]
            instance[top:bottom + 1, left:right + 1] = k
        out.append((category, instance))
    return out


def box_masks(boxes: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Filled box masks ``(K, 1, h, w)`` float {0, 1} on the grid of stride ``stride``.

    Pixel ``(y, x)`` covers input pixels ``[y s, (y+1) s)``; box edges are rounded to the
    nearest grid line and every box keeps at least one pixel.
    """
    h, w = size
    b = boxes.detach().to(torch.float32) / stride
    x1 = b[:, 0].round().clamp(0, w - 1)
    y1 = b[:, 1].round().clamp(0, h - 1)
    x2 = torch.maximum(b[:, 2].round().clamp(0, w), x1 + 1)
    y2 = torch.maximum(b[:, 3].round().clamp(0, h), y1 + 1)
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
    in_x = (xs[None] >= x1[:, None]) & (xs[None] < x2[:, None])
    in_y = (ys[None] >= y1[:, None]) & (ys[None] < y2[:, None])
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Network pieces
# ---------------------------------------------------------------------------------------------
def _group_norm(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else math.gcd(channels, 16)
    return nn.GroupNorm(groups, channels)


def _conv_gn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         _group_norm(out_channels), nn.ReLU(inplace=True))


def _coordinates(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` normalised x and y coordinates in [-1, 1] (CoordConv)."""
    b, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    return torch.cat([xs, ys], 1)


class _GridHead(nn.Module):
    """Category and kernel branches, shared by the pyramid levels (SOLOv2 Sec. 3.2)."""

    def __init__(self, in_channels: int, channels: int, convs: int, num_classes: int, kernel_dim: int):
        super().__init__()
        self.kernel_tower = nn.Sequential(*[_conv_gn_relu(in_channels + 2 if i == 0 else channels, channels)
                                            for i in range(convs)])
        self.category_tower = nn.Sequential(*[_conv_gn_relu(in_channels if i == 0 else channels, channels)
                                              for i in range(convs)])
        self.kernel_out = nn.Conv2d(channels, kernel_dim, 3, padding=1)
        self.category_out = nn.Conv2d(channels, num_classes, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.category_out.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feature: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([feature, _coordinates(feature)], 1)
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
        kernels = self.kernel_out(self.kernel_tower(x))
        categories = self.category_out(self.category_tower(x[:, :-2]))
        return categories, kernels


class _MaskFeatures(nn.Module):
    """Unified mask feature branch (SOLOv2 Sec. 3.2.2): every level is brought to the finest
    level's resolution by conv + 2x bilinear upsampling steps, summed, then a 1x1 conv. The
    coarsest level also receives the coordinate channels."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, num_levels: int):
        super().__init__()
        self.levels = nn.ModuleList()
        for i in range(num_levels):
            first_in = in_channels + (2 if i == num_levels - 1 and i > 0 else 0)
            steps = max(i, 1)
            self.levels.append(nn.ModuleList(
                _conv_gn_relu(first_in if j == 0 else channels, channels) for j in range(steps)))
        self.out = nn.Sequential(nn.Conv2d(channels, out_channels, 1, bias=False),
                                 _group_norm(out_channels), nn.ReLU(inplace=True))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        total = None
        for i, (convs, x) in enumerate(zip(self.levels, features)):
            if i == len(self.levels) - 1 and i > 0:
                x = torch.cat([x, _coordinates(x)], 1)
            for conv in convs:
                x = conv(x)
                if i > 0:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        return self.out(total)


def _dynamic_masks(kernels: torch.Tensor, image_index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Mask logits ``(N, 1, h, w)`` of ``N`` dynamic 1x1 kernels ``(N, E)`` applied to the mask
    features ``(B, E, h, w)`` of their images (``image_index`` ``(N,)``, non-decreasing as the
    targets loop builds it). One matrix product per image: gathering each kernel's feature
    map first would copy ``N x E x h x w`` values."""
    n = kernels.shape[0]
    b, e, h, w = features.shape
    flat = features.flatten(2)  # (B, E, h*w)
    index = image_index.to("cpu")
    if n > 1 and bool((index[1:] < index[:-1]).any()):
        order = torch.argsort(index, stable=True)
        out = _dynamic_masks(kernels[order.to(kernels.device)], index[order], features)
        return out[torch.argsort(order).to(out.device)]
    counts = torch.bincount(index, minlength=b).tolist()
    pieces = [k @ flat[i] for i, k in enumerate(torch.split(kernels, counts)) if counts[i]]
    return torch.cat(pieces).view(n, 1, h, w)


def _points_nms(heat: torch.Tensor) -> torch.Tensor:
    """Keep grid scores that are the maximum of their 2 x 2 neighbourhood (SOLO's point NMS)."""
    peak = F.max_pool2d(heat, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    return heat * (peak == heat)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
# Settings of the SOLOv2 R50 configuration the APro authors train (for GPU runs).
PAPER_SETTINGS = dict(
    backbone="resnet50", fpn_channels=256, head_channels=512, head_convs=4, mask_channels=256,
    mask_branch_channels=128, mask_stride=4, grid_sizes=(40, 36, 24, 16, 12),
    scale_ranges=((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)))


def _checked_loss_options(mask_loss: str, options) -> dict | None:
    """``loss_options`` checked at construction (:func:`apro.losses.registry.check_box_loss`)."""
    if options is None:
        return None
    try:
        return check_box_loss(mask_loss, options)
    except ValueError as err:
        raise ValueError(f"loss_options: {err}") from None


class SOLOv2(nn.Module):
    """SOLOv2 instance segmentation trained from boxes.

    Args:
        num_classes: number of object classes (contiguous ids ``0..num_classes-1``).
        backbone: "efficientnet_lite0" (default), "efficientnet_lite1", "efficientnet_lite2"
            (ImageNet weights bundled), "resnet50" or "resnet101" (weights from ``backbone_weights``).
        pretrained: load the backbone's ImageNet weights (EfficientNet-Lite0: bundled).
        backbone_weights: path of a local backbone checkpoint (torchvision format for ResNet).
        mask_loss: a name of ``apro.losses.BOX_MASK_LOSSES`` ("projection", "pairwise",
            "treefilter", "treefilter-local", "crf", "gp", "lp", "apro", "gp-lp-c", "lp-gp-c").
        fpn_channels, head_channels, head_convs: widths and depth of FPN and grid heads.
        mask_channels: dimension ``E`` of the unified mask features (= dynamic 1x1 kernel size).
        mask_branch_channels: width of the mask feature branch.
        mask_stride: 4 or 8, stride of the mask features (and of every mask loss).
        grid_sizes: ``S`` per grid level; level ``l`` reads pyramid level stride
            ``mask_stride * 2**l`` (extra levels by subsampling as for SOLOv2's P6).
        scale_ranges: ``(low, high)`` of ``sqrt(box area)`` in input pixels, per level.
        center_sigma: centre-region scale of the target assignment.
        focal_alpha, focal_gamma, category_weight, mask_weight: loss settings.
        score_threshold, mask_threshold, update_threshold, nms_pre, max_detections,
        nms_kernel, nms_sigma: inference settings (SOLOv2's test configuration by default).
        pairwise_warmup: training steps over which the mask loss's pairwise part (everything but
            the projection term) ramps linearly from 0 to its full weight, as BoxInst does; 0
            (default) applies it fully from the start. Steps are counted in the buffer
            ``training_step`` (saved in the state dict, so resuming continues the ramp).
        frozen_stages: backbone stem + that many stages (0..4) trained no further; 4 freezes
            the whole backbone (no backward through it: the cheapest CPU recipe). None keeps
            the backbone's default (EfficientNet-Lite: all trainable; ResNet: stem + stage 1).
        cache_backbone: with a frozen backbone (``frozen_stages=4``), keep each training
            image's backbone features (float16, in memory, keyed by the target's ``image_id``,
            ``size`` and ``flipped``) and reuse them when the image comes again: a frozen
            backbone's features of an image never change, and on a CPU they are half of a
            step. With ``frozen_stages`` 1..3 the frozen stages' features are cached and the
            trained stages run on them. Each image's features are computed on the image alone (padded to a multiple
            of 32) and zero-padded to the batch, so padding never changes them. Only valid when
            a dataset item is a function of those three keys (true of ``CocoBoxDataset``: no
            photometric augmentation). Not used at inference; not saved in checkpoints.
        cache_dir: with ``cache_backbone``, also keep those features in this folder (one file
            per image, size and flip; named by a hash of the backbone weights and the input
            pixels), so that later runs on the same images (the variants and seeds of an
            ablation) read them instead of computing them. About 1.9 MB per entry for
            EfficientNet-Lite0 at short sides 448-544 (measured on COCO person).
        loss_stride: None (the mask stride) or 4 with ``mask_stride`` 8: the mask logits are
            upsampled 2x (bilinear, pixel centres aligned) and every mask loss is computed at
            stride 4 on the image and boxes at stride 4, as CondInst and BoxInst compute their
            losses at ``mask_out_stride`` 4 from stride-8 logits. The released APro head's losses
            run at stride 4; this gives them that resolution without stride-4 features.
            Inference is unchanged (the stride-8 masks are upsampled to the image).
        level_loss_strides: None (every level's mask loss at ``loss_stride``) or one stride per
            grid level (4, 8, 16 or 32): the positives of level ``l`` have their mask logits
            bilinearly resized to that stride (as the released BoxSOLOv2 head resizes each
            level's masks to twice that level's feature size: strides 4, 4, 8, 16, 16 for its
            five levels) and their loss computed there, on the image average-pooled and the boxes
            rasterised at that stride, each level with its own trees. The loss is the mean over
            all positives, as with one stride. Inference is unchanged.
        loss_options: None (the released head's settings: GP ``zeta_gl`` 0.01 / ``zeta_gh``
            0.07, LP 5 x 5 with 20 steps, weights 2 / 1) or a dict overriding some of them,
            keys of ``apro.losses.registry.BOX_LOSS_OPTIONS`` (e.g. ``{"kernel_size": 3}``: the
            released LP assumes stride-4 masks; docs/instance.md measures it at stride 8).

    The defaults are a small CPU configuration; ``PAPER_SETTINGS`` holds the R50 one.
    """

    def __init__(self, num_classes: int, backbone: str = "efficientnet_lite0", pretrained: bool = True,
                 backbone_weights: str | None = None, mask_loss: str = "apro", *,
                 fpn_channels: int = 64, head_channels: int = 128, head_convs: int = 2,
                 mask_channels: int = 64, mask_branch_channels: int = 64, mask_stride: int = 8,
                 grid_sizes: Sequence[int] = (24, 16, 12, 8),
                 scale_ranges: Sequence[tuple[float, float]] = ((1, 64), (32, 128), (64, 256), (128, 4096)),
                 center_sigma: float = 0.2, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 category_weight: float = 1.0, mask_weight: float = 1.0,
                 score_threshold: float = 0.1, mask_threshold: float = 0.5, update_threshold: float = 0.05,
                 nms_pre: int = 500, max_detections: int = 100, nms_kernel: str = "gaussian",
                 nms_sigma: float = 2.0, pairwise_warmup: int = 0, frozen_stages: int | None = None,
                 cache_backbone: bool = False, cache_dir: str | None = None,
                 loss_stride: int | None = None, level_loss_strides: Sequence[int] | None = None,
                 loss_options: dict | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if mask_stride not in (4, 8):
            raise ValueError(f"mask_stride must be 4 or 8, got {mask_stride!r}")
        if loss_stride is None:
            loss_stride = mask_stride
        if isinstance(loss_stride, bool) or loss_stride not in (4, 8) or loss_stride > mask_stride:
            raise ValueError(f"loss_stride must be None or 4 or 8 and at most mask_stride={mask_stride}, "
                             f"got {loss_stride!r}")
        if len(grid_sizes) < 1 or len(grid_sizes) != len(scale_ranges):
            raise ValueError(f"grid_sizes and scale_ranges need one entry per level, got "
                             f"{len(grid_sizes)} and {len(scale_ranges)}")
        if level_loss_strides is not None:
            level_loss_strides = tuple(level_loss_strides)
            if len(level_loss_strides) != len(grid_sizes) or any(
                    isinstance(v, bool) or v not in (4, 8, 16, 32) for v in level_loss_strides):
                raise ValueError(f"level_loss_strides must be None or one of 4, 8, 16, 32 per grid level "
                                 f"({len(grid_sizes)} levels), got {level_loss_strides!r}")
        if nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel must be 'gaussian' or 'linear', got {nms_kernel!r}")
        if mask_loss not in BOX_MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {sorted(BOX_MASK_LOSSES)}, got {mask_loss!r}")
        self.num_classes = num_classes
        self.mask_loss = mask_loss
        self.loss_options = _checked_loss_options(mask_loss, loss_options)
        self.mask_stride = mask_stride
        self.loss_stride = loss_stride
        self.level_loss_strides = level_loss_strides
        self.grid_sizes = tuple(int(s) for s in grid_sizes)
        self.scale_ranges = tuple((float(a), float(b)) for a, b in scale_ranges)
        self.center_sigma = center_sigma
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.category_weight, self.mask_weight = category_weight, mask_weight
        self.score_threshold, self.mask_threshold = score_threshold, mask_threshold
        self.update_threshold, self.nms_pre, self.max_detections = update_threshold, nms_pre, max_detections
        self.nms_kernel, self.nms_sigma = nms_kernel, nms_sigma
        if isinstance(pairwise_warmup, bool) or not isinstance(pairwise_warmup, int) or pairwise_warmup < 0:
            raise ValueError(f"pairwise_warmup must be an integer >= 0, got {pairwise_warmup!r}")
        self.pairwise_warmup = pairwise_warmup
        self.register_buffer("training_step", torch.zeros((), dtype=torch.int64))

        self.backbone = build_backbone(backbone, pretrained=pretrained, weights=backbone_weights,
                                       frozen_stages=frozen_stages)
        self.cache_backbone = check_cacheable(self.backbone, cache_backbone, frozen_stages)
        self._feature_cache: dict = {}
        self._feature_folder = check_cache_dir(cache_dir, self.cache_backbone)
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1), persistent=False)
        self._first_level = {4: 0, 8: 1}[mask_stride]
        in_channels = self.backbone.out_channels[self._first_level:]
        num_levels = len(in_channels)
        self.fpn = FPN(in_channels, fpn_channels, extra_levels=max(0, len(self.grid_sizes) - num_levels))
        self.mask_features = _MaskFeatures(fpn_channels, mask_branch_channels, mask_channels, num_levels)
        self.head = _GridHead(fpn_channels, head_channels, head_convs, num_classes, mask_channels)
        # Stride used by the small-mask filter, as SOLOv2 (P2 taken at stride 8, P6 at 32).
        self.level_strides = tuple(min(max(mask_stride * 2 ** i, 8), 32) for i in range(len(self.grid_sizes)))

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None,
                targets: list[dict] | None = None):
        """Run the model.

        Args:
            images: ``(B, 3, H, W)`` RGB in [0, 1], ``H`` and ``W`` multiples of 32.
            valid: optional ``(B, 1, H, W)`` (or ``(B, H, W)``) mask of the non-padded pixels;
                detections are cut to it.
            targets: per image dict with "boxes" ``(K, 4)`` xyxy pixels and "labels" ``(K,)``.
        Returns:
            with targets: dict of loss tensors — "loss" (the total to backpropagate) =
            "loss_category" + "loss_mask"; plus, for logging only (detached), "mask_<term>"
            for each (unramped) term of the mask loss, "num_positives", and "pairwise_ramp"
            when ``pairwise_warmup`` is set.
            without: per image dict(masks ``(K, H, W)`` bool, labels ``(K,)`` int64, scores ``(K,)``).
        """
        valid = check_forward_inputs(images, valid, targets)
        categories, kernels, mask_features = self._heads(images, targets)
        if targets is not None:
            return self._losses(images, categories, kernels, mask_features, targets)
        return self._inference(categories, kernels, mask_features, tuple(images.shape[-2:]), valid)

    @torch.no_grad()
    def predict_thresholds(self, images: torch.Tensor, valid: torch.Tensor | None = None,
                           mask_thresholds: Sequence[float] = (0.5,)) -> list[list[dict]]:
        """Detections at several test mask thresholds from one forward pass.

        The network's outputs do not depend on ``mask_threshold`` (it only binarises the soft
        masks before matrix NMS and at the end), so a threshold scan needs one forward pass
        per image, not one per threshold. Returns, per threshold in order, what
        ``forward(images, valid)`` returns with ``mask_threshold`` set to it.
        """
        valid = check_forward_inputs(images, valid, None)
        thresholds = [check_threshold(t, "mask_thresholds") for t in mask_thresholds]
        categories, kernels, mask_features = self._heads(images, None)
        size = tuple(images.shape[-2:])
        return [self._inference(categories, kernels, mask_features, size, valid, t) for t in thresholds]

    def _heads(self, images, targets):
        """Grid-head outputs (category scores and kernels per level) and the mask features."""
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        if self.cache_backbone and self.training and targets is not None:
            features = self._cached_features(x, targets)
        else:
            features = self.backbone(x)
        features = features[self._first_level:]
        pyramid = self.fpn(features)
        mask_features = self.mask_features(pyramid[:len(features)])
        categories, kernels = [], []
        for level, grid in enumerate(self.grid_sizes):
            c, k = self.head(pyramid[level], grid)
            categories.append(c)
            kernels.append(k)
        return categories, kernels, mask_features

    def _cached_features(self, x: torch.Tensor, targets) -> list[torch.Tensor]:
        """Backbone features of the batch ``x`` from the per-image cache (see ``cache_backbone``)."""
        return cached_backbone_features(self.backbone, x, targets, self._feature_cache, self._feature_folder)

    # -- training -------------------------------------------------------------------------------
    def _losses(self, images, categories, kernels, mask_features, targets):
        batch, _, height, width = images.shape
        device = images.device
        category_targets = [torch.full((batch, s, s), self.num_classes, dtype=torch.int64)
                            for s in self.grid_sizes]
        positive_kernels, positive_image, positive_boxes, positive_level = [], [], [], []
        for b, target in enumerate(targets):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"targets[{b}] must be a dict with 'boxes' (K, 4) and 'labels' (K,)")
            boxes, labels = target["boxes"], target["labels"]
            _check_boxes(boxes, labels, self.num_classes, f"targets[{b}]")
            levels = grid_targets(boxes, labels, (height, width), self.grid_sizes, self.scale_ranges,
                                  self.center_sigma, background=self.num_classes)
            for level, (category, instance) in enumerate(levels):
                category_targets[level][b] = category
                positive = (instance >= 0).flatten().nonzero().squeeze(1)
                if positive.numel() == 0:
                    continue
                cells = kernels[level][b].flatten(1)  # (E, S*S)
                positive_kernels.append(cells[:, positive.to(device)].t())
                positive_image.append(torch.full((positive.numel(),), b, dtype=torch.int64))
                positive_boxes.append(boxes.detach().to(device, torch.float32)[instance.flatten()[positive].to(device)])
                positive_level.append(torch.full((positive.numel(),), level, dtype=torch.int64))

        # Category branch: focal loss over every cell and class, normalised by #positives + 1.
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, self.num_classes) for c in categories])
        labels = torch.cat([t.reshape(-1) for t in category_targets]).to(device)
        one_hot = F.one_hot(labels, self.num_classes + 1)[:, :self.num_classes].to(logits.dtype)
        num_positives = int((labels < self.num_classes).sum())
        loss_category = sigmoid_focal_loss(logits, one_hot, self.focal_alpha, self.focal_gamma, "sum")
        loss_category = loss_category / (num_positives + 1)

        out: dict[str, torch.Tensor] = {}
        if positive_kernels:
            kernels_p = torch.cat(positive_kernels)
            image_index = torch.cat(positive_image)
            boxes_p = torch.cat(positive_boxes)
            mask_logits = _dynamic_masks(kernels_p, image_index, mask_features)
            if self.level_loss_strides is None:
                loss_mask, terms = self._mask_loss_at(self.loss_stride, mask_logits, image_index, boxes_p, images)
            else:  # each level's positives at its own stride; the mean over all positives
                level_p = torch.cat(positive_level)
                strides_p = torch.tensor(self.level_loss_strides)[level_p]
                loss_mask, terms, total = 0.0, {}, float(level_p.numel())
                for stride in sorted(set(strides_p.tolist())):
                    chosen = (strides_p == stride).nonzero().squeeze(1)
                    share = chosen.numel() / total
                    loss_s, terms_s = self._mask_loss_at(stride, mask_logits[chosen.to(device)], image_index[chosen],
                                                         boxes_p[chosen.to(device)], images)
                    loss_mask = loss_mask + share * loss_s
                    for name, value in terms_s.items():
                        terms[name] = terms.get(name, 0.0) + share * float(value)
        else:
            # No object: an exact zero that keeps every parameter in the graph (DDP) and reports
            # the same terms (the losses give zero for an instance with an empty box).
            upsample = self.mask_stride // self.loss_stride
            mask_h, mask_w = (n * upsample for n in mask_features.shape[-2:])
            small = F.avg_pool2d(images, self.loss_stride)
            untouched = sum(k.sum() for k in kernels) + mask_features.sum()
            dummy = (0.0 * untouched).expand(1, 1, mask_h, mask_w)
            loss_mask, terms = box_mask_loss(self.mask_loss, dummy, torch.zeros_like(dummy), small[:1],
                                             return_terms=True, options=self.loss_options)
            loss_mask = loss_mask + 0.0 * untouched
        for name, value in terms.items():
            if name != "total":
                out[f"mask_{name}"] = torch.tensor(float(value), device=device)
        loss_category = self.category_weight * loss_category
        loss_mask = self.mask_weight * loss_mask
        out.update(loss=loss_category + loss_mask, loss_category=loss_category, loss_mask=loss_mask,
                   num_positives=torch.tensor(float(num_positives), device=device))
        if self.pairwise_warmup:
            out["pairwise_ramp"] = torch.tensor(self._pairwise_ramp(), device=device)
        if self.training:
            self.training_step += 1
        return out

    def _mask_loss_at(self, stride: int, mask_logits, image_index, boxes, images):
        """The mask loss of positives whose ``(P, 1, h, w)`` logits are at ``self.mask_stride``,
        computed at ``stride``: logits resized bilinearly (pixel centres kept), image
        average-pooled and boxes rasterised at that stride. Returns ``(loss, terms)``."""
        if stride != self.mask_stride:  # align_corners=False keeps the pixel centres (8i + 3.5 = 4j + 1.5)
            size = tuple(n * self.mask_stride // stride for n in mask_logits.shape[-2:])
            mask_logits = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
        small = F.avg_pool2d(images, stride)  # RGB [0, 1] at the losses' resolution
        targets_p = box_masks(boxes, tuple(mask_logits.shape[-2:]), stride)
        tree = None
        if self.mask_loss in _TREE_LOSSES:
            tree = minimum_spanning_tree(tree_guide(self.mask_loss, small)).select(image_index)
        loss_mask, terms = box_mask_loss(self.mask_loss, mask_logits, targets_p, small[image_index.to(images.device)],
                                         tree=tree, return_terms=True, options=self.loss_options)
        ramp = self._pairwise_ramp()
        if ramp < 1.0 and self.mask_loss != "projection":
            weight = (self.loss_options or {}).get("projection_weight", PROJECTION_WEIGHT)
            projection = weight * box_projection_loss(mask_logits, targets_p)
            loss_mask = projection + ramp * (loss_mask - projection)
        return loss_mask, terms

    def _pairwise_ramp(self) -> float:
        if self.pairwise_warmup == 0:
            return 1.0
        return min(1.0, float(self.training_step) / self.pairwise_warmup)

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def _inference(self, categories, kernels, mask_features, size, valid, mask_threshold=None):
        results = []
        for b in range(mask_features.shape[0]):
            scores = torch.cat([_points_nms(torch.sigmoid(c[b:b + 1]))[0].permute(1, 2, 0).reshape(-1, self.num_classes)
                                for c in categories])
            cell_kernels = torch.cat([k[b].permute(1, 2, 0).reshape(-1, k.shape[1]) for k in kernels])
            strides = torch.cat([torch.full((s * s,), float(st), device=scores.device)
                                 for s, st in zip(self.grid_sizes, self.level_strides)])
            results.append(self._detect(scores, cell_kernels, strides, mask_features[b], size,
                                        None if valid is None else valid[b, 0] > 0.5,
                                        self.mask_threshold if mask_threshold is None else mask_threshold))
        return results

    def _detect(self, scores, cell_kernels, strides, features, size, valid, mask_threshold):
        device = features.device
        empty = dict(masks=torch.zeros((0,) + tuple(size), dtype=torch.bool, device=device),
                     labels=torch.zeros(0, dtype=torch.int64, device=device),
                     scores=torch.zeros(0, dtype=scores.dtype, device=device))
        cell, label = (scores > self.score_threshold).nonzero(as_tuple=True)
        if cell.numel() == 0:
            return empty
        score = scores[cell, label]
        mask_h, mask_w = features.shape[-2:]
        soft = torch.sigmoid(cell_kernels[cell] @ features.flatten(1)).view(-1, mask_h, mask_w)
        binary = soft > mask_threshold
        area = binary.flatten(1).sum(1).to(soft.dtype)
        # SOLOv2 drops masks with fewer stride-4 pixels than the level stride; same area here.
        keep = area * self.mask_stride ** 2 > strides[cell] * 16
        if not bool(keep.any()):
            return empty
        soft, binary, area, score, label = soft[keep], binary[keep], area[keep], score[keep], label[keep]
        score = score * (soft * binary).flatten(1).sum(1) / area  # "maskness"
        order = torch.argsort(score, descending=True)[: self.nms_pre]
        soft, binary, score, label = soft[order], binary[order], score[order], label[order]
        score = matrix_nms(binary, label, score, self.nms_kernel, self.nms_sigma)
        keep = score >= self.update_threshold
        soft, score, label = soft[keep], score[keep], label[keep]
        order = torch.argsort(score, descending=True)[: self.max_detections]
        soft, score, label = soft[order], score[order], label[order]
        if score.numel() == 0:
            return empty
        masks = F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0] > mask_threshold
        if valid is not None:
            masks = masks & valid
        return dict(masks=masks, labels=label, scores=score)
