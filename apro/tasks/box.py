"""Box-supervised instance segmentation (paper Sec. 4.1) as a task of :mod:`apro.engine`.

The model is SOLOv2 (:mod:`apro.modeling.solov2`) trained from the boxes of a COCO-format
JSON (:class:`apro.data.CocoBoxDataset`) with one of the box mask losses of
:mod:`apro.losses`; evaluation is COCO mask AP (:mod:`apro.evaluation`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import engine
from .._validation import check_threshold
from ..engine.sampling import to_device
from ..engine import EngineConfig, Task, check_choice
from ..modeling.backbones import BACKBONES

MASK_LOSSES = (
    "apro", "projection", "pairwise", "treefilter", "treefilter-local",
    "crf", "gp", "lp", "gp-lp-c", "lp-gp-c",
)
MODELS = ("solov2", "mask2former")  # apro.modeling.SOLOv2, apro.modeling.Mask2Former


@dataclass
class BoxConfig(EngineConfig):
    """Everything that defines a box-supervised training run (engine fields plus data, model
    and mask loss); saved into every checkpoint."""

    out: str = "runs/box"
    data: str = ""
    ann: str = ""
    eval_ann: Optional[str] = None
    eval_data: Optional[str] = None

    mask_loss: str = "apro"
    model: str = "solov2"
    backbone: str = "efficientnet_lite0"
    backbone_weights: Optional[str] = None
    pretrained: bool = True
    model_options: dict = field(default_factory=dict)

    short_sides: tuple = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    test_short_side: Optional[int] = None  # None: the largest training short side
    flip: bool = True

    # What a shipped recipe (configs/*.json) states about itself; not used by training.
    description: str = ""
    budget_minutes: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.short_sides = tuple(int(s) for s in self.short_sides)
        self.model_options = dict(self.model_options or {})
        if self.test_short_side is None and self.short_sides:
            # evaluate at the scale the model was trained at, not at a fixed 800
            self.test_short_side = max(self.short_sides)

    @classmethod
    def from_json(cls, path, data_root: Optional[str] = None) -> "BoxConfig":
        """Read a recipe (a JSON object of options). Relative ``data``, ``ann``, ``eval_ann`` and
        ``eval_data`` paths in it are relative to ``data_root`` (default
        :func:`default_data_root`), so that a shipped recipe names no machine's folders."""
        config = super().from_json(path)
        root = data_root if data_root is not None else default_data_root()
        for key in ("data", "ann", "eval_ann", "eval_data"):
            value = getattr(config, key)
            if value and not os.path.isabs(value):
                setattr(config, key, os.path.join(root, value))
        return config

    def validate(self) -> "BoxConfig":
        """Check the values; raises ValueError naming the offending field."""
        super().validate()
        check_choice(self.mask_loss, MASK_LOSSES, "mask_loss")
        check_choice(self.model, MODELS, "model")
        check_choice(self.backbone, BACKBONES, "backbone")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0 or null, got {self.budget_minutes!r}")
        for name in ("max_size", "test_short_side"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.short_sides or min(self.short_sides) < 1:
            raise ValueError(f"short_sides must be a non-empty list of sizes >= 1, got {self.short_sides!r}")
        return self


def default_data_root() -> str:
    """Folder the relative paths of a recipe are read from: ``$APRO_DATA``, else
    ``../shared/data`` relative to the working directory (the repository root)."""
    return os.environ.get("APRO_DATA") or os.path.join("..", "shared", "data")


def model_class(name: str) -> type:
    """The network class of a :data:`MODELS` name: :class:`~apro.modeling.SOLOv2` or
    :class:`~apro.modeling.Mask2Former` (both take ``model_options`` as keyword arguments)."""
    from ..modeling import Mask2Former, SOLOv2

    check_choice(name, MODELS, "model")
    return {"solov2": SOLOv2, "mask2former": Mask2Former}[name]


def build_model(config: BoxConfig, num_classes: int) -> nn.Module:
    """The model of :mod:`apro.modeling` described by ``config`` (``config.model``: SOLOv2 or Mask2Former)."""
    return model_class(config.model)(
        num_classes,
        backbone=config.backbone,
        pretrained=config.pretrained,
        backbone_weights=config.backbone_weights,
        mask_loss=config.mask_loss,
        **config.model_options,
    )


def build_train_dataset(config: BoxConfig):
    """The training :class:`apro.data.CocoBoxDataset` described by ``config``.

    With ``cache_backbone`` (items must then be a function of image, size and flip anyway)
    the dataset also keeps its resized images.
    """
    from ..data import CocoBoxDataset

    return CocoBoxDataset(
        config.data, config.ann, train=True, short_sides=config.short_sides,
        max_size=config.max_size, flip=config.flip, seed=config.seed,
        cache_images=bool(config.model_options.get("cache_backbone", False)),
    )


class BoxTask(Task):
    """The box task for :func:`apro.engine.train`: SOLOv2 from COCO boxes.

    The model's training forward is ``model(images, valid=..., targets=...)`` returning a
    dict of loss tensors including ``"loss"``; checkpoints also record the COCO category id
    of each contiguous class index (``meta["category_ids"]``).
    """

    name = "box"
    config_class = BoxConfig

    def build_dataset(self, config):
        return build_train_dataset(config)

    def build_model(self, config, meta):
        return build_model(config, meta["num_classes"])

    def collate_fn(self):
        from ..data import collate_batch

        return collate_batch

    def losses(self, net, batch, device):
        images = batch["images"].to(device, non_blocking=True)
        valid = batch.get("valid")
        valid = valid.to(device, non_blocking=True) if valid is not None else None
        targets = to_device(batch["targets"], device)
        return net(images, valid=valid, targets=targets)

    def dataset_meta(self, dataset):
        meta = super().dataset_meta(dataset)
        if getattr(dataset, "category_ids", None) is not None:
            meta["category_ids"] = [int(c) for c in dataset.category_ids]
        return meta

    def inference_config(self, config):
        # the weights come from the checkpoint: no ImageNet load, no backbone file needed
        return dataclasses.replace(config, pretrained=False, backbone_weights=None)

    def describe(self, config):
        return f"train {config.mask_loss}"


def train(config: BoxConfig, **kwargs) -> engine.TrainResult:
    """:func:`apro.engine.train` with the :class:`BoxTask`; keyword arguments as there."""
    return engine.train(config, BoxTask(), **kwargs)


def load_trained_model(path, device="cpu"):
    """Rebuild a box-task model from a checkpoint: ``(model, config, meta)``, eval mode."""
    from . import load_trained_model as load

    return load(path, device=device, task=BoxTask.name)


def set_test_thresholds(model: nn.Module, *, mask_threshold: Optional[float] = None,
                        score_threshold: Optional[float] = None) -> nn.Module:
    """Override the test-time thresholds of a trained box-task model in place (``None`` keeps
    the value it was trained with) and return it.

    ``mask_threshold`` binarises the soft masks (SOLOv2: before matrix NMS, so it changes which
    detections survive, not only their pixels; Mask2Former: also its masked attention);
    ``score_threshold`` drops detections scored below it. Both must lie in (0, 1). A recipe's
    thresholds are a choice to make on training images, never on the split that is reported.
    """
    for name, value in (("mask_threshold", mask_threshold), ("score_threshold", score_threshold)):
        if value is None:
            continue
        value = check_threshold(value, name)
        if not hasattr(model, name):
            raise ValueError(f"{type(model).__name__} has no {name} to override")
        setattr(model, name, value)
    return model


@torch.no_grad()
def predict_coco(model: nn.Module, dataset, category_ids, batch_size: int = 2, progress: bool = True) -> list:
    """Run ``model`` over an evaluation :class:`apro.data.CocoBoxDataset` (``train=False``)
    and return COCO predictions (RLE masks at original size) for
    :func:`apro.evaluation.evaluate_masks`."""
    return _predict(model, dataset, category_ids, None, batch_size, progress)[0]


@torch.no_grad()
def _predict(model, dataset, category_ids, mask_thresholds, batch_size, progress) -> list:
    """COCO predictions per mask threshold (``None``: the model's own, one list). A model with
    ``predict_thresholds`` (SOLOv2) runs once per batch for all thresholds; others once per
    batch and threshold, their threshold restored afterwards."""
    from ..data import collate_batch
    from ..evaluation import to_coco_predictions

    device = next(model.parameters()).device
    was_training = model.training
    was_threshold = getattr(model, "mask_threshold", None)
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    predictions = [[] for _ in (mask_thresholds or [None])]
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True)
    try:
        for batch in loader:
            images, valid = batch["images"].to(device), batch["valid"].to(device)
            if mask_thresholds is None:
                outputs = [model(images, valid=valid)]
            elif hasattr(model, "predict_thresholds"):
                outputs = model.predict_thresholds(images, valid, mask_thresholds)
            else:
                outputs = []
                for t in mask_thresholds:
                    set_test_thresholds(model, mask_threshold=t)
                    outputs.append(model(images, valid=valid))
            for kept, out in zip(predictions, outputs):
                kept.extend(to_coco_predictions(out, batch["targets"], category_ids))
    finally:
        model.train(was_training)
        if was_threshold is not None:
            model.mask_threshold = was_threshold
    return predictions


