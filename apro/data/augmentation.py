"""Joint image / label augmentation for semantic segmentation, as in TEL's VOC recipe.

Training: optional resize so the long side is ``long_side``; random scale ``s ~ U(scale)``;
pad (image with 0, labels with 255) to at least ``crop``; random ``crop x crop`` window;
horizontal flip with probability 0.5. The image is resized bilinearly, every label map with
nearest neighbour, so labels keep their class indices and stay aligned with the image pixel
for pixel. When a *sparse* map (under half its pixels labeled: points, scribbles) is shrunk,
each labeled pixel is also carried to the pixel it lands on (where nearest left it
unlabeled), so that clicks are not lost to the subsampling (:func:`_keep_sparse`). Random draws come from ``generator`` or, when None, torch's global RNG (which the
training engine seeds per item, so that resume is exact).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
SPARSE_FRACTION = 0.5  # label maps with fewer labeled pixels than this are "sparse" (points, scribbles)


def _keep_sparse(lab: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Put every labeled pixel of the sparse map ``lab`` where it lands in ``small`` (if unlabeled there).

    Nearest-neighbour downscaling samples one source pixel per output pixel, so a 5-pixel click
    shrunk 4x usually vanishes. Here each labeled source pixel ``(y, x)`` also writes its class
    at ``(floor((y + 0.5) h'/h), floor((x + 0.5) w'/w))`` where nearest left 255; background
    first, so objects win a collision.
    """
    ys, xs = torch.nonzero(lab != IGNORE_INDEX, as_tuple=True)
    if ys.numel() == 0:
        return small
    h, w = lab.shape
    hh, ww = small.shape
    ty = ((ys.to(torch.float64) + 0.5) * (hh / h)).floor().long().clamp_(0, hh - 1)
    tx = ((xs.to(torch.float64) + 0.5) * (ww / w)).floor().long().clamp_(0, ww - 1)
    values = lab[ys, xs]
    order = torch.argsort((values != 0).to(torch.int8), stable=True)
    ty, tx, values = ty[order], tx[order], values[order]
    free = small[ty, tx] == IGNORE_INDEX
    out = small.clone()
    out[ty[free], tx[free]] = values[free]
    return out


def _resize_pair(image: torch.Tensor, labels: Sequence[torch.Tensor], size: Tuple[int, int],
                 keep_sparse: bool = True):
    h, w = size
    if tuple(image.shape[-2:]) == (h, w):
        return image, list(labels)
    shrink = h < image.shape[-2] or w < image.shape[-1]
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    out = []
    for lab in labels:
        lab_f = lab[None, None].to(torch.float32)
        small = F.interpolate(lab_f, size=(h, w), mode="nearest")[0, 0].to(lab.dtype)
        if keep_sparse and shrink and float((lab != IGNORE_INDEX).float().mean()) < SPARSE_FRACTION:
            small = _keep_sparse(lab, small)
        out.append(small)
    return image, out


def resize_long_side(image: torch.Tensor, labels: Sequence[torch.Tensor], long_side: int):
    """Resize so that ``max(H, W) == long_side`` (aspect kept); labels nearest-neighbour."""
    h, w = image.shape[-2:]
    s = long_side / max(h, w)
    return _resize_pair(image, labels, (max(1, round(h * s)), max(1, round(w * s))))


def _uniform(lo: float, hi: float, generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(n: int, generator) -> int:
    return int(torch.randint(0, n, (), generator=generator)) if n > 0 else 0


class SemanticAugmentation:
    """``__call__(image, *labels) -> (image, *labels)``: TEL-style scale, pad, crop, flip.

    Args:
        crop: side of the square output (512 in TEL; smaller for CPU recipes).
        scale: range of the random scale factor (TEL: 0.5-2.0).
        long_side: resize to this long side before the random scale (None: native size).
        flip: random horizontal flip.
        generator: optional ``torch.Generator`` for the random draws.

    ``image`` ``(3, H, W)`` float; each label ``(H, W)`` integer with 255 = void/unlabeled.
    Output image ``(3, crop, crop)``, labels ``(crop, crop)`` (padding is 0 / 255).
    """

    def __init__(self, crop: int = 512, scale: Tuple[float, float] = (0.5, 2.0), long_side: Optional[int] = None,
                 flip: bool = True, generator: Optional[torch.Generator] = None):
        if not isinstance(crop, int) or crop < 8:
            raise ValueError(f"crop must be an int >= 8, got {crop!r}")
        lo, hi = (float(s) for s in scale)
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {scale!r}")
        if long_side is not None and (not isinstance(long_side, int) or long_side < 8):
            raise ValueError(f"long_side must be None or an int >= 8, got {long_side!r}")
        self.crop, self.scale, self.long_side, self.flip = crop, (lo, hi), long_side, bool(flip)
        self.generator = generator

    def __call__(self, image: torch.Tensor, *labels: torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"image must be (3, H, W), got shape {tuple(image.shape)}")
        for lab in labels:
            if tuple(lab.shape) != tuple(image.shape[-2:]):
                raise ValueError(f"label shape {tuple(lab.shape)} != image size {tuple(image.shape[-2:])}")
        g = self.generator
        if self.long_side is not None:
            image, labels = resize_long_side(image, labels, self.long_side)
        s = _uniform(*self.scale, g)
        h, w = image.shape[-2:]
        image, labels = _resize_pair(image, labels, (max(1, round(h * s)), max(1, round(w * s))))
        h, w = image.shape[-2:]
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            labels = [F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX) for lab in labels]
        h, w = image.shape[-2:]
        y0, x0 = _randint(h - self.crop + 1, g), _randint(w - self.crop + 1, g)
        image = image[:, y0:y0 + self.crop, x0:x0 + self.crop]
        labels = [lab[y0:y0 + self.crop, x0:x0 + self.crop] for lab in labels]
        if self.flip and float(torch.rand((), generator=g)) < 0.5:
            image = image.flip(-1)
            labels = [lab.flip(-1) for lab in labels]
        return (image.contiguous(), *[lab.contiguous() for lab in labels])

    def __repr__(self) -> str:
        return (f"SemanticAugmentation(crop={self.crop}, scale={self.scale}, long_side={self.long_side}, "
                f"flip={self.flip})")


class EvalResize:
    """Evaluation transform: resize the image so its long side is ``long_side``; labels kept at full size."""

    def __init__(self, long_side: Optional[int] = None):
        self.long_side = long_side

    def __call__(self, image: torch.Tensor, *labels: torch.Tensor):
        if self.long_side is not None:
            image, _ = resize_long_side(image, [], self.long_side)
        return (image, *labels)
