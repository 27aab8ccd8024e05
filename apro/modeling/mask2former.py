"""Mask2Former (Cheng et al., CVPR 2022) trained from boxes, as APro's second base network (paper Table 1).

The query-based head of the released Box2Mask / APro Mask2Former models, in plain PyTorch and
sized for a CPU:

- **Pixel decoder**: an FPN (:class:`apro.modeling.FPN`) over the backbone's features from the
  mask stride (4 or 8) to stride 32, instead of Mask2Former's multi-scale deformable-attention
  encoder (which needs a custom CUDA kernel). Its finest level gives the per-pixel mask
  embeddings (3x3 conv, GroupNorm, ReLU, 1x1 conv to ``mask_dim``); its three coarsest levels
  (strides 32, 16, 8) are the memory the queries attend to, round-robin, one level per layer,
  each with a sine position encoding and a learnt level embedding.
- **Transformer decoder with masked attention**: ``num_queries`` learnt queries; each layer is
  masked cross-attention (a query sees only the pixels where its previous mask prediction is
  above 0.5; a query that would see nothing sees everything), then self-attention, then an
  FFN, each with a residual and post-LayerNorm, as in Mask2Former.
- **Heads**: after a shared LayerNorm, a linear classifier over ``num_classes + 1`` (the last
  is "no object") and a 3-layer MLP giving the mask embedding; a query's mask logits are the
  dot products of its embedding with the per-pixel embeddings.

Training from boxes (SPEC §4, released Mask2Former head): predictions are made before the
first layer and after every layer; each of those ``decoder_layers + 1`` sets is matched to the
image's boxes by :class:`~apro.modeling.matcher.HungarianMatcher` (class cost + box projection
cost) and gets its own loss (deep supervision): cross-entropy over the queries (no-object class
weighted 0.1) plus the mask loss of the matched queries against the filled boxes, through the
same ``mask_loss`` names as SOLOv2 (``apro.losses.BOX_MASK_LOSSES``) with this head's settings:
projection weight 5.0, GP on a fixed 96 x 96 grid with ``zeta_gl = 0.025`` and
``zeta_gh = 0.03`` (result resized back), LP at mask resolution, the GP/LP (and tree-filter)
terms summed over all matched instances of the batch and divided by their total box area.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..losses import BOX_MASK_LOSSES, box_mask_loss, tree_guide
from ..losses.registry import check_box_loss
from ..tree import minimum_spanning_tree
from ._feature_cache import cached_backbone_features, check_cache_dir, check_cacheable
from ._inputs import check_forward_inputs
from .backbones import build_backbone
from .fpn import FPN
from .matcher import HungarianMatcher
from .solov2 import _check_boxes, _coordinates, box_masks

# Losses whose pairwise term runs on the image's spanning tree: built once per image and step,
# shared by every decoder layer and every instance of the image.
_GP_LOSSES = frozenset({"gp", "apro", "gp-lp-c", "lp-gp-c"})
_TREE_FILTER_LOSSES = frozenset({"treefilter", "treefilter-local"})

NUM_FEATURE_LEVELS = 3  # memory levels the decoder cycles through (strides 32, 16, 8)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
def sine_position_encoding(height: int, width: int, dim: int, temperature: float = 10000.0,
                           device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR's 2-D sine position encoding, ``(height * width, dim)`` (row-major pixels).

    The first ``dim / 2`` channels encode y, the others x, each as interleaved sin/cos of the
    coordinate (normalised to ``(0, 2 pi]``) at geometric frequencies. ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    half = dim // 2
    scale = 2 * math.pi
    ys = torch.arange(1, height + 1, device=device, dtype=torch.float32) / height * scale
    xs = torch.arange(1, width + 1, device=device, dtype=torch.float32) / width * scale
    k = torch.arange(half, device=device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / half)

    def encode(v):
        a = v[:, None] / freq
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)  # (n, half)

    pos_y = encode(ys)[:, None, :].expand(height, width, half)
    pos_x = encode(xs)[None, :, :].expand(height, width, half)
    return torch.cat([pos_y, pos_x], dim=2).reshape(height * width, dim).to(dtype)


def attention_mask(mask_logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Mask2Former's masked-attention mask: where each query may *not* look.

    Args:
        mask_logits: ``(B, Q, h, w)`` the previous layer's mask logits.
        size: ``(H', W')`` grid of the memory level the next layer attends to.
        threshold: a pixel is visible where ``sigmoid`` of the bilinearly resized logits is
            >= ``threshold``.
    Returns:
        ``(B, Q, H' * W')`` bool, True = blocked. A query whose every pixel would be blocked
        gets an all-False row (it attends everywhere), so attention never sees an empty set.
    """
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must have shape (B, Q, h, w), got {tuple(mask_logits.shape)}")
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    blocked = resized.sigmoid().flatten(2) < threshold
    return blocked & ~blocked.all(-1, keepdim=True)


class DecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; residual + LayerNorm after each (Mask2Former)."""

    def __init__(self, dim: int, heads: int, feedforward: int):
        super().__init__()
        self.heads = heads
        self.cross_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, feedforward), nn.ReLU(inplace=True), nn.Linear(feedforward, dim))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """``queries`` ``(B, Q, D)``, ``query_pos`` ``(Q, D)``, ``memory`` ``(B, S, D)``,
        ``memory_pos`` ``(S, D)``, ``blocked`` ``(B, Q, S)`` bool (True = not attended) -> ``(B, Q, D)``."""
        mask = None
        if blocked is not None:
            mask = blocked.repeat_interleave(self.heads, dim=0)  # (B * heads, Q, S), batch-major
        attended = self.cross_attention(queries + query_pos, memory + memory_pos, memory,
                                        attn_mask=mask, need_weights=False)[0]
        queries = self.norm_cross(queries + attended)
        q = queries + query_pos
        queries = self.norm_self(queries + self.self_attention(q, q, queries, need_weights=False)[0])
        return self.norm_ffn(queries + self.ffn(queries))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int, layers: int):
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else math.gcd(channels, 16), channels)


class PixelDecoder(nn.Module):
    """FPN over backbone features (finest = mask stride); returns the per-pixel mask embeddings
    ``(B, mask_dim, H / s, W / s)`` and the ``NUM_FEATURE_LEVELS`` coarsest FPN maps, coarsest first.

    ``coordinates``: the mask head also reads two channels of normalised x, y coordinates
    (SOLOv2's CoordConv). Convolutions alone are translation-equivariant, so without them a
    query's embedding matches every pixel that looks like its object, and one mask covers
    several similar people; Mask2Former's deformable-attention encoder, which this FPN
    replaces, makes its features position-aware through position encodings.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, mask_dim: int, coordinates: bool = True):
        super().__init__()
        if len(in_channels) < NUM_FEATURE_LEVELS:
            raise ValueError(f"the pixel decoder needs >= {NUM_FEATURE_LEVELS} feature levels, got {len(in_channels)}")
        self.coordinates = bool(coordinates)
        self.fpn = FPN(in_channels, channels, extra_levels=0)
        self.mask_head = nn.Sequential(
            nn.Conv2d(channels + 2 * self.coordinates, channels, 3, padding=1, bias=False), _group_norm(channels),
            nn.ReLU(inplace=True), nn.Conv2d(channels, mask_dim, 1))
        for m in self.mask_head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pyramid = self.fpn(features)
        finest = pyramid[0]
        if self.coordinates:
            finest = torch.cat([finest, _coordinates(finest)], 1)
        return self.mask_head(finest), pyramid[::-1][:NUM_FEATURE_LEVELS]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class Mask2Former(nn.Module):
    """Query-based instance segmentation trained from boxes (Box2Mask / APro's Mask2Former head).

    Args:
        num_classes: object classes (contiguous ids ``0..num_classes-1``).
        backbone, pretrained, backbone_weights: as :class:`~apro.modeling.SOLOv2`.
        mask_loss: a name of ``apro.losses.BOX_MASK_LOSSES`` (the ``--mask-loss`` switch).
        hidden_dim: width of the queries, the FPN and the attention (even).
        num_queries: number of learnt queries (Mask2Former: 100; 50 here).
        num_heads: attention heads (divides ``hidden_dim``).
        feedforward_dim: FFN width of the decoder layers.
        decoder_layers: number of decoder layers ``L`` (Mask2Former: 9); ``L + 1`` prediction
            sets are supervised.
        mask_dim: dimension of the mask embeddings.
        mask_stride: 4 or 8, stride of the mask logits (and of every mask loss).
        class_weight: weight of the cross-entropy (Mask2Former: 2.0).
        no_object_weight: weight of the "no object" class in the cross-entropy (0.1).
        mask_weight: weight of the whole mask loss (its terms carry their own weights).
        match_class_weight, match_projection_weight: costs of the matcher (2.0, 5.0).
        projection_weight: weight of the box projection loss (released Mask2Former head: 5.0).
        gp_size: fixed grid of GP (96); None runs GP at mask resolution.
        zeta_gl, zeta_gh: GP's two stages (released Mask2Former head: 0.02-0.03 and 0.03).
        zeta_s, lp_kernel_size, lp_iterations: LP (0.15, 5, 20), at mask resolution.
        global_weight, local_weight: GP and LP term weights (2.0, 1.0).
        normalization: "total" (released Mask2Former head: GP/LP terms summed over all matched
            instances of the batch, divided by their total box area) or "instance".
        mask_threshold: binarisation of the predicted masks (0.5), also the visibility
            threshold of masked attention.
        max_detections: detections kept per image (top class scores over queries x classes).
        score_threshold: detections below this final score are dropped.
        freeze_backbone: train everything but the backbone (its ImageNet weights stay fixed);
            the same as ``frozen_stages=4``.
        frozen_stages: backbone stem + that many stages (0..4) get no gradient
            (:func:`apro.modeling.backbones.freeze_stages`); None keeps the backbone's default.
        coord_features: give the mask head normalised x, y coordinate channels (default; see
            :class:`PixelDecoder`). False is the plain FPN of checkpoints made before the option.
        cache_backbone: with a frozen backbone prefix (``frozen_stages`` 1..4), reuse each
            training image's features of the frozen stages (as :class:`~apro.modeling.SOLOv2`'s option of that name: float16, in memory,
            keyed by the target's ``image_id``, ``size`` and ``flipped``; not used at inference).
        cache_dir: with ``cache_backbone``, also keep those features in this folder for later
            runs (as :class:`~apro.modeling.SOLOv2`'s option of that name).

    The defaults are a small CPU configuration.
    """

    def __init__(self, num_classes: int, backbone: str = "efficientnet_lite0", pretrained: bool = True,
                 backbone_weights: str | None = None, mask_loss: str = "apro", *,
                 hidden_dim: int = 64, num_queries: int = 50, num_heads: int = 4, feedforward_dim: int = 256,
                 decoder_layers: int = 3, mask_dim: int = 64, mask_stride: int = 4,
                 class_weight: float = 2.0, no_object_weight: float = 0.1, mask_weight: float = 1.0,
                 match_class_weight: float = 2.0, match_projection_weight: float = 5.0,
                 projection_weight: float = 5.0, gp_size: int | None = 96, zeta_gl: float = 0.025,
                 zeta_gh: float = 0.03, zeta_s: float = 0.15, lp_kernel_size: int = 5, lp_iterations: int = 20,
                 global_weight: float = 2.0, local_weight: float = 1.0, normalization: str = "total",
                 mask_threshold: float = 0.5, max_detections: int = 50, score_threshold: float = 0.0,
                 freeze_backbone: bool = False, frozen_stages: int | None = None,
                 cache_backbone: bool = False, coord_features: bool = True, cache_dir: str | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if mask_loss not in BOX_MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {sorted(BOX_MASK_LOSSES)}, got {mask_loss!r}")
        if mask_stride not in (4, 8):
            raise ValueError(f"mask_stride must be 4 or 8, got {mask_stride!r}")
        for name, value in (("hidden_dim", hidden_dim), ("num_queries", num_queries), ("num_heads", num_heads),
                            ("feedforward_dim", feedforward_dim), ("mask_dim", mask_dim),
                            ("max_detections", max_detections)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(decoder_layers, bool) or not isinstance(decoder_layers, int) or decoder_layers < 1:
            raise ValueError(f"decoder_layers must be an integer >= 1, got {decoder_layers!r}")
        if hidden_dim % 2 or hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be even and divisible by num_heads ({num_heads})")
        if not 0 < mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold!r}")
        self.num_classes = num_classes
        self.mask_loss = mask_loss
        self.mask_stride = mask_stride
        self.num_queries = num_queries
        self.class_weight, self.mask_weight = float(class_weight), float(mask_weight)
        self.mask_threshold = float(mask_threshold)
        self.max_detections, self.score_threshold = max_detections, float(score_threshold)
        self.gp_size = None if gp_size is None else (int(gp_size), int(gp_size))
        self.loss_options = dict(projection_weight=projection_weight, normalization=normalization,
                                 gp_size=self.gp_size, zeta_gl=zeta_gl, zeta_gh=zeta_gh, zeta_s=zeta_s,
                                 kernel_size=lp_kernel_size, iterations=lp_iterations,
                                 global_weight=global_weight, local_weight=local_weight)
        try:
            check_box_loss(mask_loss, self.loss_options)
        except ValueError as err:  # lp_kernel_size and lp_iterations are kernel_size and iterations there
            raise ValueError(f"mask loss settings: {err}") from None
        self.matcher = HungarianMatcher(match_class_weight, match_projection_weight)
        weights = torch.ones(num_classes + 1)
        weights[-1] = float(no_object_weight)
        self.register_buffer("class_weights", weights, persistent=False)

        if freeze_backbone:
            if frozen_stages not in (None, 4):
                raise ValueError(f"freeze_backbone=True freezes all stages; got frozen_stages={frozen_stages!r}")
            frozen_stages = 4
        self.backbone = build_backbone(backbone, pretrained=pretrained, weights=backbone_weights,
                                       frozen_stages=frozen_stages)
        self.cache_backbone = check_cacheable(self.backbone, cache_backbone, frozen_stages)
        self._feature_cache: dict = {}
        self._feature_folder = check_cache_dir(cache_dir, self.cache_backbone)
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1), persistent=False)
        self._first_level = {4: 0, 8: 1}[mask_stride]
        self.pixel_decoder = PixelDecoder(self.backbone.out_channels[self._first_level:], hidden_dim, mask_dim,
                                          coordinates=coord_features)
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, feedforward_dim) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = _MLP(hidden_dim, hidden_dim, mask_dim, 3)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None,
                targets: list[dict] | None = None):
        """Run the model (the interface of :class:`~apro.modeling.SOLOv2`).

        Args:
            images: ``(B, 3, H, W)`` RGB in [0, 1], ``H`` and ``W`` multiples of 32.
            valid: optional ``(B, 1, H, W)`` (or ``(B, H, W)``) mask of non-padded pixels.
            targets: per image dict with "boxes" ``(K, 4)`` xyxy pixels and "labels" ``(K,)``.
        Returns:
            with targets: dict of loss tensors — "loss" (sum over the ``L + 1`` prediction sets of
            ``class_weight * CE + mask_weight * mask loss``), "loss_class", "loss_mask", and
            detached for the log: "loss_layer<i>" per prediction set, "mask_<term>" (each mask
            loss term of the last set), "num_matched".
            without: per image dict(masks ``(K, H, W)`` bool, labels ``(K,)`` int64, scores ``(K,)``).
        """
        valid = check_forward_inputs(images, valid, targets)
        batch, _, height, width = images.shape
        predictions, mask_features = self.predict_sets(images, targets if self.training else None)
        if targets is not None:
            return self._losses(images, predictions, mask_features, targets)
        return self._inference(predictions[-1], (height, width), valid)

    def predict_sets(self, images: torch.Tensor, targets: list[dict] | None = None
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Class and mask logits before the first decoder layer and after each one.

        ``targets`` (training only) key the backbone feature cache when ``cache_backbone`` is set.

        Returns ``([(class_logits (B, Q, C + 1), mask_logits (B, Q, H / s, W / s))] * (L + 1),
        mask_features (B, mask_dim, H / s, W / s))``.
        """
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        if self.cache_backbone and targets is not None:
            features = cached_backbone_features(self.backbone, x, targets, self._feature_cache,
                                                self._feature_folder)
        else:
            features = self.backbone(x)
        features = features[self._first_level:]
        mask_features, levels = self.pixel_decoder(features)
        used = min(len(self.layers), NUM_FEATURE_LEVELS)
        if used < len(levels):  # levels no layer reads stay in the graph (DDP needs every gradient)
            mask_features = mask_features + sum(0.0 * level.mean() for level in levels[used:])
        memory, memory_pos, sizes = [], [], []
        for i, level in enumerate(levels[:used]):
            h, w = level.shape[-2:]
            memory.append(level.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            memory_pos.append(sine_position_encoding(h, w, level.shape[1], device=level.device, dtype=level.dtype))
            sizes.append((h, w))
        batch = images.shape[0]
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_pos.weight
        out = [self._heads(queries, mask_features)]
        for i, layer in enumerate(self.layers):
            level = i % NUM_FEATURE_LEVELS
            blocked = attention_mask(out[-1][1], sizes[level], self.mask_threshold)
            queries = layer(queries, query_pos, memory[level], memory_pos[level], blocked)
            out.append(self._heads(queries, mask_features))
        return out, mask_features

    def _heads(self, queries, mask_features):
        q = self.decoder_norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        return self.class_embed(q), masks

    # -- training -------------------------------------------------------------------------------
    def _losses(self, images, predictions, mask_features, targets):
        device = images.device
        mask_h, mask_w = mask_features.shape[-2:]
        small = F.avg_pool2d(images, self.mask_stride)  # RGB [0, 1] at mask resolution
        labels, boxes = [], []
        for b, target in enumerate(targets):
            if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
                raise ValueError(f"targets[{b}] must be a dict with 'boxes' (K, 4) and 'labels' (K,)")
            _check_boxes(target["boxes"], target["labels"], self.num_classes, f"targets[{b}]")
            labels.append(target["labels"].to(device, torch.int64))
            boxes.append(box_masks(target["boxes"].to(device), (mask_h, mask_w), self.mask_stride)[:, 0])
        total_objects = sum(int(lab.numel()) for lab in labels)
        trees = self._trees(small) if total_objects else None

        out: dict[str, torch.Tensor] = {}
        loss_class = loss_mask = 0.0
        for i, (class_logits, mask_logits) in enumerate(predictions):
            matches = self.matcher(class_logits, mask_logits, labels, boxes)
            class_targets = torch.full(class_logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
            for b, (query, obj) in enumerate(matches):
                class_targets[b, query.to(device)] = labels[b][obj.to(device)]
            ce = F.cross_entropy(class_logits.transpose(1, 2).float(), class_targets,
                                 weight=self.class_weights.float())
            mask, terms = self._mask_loss(mask_logits, matches, boxes, small, trees)
            layer_loss = self.class_weight * ce + self.mask_weight * mask
            loss_class = loss_class + self.class_weight * ce
            loss_mask = loss_mask + self.mask_weight * mask
            out[f"loss_layer{i}"] = layer_loss.detach()
        for name, value in terms.items():
            if name != "total":
                out[f"mask_{name}"] = torch.tensor(float(value), device=device)
        out.update(loss=loss_class + loss_mask, loss_class=loss_class, loss_mask=loss_mask,
                   num_matched=torch.tensor(float(total_objects), device=device))
        return out

    def _trees(self, small):
        """One spanning tree per image of the guide the mask loss reads (GP grid or mask grid)."""
        if self.mask_loss in _GP_LOSSES:
            guide = tree_guide(self.mask_loss, small)
            if self.gp_size is not None:
                guide = F.interpolate(guide, size=self.gp_size, mode="bilinear", align_corners=False)
            return minimum_spanning_tree(guide)
        if self.mask_loss in _TREE_FILTER_LOSSES:
            return minimum_spanning_tree(tree_guide(self.mask_loss, small))
        return None

    def _mask_loss(self, mask_logits, matches, boxes, small, trees):
        picked, targets, index = [], [], []
        for b, (query, obj) in enumerate(matches):
            if query.numel():
                picked.append(mask_logits[b, query.to(mask_logits.device)])
                targets.append(boxes[b][obj.to(mask_logits.device)])
                index.append(torch.full((query.numel(),), b, dtype=torch.int64))
        if not picked:
            # no object in the batch: an exact zero keeping every mask parameter in the graph (DDP)
            dummy = (0.0 * mask_logits.sum()).expand(1, 1, *mask_logits.shape[-2:])
            loss, terms = box_mask_loss(self.mask_loss, dummy, torch.zeros_like(dummy), small[:1],
                                        return_terms=True, options=self.loss_options)
            return loss + 0.0 * mask_logits.sum(), terms
        index = torch.cat(index)
        logits = torch.cat(picked).unsqueeze(1)
        target = torch.cat(targets).unsqueeze(1)
        tree = None if trees is None else trees.select(index)
        return box_mask_loss(self.mask_loss, logits, target, small[index.to(small.device)], tree=tree,
                             return_terms=True, options=self.loss_options)

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def _inference(self, prediction, size, valid):
        class_logits, mask_logits = prediction
        results = []
        for b in range(class_logits.shape[0]):
            scores = class_logits[b].float().softmax(-1)[:, :-1]  # (Q, C)
            k = min(self.max_detections, scores.numel())
            top, flat = scores.flatten().topk(k)
            query = torch.div(flat, self.num_classes, rounding_mode="floor")
            label = flat % self.num_classes
            soft = F.interpolate(mask_logits[b, query][None].float(), size=size, mode="bilinear",
                                 align_corners=False)[0].sigmoid()
            binary = soft > self.mask_threshold
            if valid is not None:
                binary = binary & (valid[b, 0] > 0.5)
            area = binary.flatten(1).sum(1)
            maskness = (soft * binary).flatten(1).sum(1) / area.clamp(min=1)
            score = top * maskness
            keep = (area > 0) & (score > self.score_threshold)
            order = torch.argsort(score[keep], descending=True)
            results.append(dict(masks=binary[keep][order], labels=label[keep][order], scores=score[keep][order]))
        return results
