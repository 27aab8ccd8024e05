"""Colour conversions the losses need, in torch (differentiable, any device)."""
from __future__ import annotations

import torch

# ImageNet statistics used by the released models to normalise the RGB input (SPEC §2).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# sRGB (D65) -> CIE XYZ, and the D65 white point (the same constants as scikit-image's rgb2lab).
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def imagenet_normalize(image: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> ``(image - mean) / std`` with ImageNet statistics."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` sRGB in [0, 1] -> CIE L*a*b* (D65), L in [0, 100].

    The conversion BoxInst uses (via ``skimage.color.rgb2lab``): inverse sRGB gamma,
    linear RGB -> XYZ, normalise by the white point, cube-root companding.
    """
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055).pow(2.4), image / 12.92)
    m = image.new_tensor(_RGB_TO_XYZ)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    xyz = xyz / image.new_tensor(_WHITE_D65).view(1, 3, 1, 1)
    eps = 0.008856
    f = torch.where(xyz > eps, xyz.clamp_min(eps).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], 1)
