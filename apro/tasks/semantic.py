"""Point- and scribble-supervised semantic segmentation (paper Sec. 4.2, Table 2) as an engine task.

Model: :class:`apro.modeling.deeplab.DeepLabV3Plus` (EfficientNet-Lite0 by default). Data:
a VOC split (:class:`apro.data.voc.VocSegmentation`) with its point or scribble labels, or
dense pseudo labels (``pseudo_labels``: a directory of ``NAME.png``, class 0..20, 255 =
ignore), augmented TEL-style (:class:`apro.data.augmentation.SemanticAugmentation`).

Loss of one batch (``loss`` picks the pairwise term, SPEC §4-5):

- ``pce``: partial cross-entropy on the labeled pixels, logits upsampled to the crop;
- ``treeenergy``: pCE + ``pairwise_weight`` * TEL's tree energy term, the low-level tree from
  the image (sigma 0.02 on RGB in [0, 1]) then the high-level tree of the decoder features
  (``high_level``), as TEL does;
- ``apro``: pCE + ``global_weight`` * L1 to GP on the image (the two-stage GP of the released
  models) + ``feature_weight`` * L1 to GP on the decoder features (``high_level``; paper
  §3.2.1; not run when ``feature_weight`` is 0, the default tuned in docs/semantic.md)
  + ``local_weight`` * L1 to LP.

Pairwise terms run at the logits' resolution (stride 4), on the unlabeled pixels there (the
labels nearest-downsampled), with the image average-pooled to that grid, as TEL does. The
padding of crops larger than the scaled image is not unlabeled image: it is left out of the
pairwise terms and cut from their trees and windows (``ignore_padding``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import engine
from ..engine import EngineConfig, Task, check_choice
from ..modeling.backbones import BACKBONES

SEMANTIC_LOSSES = ("apro", "treeenergy", "pce")
LABELS = ("points", "scribbles", "gt")
OUTPUT_STRIDE = 4


def default_data_root() -> str:
    """``$APRO_DATA/voc-sparse``, else ``../shared/data/voc-sparse`` relative to the working directory."""
    return os.path.join(os.environ.get("APRO_DATA", os.path.join("..", "shared", "data")), "voc-sparse")


@dataclass
class SemanticConfig(EngineConfig):
    """A semantic segmentation training run (engine fields plus data, model and loss).

    Defaults are the CPU recipe of ``docs/semantic.md``: 2000 steps of batch 4, 192 x 192 crops of
    images resized to a 256 long side, random scale 0.5-1.5, flip; the ImageNet backbone frozen
    and the decoder trained with AdamW lr 3e-3 (weight decay 1e-4), 20 warm-up steps, cosine
    decay. (Fine-tuning the whole network with SGD lr 0.01 or AdamW lr 5e-4 for 250 steps
    left it predicting background everywhere: docs/semantic.md.) The paper-scale setting (TEL's) is ``crop=512, long_side=None, scale=[0.5, 2.0],
    lr=0.001, optimizer=sgd, freeze_backbone=false, backbone=resnet101``.
    """

    out: str = "runs/semantic"
    data: str = ""
    split: str = "train"
    labels: str = "points"
    pseudo_labels: Optional[str] = None

    loss: str = "apro"
    backbone: str = "efficientnet_lite0"
    backbone_weights: Optional[str] = None
    pretrained: bool = True
    decoder_channels: int = 128
    freeze_backbone: bool = True
    # Only the stem and the first k backbone stages frozen (0..4); set, it replaces freeze_backbone
    frozen_stages: Optional[int] = None

    crop: int = 192
    long_side: Optional[int] = 256
    scale: tuple = (0.5, 1.5)
    flip: bool = True

    high_level: bool = True
    # The pairwise terms leave out the crop's padding (TEL's released code marks it apart from
    # unlabeled pixels); False counts it as unlabeled image, as apro did before 2026-12-04.
    ignore_padding: bool = True
    pairwise_weight: float = 0.4
    sigma: float = 0.02
    sigma_high: float = 1.0
    # APro's weights, tuned on a split of the training images (docs/semantic.md): the feature GP hurt
    global_weight: float = 0.2
    feature_weight: float = 0.0
    local_weight: float = 0.2
    # GP's scales, chosen by pseudo-label accuracy on held-out training images (docs/semantic.md):
    # the box heads' released 0.01 / 0.07 leave p almost unchanged at this grid
    zeta_g: float = 0.2
    zeta_gh: Optional[float] = 0.2
    zeta_f: float = 0.5  # the decoder features' scale (zeta_f^2 ~ 75th-90th percentile of their MST edges)
    zeta_s: float = 0.15
    kernel_size: int = 5
    lp_iterations: int = 20

    steps: int = 2000
    batch_size: int = 4
    optimizer: str = "adamw"
    lr: float = 0.003
    schedule: str = "cosine"
    warmup_steps: int = 20
    grad_clip: Optional[float] = 10.0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scale = tuple(float(s) for s in self.scale)

    def validate(self) -> "SemanticConfig":
        super().validate()
        check_choice(self.loss, SEMANTIC_LOSSES, "loss")
        check_choice(self.labels, LABELS, "labels")
        check_choice(self.backbone, BACKBONES, "backbone")
        if int(self.crop) < 32 or int(self.crop) % 32:
            raise ValueError(f"crop must be a multiple of 32 (>= 32), got {self.crop!r}")
        if self.long_side is not None and int(self.long_side) < 32:
            raise ValueError(f"long_side must be >= 32 or null, got {self.long_side!r}")
        if self.frozen_stages is not None and (isinstance(self.frozen_stages, bool) or self.frozen_stages
                                               not in range(5)):
            raise ValueError(f"frozen_stages must be null or an integer in 0..4, got {self.frozen_stages!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [lo, hi] with 0 < lo <= hi, got {list(self.scale)!r}")
        for name in ("pairwise_weight", "global_weight", "feature_weight", "local_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("sigma", "sigma_high", "zeta_g", "zeta_f", "zeta_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.ignore_padding, bool):
            raise ValueError(f"ignore_padding must be true or false, got {self.ignore_padding!r}")
        if self.kernel_size not in (3, 5, 7):
            raise ValueError(f"kernel_size must be 3, 5 or 7, got {self.kernel_size!r}")
        if int(self.lp_iterations) < 1:
            raise ValueError(f"lp_iterations must be >= 1, got {self.lp_iterations!r}")
        return self


def build_model(config: SemanticConfig, num_classes: int) -> nn.Module:
    """The :class:`~apro.modeling.deeplab.DeepLabV3Plus` described by ``config``."""
    from ..modeling.deeplab import DeepLabV3Plus

    return DeepLabV3Plus(num_classes, backbone=config.backbone, pretrained=config.pretrained,
                         backbone_weights=config.backbone_weights, channels=config.decoder_channels,
                         freeze_backbone=config.freeze_backbone, frozen_stages=config.frozen_stages)


def build_train_dataset(config: SemanticConfig):
    """The augmented training :class:`~apro.data.voc.VocSegmentation` of ``config``."""
    from ..data.augmentation import SemanticAugmentation
    from ..data.voc import VocSegmentation

    aug = SemanticAugmentation(crop=int(config.crop), scale=config.scale, long_side=config.long_side,
                               flip=config.flip)
    return VocSegmentation(config.data or default_data_root(), config.split, labels=config.labels,
                           sparse_dir=config.pseudo_labels, transform=aug)


def semantic_losses(config: SemanticConfig, logits: torch.Tensor, features: torch.Tensor, image: torch.Tensor,
                    labels: torch.Tensor, valid: Optional[torch.Tensor] = None) -> dict:
    """The loss terms of one batch (see the module docstring); ``"loss"`` is their sum.

    Args:
        logits: ``(B, K, h, w)`` at stride 4; features: ``(B, C, h, w)``; image: ``(B, 3, H, W)``
            RGB in [0, 1]; labels: ``(B, H, W)`` int64, 255 = unlabeled; valid: optional
            ``(B, H, W)`` bool, False on the crop's padding. A cell of the logits' grid counts
            as image only when every pixel it pools is image; the others are left out of the
            pairwise terms and cut from their trees and windows.
    """
    from ..losses import partial_cross_entropy
    from ..losses.sparse import _apro_sparse_terms
    from ..losses.tree_filter import _tree_energy_terms

    full = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    terms = {"pce": partial_cross_entropy(full, labels, 255)}
    if config.loss != "pce":
        h, w = logits.shape[-2:]
        small_image = F.adaptive_avg_pool2d(image, (h, w))
        small_labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        small_valid = None
        if config.ignore_padding and valid is not None and not bool(valid.all()):
            small_valid = F.adaptive_avg_pool2d(valid[:, None].to(image.dtype), (h, w))[:, 0] > 0.999
        feats = features if config.high_level else None
        if config.loss == "treeenergy":
            terms.update(_tree_energy_terms(logits, small_labels, small_image, config.sigma, config.pairwise_weight,
                                            255, None, feats, config.sigma_high, small_valid))
        else:
            # A term of weight 0 is not computed at all; its log column stays, at zero.
            if not float(config.feature_weight) > 0:
                feats = None
            run_global, run_local = float(config.global_weight) > 0, float(config.local_weight) > 0
            variant = "gp-lp-p" if run_global and run_local else ("lp" if run_local else "gp")
            apro = _apro_sparse_terms(
                logits, small_labels, small_image, variant, config.zeta_g, config.zeta_gh, config.zeta_s,
                config.kernel_size, config.lp_iterations, 1.0, 255, None, feats, config.zeta_f, 1.0, small_valid)
            zero = terms["pce"].new_zeros(())
            terms["global"] = apro["global"] * config.global_weight if run_global else zero
            terms["local"] = apro["local"] * config.local_weight if run_local else zero
            if "feature" in apro:
                terms["feature"] = apro["feature"] * config.feature_weight
    terms["loss"] = sum(terms.values())
    return terms


class SemanticTask(Task):
    """The semantic task for :func:`apro.engine.train`: DeepLabV3+ from points / scribbles / pseudo labels."""

    name = "semantic"
    config_class = SemanticConfig

    def __init__(self, config: Optional[SemanticConfig] = None):
        self._config = config

    def build_dataset(self, config):
        self._config = config
        return build_train_dataset(config)

    def build_model(self, config, meta):
        self._config = config
        return build_model(config, int(meta["num_classes"]))

    def collate_fn(self):
        return _collate

    def losses(self, net, batch, device):
        image = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if self._config is None:
            raise RuntimeError("SemanticTask needs its config: construct it as SemanticTask(config)")
        valid = batch.get("valid")
        if valid is not None:
            valid = valid.to(device, non_blocking=True)
        out = net(image)
        return semantic_losses(self._config, out["logits"], out["features"], image, labels, valid)

    def dataset_meta(self, dataset):
        meta = super().dataset_meta(dataset)
        meta["class_names"] = list(getattr(dataset, "class_names", []))
        return meta

    def inference_config(self, config):
        return dataclasses.replace(config, pretrained=False, backbone_weights=None)

    def describe(self, config):
        what = "pseudo labels" if config.pseudo_labels else config.labels
        return f"train semantic {config.loss} ({what})"


def _collate(items):
    return {
        "name": [it["name"] for it in items],
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "valid": torch.stack([it["valid"] for it in items]),
    }


def train(config: SemanticConfig, **kwargs) -> engine.TrainResult:
    """:func:`apro.engine.train` with the :class:`SemanticTask`; keyword arguments as there."""
    return engine.train(config, SemanticTask(config), **kwargs)


def load_trained_model(path, device="cpu"):
    """Rebuild a semantic-task model from a checkpoint: ``(model, config, meta)``, eval mode."""
    from . import load_trained_model as load

    return load(path, device=device, task=SemanticTask.name)


@torch.no_grad()
def predict_image(model: nn.Module, image: torch.Tensor, long_side: Optional[int] = None) -> torch.Tensor:
    """Class map ``(H, W)`` int64 of one image ``(3, H, W)`` RGB in [0, 1] at its own size.

    The image is resized to ``long_side`` (as in training) for the forward pass; the logits
    are upsampled bilinearly back to ``(H, W)``.
    """
    from ..data.augmentation import resize_long_side

    device = next(model.parameters()).device
    h, w = image.shape[-2:]
    x = image
    if long_side is not None:
        x, _ = resize_long_side(image, [], long_side)
    return model.predict(x[None].to(device), size=(h, w))[0].cpu()


@torch.no_grad()
def evaluate_model(model: nn.Module, data, split: str = "val", long_side: Optional[int] = None,
                   progress: bool = True, predictions_dir=None) -> dict:
    """mIoU of ``model`` on a VOC split (one confusion matrix over the split, void ignored).

    Returns :meth:`apro.evaluation.semantic.ConfusionMatrix.scores` (IoUs as fractions).
    ``predictions_dir``: also write each prediction there as a palette PNG.
    """
    from ..data.voc import VocSegmentation, write_label
    from ..evaluation.semantic import ConfusionMatrix

    dataset = VocSegmentation(data, split, labels="gt")
    was_training = model.training
    model.eval()
    acc = ConfusionMatrix(dataset.num_classes)
    indices = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"eval {split}", unit="img", dynamic_ncols=True)
    try:
        for i in indices:
            item = dataset[i]
            pred = predict_image(model, item["image"], long_side)
            acc.update(pred, item["gt"])
            if predictions_dir is not None:
                write_label(os.path.join(predictions_dir, f"{item['name']}.png"), pred)
    finally:
        model.train(was_training)
    return acc.scores(dataset.class_names)
