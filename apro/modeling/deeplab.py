"""DeepLabV3+-style semantic segmentation network over the project's backbones.

``backbone`` (EfficientNet-Lite0 with ImageNet weights by default; ResNet-101 with local
torchvision weights for the paper-scale setting) gives features at strides 4, 8, 16, 32.
ASPP (1x1, three dilated 3x3, image pooling) runs on the stride-32 map, is upsampled to
stride 4 and concatenated with a 48-channel projection of the stride-4 map; two 3x3 convs
and a 1x1 classifier give logits at stride 4. The decoder uses GroupNorm, so results do not
depend on the per-process batch (DDP replicas stay identical without synchronised BN).

``forward(x)`` returns ``{"logits": (B, K, H/4, W/4), "features": (B, C, H/4, W/4)}``: the
decoder's last features are the "high-level features" that TEL's second tree and APro's
feature-guided GP (paper §3.2.1) use.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(16, channels // 4) or 1, channels)


def _conv(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), _norm(cout),
                         nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, dilated 3x3 at ``rates``, global pooling; fused by 1x1."""

    def __init__(self, in_channels: int, channels: int = 128, rates: Sequence[int] = (2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList([_conv(in_channels, channels, 1)] +
                                      [_conv(in_channels, channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.ReLU(inplace=True))
        self.project = _conv(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x.mean((2, 3), keepdim=True))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ decoder over a multi-scale backbone.

    Args:
        num_classes: ``K`` (21 for VOC).
        backbone: "efficientnet_lite0" (default), "resnet50" or "resnet101".
        pretrained: load the backbone's ImageNet weights (bundled for EfficientNet-Lite0).
        backbone_weights: path of a local checkpoint (required for pretrained ResNets).
        channels: ASPP / decoder width.
        rates: ASPP dilation rates on the stride-32 map.
        freeze_backbone: no gradient into the backbone (only the decoder trains; faster steps).
        frozen_stages: freeze only the stem and the first ``frozen_stages`` backbone stages
            (0..4, see :func:`~apro.modeling.backbones.freeze_stages`); given, it replaces
            ``freeze_backbone`` (4 is the same as ``freeze_backbone=True``, 0 trains everything).
    """

    def __init__(self, num_classes: int = 21, backbone: str = "efficientnet_lite0", pretrained: bool = True,
                 backbone_weights: Optional[str] = None, channels: int = 128, rates: Sequence[int] = (2, 4, 6),
                 freeze_backbone: bool = False, frozen_stages: Optional[int] = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        if frozen_stages is None and freeze_backbone:
            frozen_stages = 4
        # None keeps the backbone's own default (EfficientNet-Lite trains all of it, ResNet freezes stem + layer1)
        self.backbone = build_backbone(backbone, pretrained=pretrained, weights=backbone_weights,
                                       frozen_stages=frozen_stages)
        self.register_buffer("pixel_mean", torch.tensor(self.backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.backbone.pixel_std).view(1, 3, 1, 1), persistent=False)
        c4, _, _, c32 = self.backbone.out_channels
        self.aspp = ASPP(c32, channels, rates)
        self.low = _conv(c4, 48, 1)
        self.fuse = nn.Sequential(_conv(channels + 48, channels), _conv(channels, channels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feature_channels = channels
        self.frozen_stages = frozen_stages
        self.freeze_backbone = frozen_stages == 4

    def forward(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``image``: ``(B, 3, H, W)`` RGB in [0, 1], ``H, W`` multiples of 32."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got shape {tuple(image.shape)}")
        if image.shape[2] % 32 or image.shape[3] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {tuple(image.shape[2:])}")
        x = (image - self.pixel_mean.to(image.dtype)) / self.pixel_std.to(image.dtype)
        if self.freeze_backbone:
            with torch.no_grad():
                f4, _, _, f32 = self.backbone(x)
        else:
            f4, _, _, f32 = self.backbone(x)
        a = F.interpolate(self.aspp(f32), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        feats = self.fuse(torch.cat([a, self.low(f4)], 1))
        return {"logits": self.classifier(feats), "features": feats}

    @torch.no_grad()
    def predict(self, image: torch.Tensor, size=None) -> torch.Tensor:
        """Class map ``(B, H', W')``: logits upsampled bilinearly to ``size`` (default the input size).

        Inputs of any size are padded on the right / bottom to multiples of 32 and cropped back.
        """
        h, w = image.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        x = F.pad(image, (0, pw, 0, ph)) if (ph or pw) else image
        logits = self.forward(x)["logits"]
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
        if size is not None and tuple(size) != (h, w):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits.argmax(1)
