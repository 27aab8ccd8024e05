"""Per-image cache of a frozen backbone's features (the ``cache_backbone`` option of the box models).

A wholly frozen backbone gives an image the same features at every step, and on a CPU they are
a third to a half of a training step. Each image's features are computed on the image alone
(padded to a multiple of 32) and zero-padded to the batch, so batch padding never changes them.
"""
from __future__ import annotations

import torch

from .backbones import STRIDES


def check_cacheable(backbone, cache_backbone: bool, frozen_stages) -> bool:
    """``cache_backbone`` as a bool, refused unless the whole backbone is frozen."""
    if cache_backbone and getattr(backbone, "frozen_stages", None) != 4:
        raise ValueError("cache_backbone=True needs the whole backbone frozen (frozen_stages=4), "
                         f"got frozen_stages={frozen_stages!r}")
    return bool(cache_backbone)


def cached_backbone_features(backbone, x: torch.Tensor, targets, cache: dict) -> list[torch.Tensor]:
    """Backbone features ``[(B, C_l, H / s_l, W / s_l)]`` of the normalised batch ``x`` from ``cache``.

    ``cache`` maps ``(image_id, size, flipped)`` of a target to that image's features (float16);
    missing entries are computed without gradient and stored. A dataset item must be a function
    of those three keys (true of ``CocoBoxDataset``: no photometric augmentation).
    """
    per_image = []
    for b, target in enumerate(targets):
        try:
            key = (int(target["image_id"]), tuple(int(v) for v in target["size"]), bool(target.get("flipped", False)))
        except (KeyError, TypeError) as err:
            raise ValueError(f"cache_backbone needs targets[{b}] to hold 'image_id' and 'size' "
                             f"(as apro.data.CocoBoxDataset items do): {err}") from None
        cached = cache.get(key)
        if cached is None:
            h = -(-key[1][0] // 32) * 32
            w = -(-key[1][1] // 32) * 32
            with torch.no_grad():
                cached = [f.to(torch.float16) for f in backbone(x[b:b + 1, :, :h, :w])]
            cache[key] = cached
        per_image.append(cached)
    out = []
    for level in range(len(per_image[0])):
        size = [-(-x.shape[-2] // STRIDES[level]), -(-x.shape[-1] // STRIDES[level])]
        batch = x.new_zeros((x.shape[0], per_image[0][level].shape[1], *size))
        for b, feats in enumerate(per_image):
            f = feats[level]
            batch[b, :, :f.shape[-2], :f.shape[-1]] = f[0].to(x.dtype)
        out.append(batch)
    return out
