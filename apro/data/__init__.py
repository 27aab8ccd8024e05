"""Datasets: COCO-format box sets (instance task), synthetic sets for tests."""
from .coco import CocoBoxDataset, collate_batch, load_coco_json
from .images import UnreadableImageError, read_rgb
from .synthetic import SyntheticCoco, make_synthetic_coco

__all__ = ["CocoBoxDataset", "collate_batch", "load_coco_json", "make_synthetic_coco", "read_rgb", "SyntheticCoco", "UnreadableImageError"]
