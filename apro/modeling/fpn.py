"""Feature pyramid network (Lin et al., CVPR 2017) with extra coarser levels as SOLOv2 uses."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class FPN(nn.Module):
    """Top-down feature pyramid over backbone features, plus ``extra_levels`` coarser outputs.

    Args:
        in_channels: channels of the backbone features, finest first.
        out_channels: channels of every pyramid level.
        extra_levels: outputs added above the coarsest input by stride-2 subsampling of the
            previous output (max-pool with kernel 1, as the SOLOv2 reference FPN builds P6).

    ``forward(features)`` takes the features finest first (strides s, 2s, ...) and returns
    ``len(in_channels) + extra_levels`` maps ``(B, out_channels, H_l, W_l)``, finest first.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, extra_levels: int = 1):
        super().__init__()
        if extra_levels < 0:
            raise ValueError(f"extra_levels must be >= 0, got {extra_levels}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = int(out_channels)
        self.extra_levels = int(extra_levels)
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                    for _ in self.in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.in_channels):
            raise ValueError(f"features: expected {len(self.in_channels)} maps, got {len(features)}")
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outputs = [conv(x) for conv, x in zip(self.output, laterals)]
        for _ in range(self.extra_levels):
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
