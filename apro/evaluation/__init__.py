"""Evaluation: COCO mask AP for the instance task."""
from .coco import (
    encode_predictions,
    evaluate_masks,
    filled_box_predictions,
    masks_to_original_size,
    to_coco_predictions,
)

__all__ = ["encode_predictions", "evaluate_masks", "filled_box_predictions", "masks_to_original_size", "to_coco_predictions"]