def evaluate_model(model: nn.Module, image_dir, ann_file, *, short_side: int, max_size: Optional[int],
                   category_ids, batch_size: int = 2, progress: bool = True) -> dict:
    """Mask AP, AP50, AP75 (percent) of ``model`` on a COCO JSON with masks (paper Sec. 4.1).

    Images are resized to ``short_side`` (long side capped at ``max_size``) as at training
    time; ``category_ids`` maps the model's contiguous classes to the JSON's category ids.
    """
    return _evaluate(model, image_dir, ann_file, None, short_side, max_size, category_ids, batch_size, progress)[0]


def evaluate_thresholds(model: nn.Module, image_dir, ann_file, mask_thresholds, *, short_side: int,
                        max_size: Optional[int], category_ids, batch_size: int = 2, progress: bool = True) -> list:
    """:func:`evaluate_model` at each test mask threshold in ``mask_thresholds``: one dict of
    AP, AP50, AP75 per threshold, in order; the model's own threshold is left as it was.

    The same numbers as :func:`set_test_thresholds` followed by :func:`evaluate_model` for each
    threshold, but SOLOv2 runs its network once per image for all of them (a threshold only
    changes the post-processing), so a scan costs about one evaluation.
    """
    thresholds = [check_threshold(t, "mask_thresholds") for t in mask_thresholds]
    if not thresholds:
        raise ValueError("mask_thresholds is empty: give at least one threshold in (0, 1)")
    return _evaluate(model, image_dir, ann_file, thresholds, short_side, max_size, category_ids, batch_size, progress)


def _evaluate(model, image_dir, ann_file, mask_thresholds, short_side, max_size, category_ids, batch_size,
              progress) -> list:
    from ..data import CocoBoxDataset
    from ..evaluation import evaluate_masks

    dataset = CocoBoxDataset(image_dir, ann_file, train=False, short_sides=(short_side,), max_size=max_size, flip=False)
    missing = sorted(set(dataset.category_ids) - set(category_ids))
    if missing:
        raise ValueError(f"{ann_file} has categories {missing[:10]} the model was not trained on")
    known = set(dataset.category_ids)  # a class absent from the evaluation set cannot be scored
    return [evaluate_masks([p for p in predictions if p["category_id"] in known], ann_file, image_ids=dataset.image_ids)
            for predictions in _predict(model, dataset, category_ids, mask_thresholds, batch_size, progress)]
