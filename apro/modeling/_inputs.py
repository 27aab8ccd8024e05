"""Checks of what a box-supervised instance model's ``forward`` receives (SOLOv2, Mask2Former)."""
from __future__ import annotations

from typing import Optional

import torch


def check_forward_inputs(images, valid, targets) -> Optional[torch.Tensor]:
    """Check ``images`` (B, 3, H, W) RGB in [0, 1] with H, W multiples of 32, ``valid``
    (B, 1, H, W) or (B, H, W) or None, and ``targets`` (None or one dict per image).
    Returns ``valid`` as (B, 1, H, W) (or None). Raises TypeError/ValueError naming the argument."""
    if not isinstance(images, torch.Tensor) or not torch.is_floating_point(images):
        raise TypeError("images must be a float tensor (B, 3, H, W) of RGB values in [0, 1]")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[-1] % 32 or images.shape[-2] % 32:
        raise ValueError(f"images height and width must be multiples of 32 (pad them, e.g. with "
                         f"apro.data.collate_batch), got {tuple(images.shape[-2:])}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf values")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise ValueError(f"images must be RGB in [0, 1] (the model normalises them itself), got values in "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]; divide 8-bit images by 255")
    batch, _, height, width = images.shape
    if valid is not None:
        if valid.dim() == 3:
            valid = valid.unsqueeze(1)
        if valid.shape != (batch, 1, height, width):
            raise ValueError(f"valid must have shape ({batch}, 1, {height}, {width}), got {tuple(valid.shape)}")
    if targets is not None and (not isinstance(targets, (list, tuple)) or len(targets) != batch):
        raise ValueError(f"targets must be a list of {batch} dicts (one per image), got "
                         f"{type(targets).__name__} of length {len(targets) if hasattr(targets, '__len__') else '?'}")
    return valid
