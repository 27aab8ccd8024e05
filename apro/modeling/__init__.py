"""Instance segmentation model trained from boxes: SOLOv2 with EfficientNet-Lite0 or ResNet backbones."""
from .backbones import (
    BACKBONES,
    EfficientNetLite,
    EfficientNetLite0,
    FrozenBatchNorm2d,
    ResNet,
    build_backbone,
    freeze_batch_norm,
    freeze_stages,
    load_backbone_weights,
)
from .fpn import FPN
from .mask2former import Mask2Former
from .matcher import HungarianMatcher
from .solov2 import (
    PAPER_SETTINGS,
    SOLOv2,
    FocalLoss,
    MatrixNMS,
    box_masks,
    grid_targets,
    matrix_nms,
    sigmoid_focal_loss,
)

__all__ = [
    "BACKBONES",
    "EfficientNetLite",
    "EfficientNetLite0",
    "FPN",
    "FocalLoss",
    "HungarianMatcher",
    "Mask2Former",
    "FrozenBatchNorm2d",
    "MatrixNMS",
    "PAPER_SETTINGS",
    "ResNet",
    "SOLOv2",
    "box_masks",
    "build_backbone",
    "freeze_batch_norm",
    "freeze_stages",
    "grid_targets",
    "load_backbone_weights",
    "matrix_nms",
    "sigmoid_focal_loss",
]
