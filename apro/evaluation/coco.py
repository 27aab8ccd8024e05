"""COCO mask AP of instance predictions (pycocotools), the filled-box baseline, and the
conversion of network outputs back to original image size.

The paper reports COCO-style mask AP, AP50 and AP75 (Sec. 4.1, Tables 1, 4, 5, 7); these are
``COCOeval(iouType="segm")`` stats 0, 1 and 2, scaled to [0, 100].
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.coco import load_coco_json


def _coco_api():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("mask evaluation needs pycocotools: pip install pycocotools") from err
    return COCO, COCOeval, mask_utils


def _encode(mask: np.ndarray, mask_utils) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _as_bool_mask(mask, where: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{where}: 'mask' must have shape (H, W), got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{where}: 'mask' must be boolean (threshold the probabilities first), got dtype {mask.dtype}")
    return mask


def encode_predictions(predictions: Sequence[dict], gt_ann_file) -> list:
    """Check predictions against the ground-truth JSON and convert them to COCO results.

    Each prediction is a dict ``image_id``, ``category_id`` (the COCO id), ``score`` and
    either ``mask`` (bool (H, W) at the image's original size, NumPy or torch) or
    ``segmentation`` (an RLE dict, e.g. from :func:`encode_predictions` itself — compact
    when there are many predictions). Errors name the prediction index and what is wrong.
    """
    _, _, mask_utils = _coco_api()
    data = load_coco_json(gt_ann_file)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    results = []
    for index, pred in enumerate(predictions):
        where = f"predictions[{index}]"
        if not isinstance(pred, dict):
            raise TypeError(f"{where} must be a dict, got {type(pred).__name__}")
        for key in ("image_id", "category_id", "score"):
            if key not in pred:
                raise ValueError(f"{where} has no {key!r}; expected keys image_id, category_id, score and mask")
        image_id = int(pred["image_id"])
        if image_id not in sizes:
            raise ValueError(f"{where} has image_id {image_id}, which is not an image of {gt_ann_file!r}")
        category_id = int(pred["category_id"])
        if category_id not in category_ids:
            raise ValueError(
                f"{where} has category_id {category_id}, which is not a category of {gt_ann_file!r} "
                f"(map contiguous labels through dataset.category_ids)"
            )
        score = float(pred["score"])
        if not math.isfinite(score):
            raise ValueError(f"{where} has a non-finite score {pred['score']!r}")
        if "segmentation" in pred:
            rle = pred["segmentation"]
            if not (isinstance(rle, dict) and "size" in rle and "counts" in rle):
                raise ValueError(f"{where}: 'segmentation' must be an RLE dict with 'size' and 'counts'")
            if tuple(rle["size"]) != sizes[image_id]:
                raise ValueError(f"{where}: RLE size {tuple(rle['size'])} but image {image_id} is {sizes[image_id]} (H, W)")
        elif "mask" in pred:
            mask = _as_bool_mask(pred["mask"], where)
            if mask.shape != sizes[image_id]:
                raise ValueError(
                    f"{where}: mask has shape {mask.shape} but image {image_id} is {sizes[image_id]} (H, W); "
                    f"bring masks to original size with masks_to_original_size"
                )
            rle = _encode(mask, mask_utils)
        else:
            raise ValueError(f"{where} has neither 'mask' nor 'segmentation'")
        results.append({"image_id": image_id, "category_id": category_id, "segmentation": rle, "score": score})
    return results


def evaluate_masks(
    predictions: Sequence[dict],
    gt_ann_file,
    image_ids: Optional[Sequence[int]] = None,
    verbose: bool = False,
) -> dict:
    """COCO mask AP of instance predictions against a ground-truth JSON with masks.

    Args:
        predictions: list of dicts ``image_id``, ``category_id`` (COCO id), ``score`` and
            ``mask`` (bool (H, W) at the original size) or ``segmentation`` (RLE); see
            :func:`encode_predictions`.
        gt_ann_file: COCO instances JSON whose annotations carry ``segmentation``.
        image_ids: evaluate on these images only (default: every image of the JSON; an
            image without predictions counts its objects as missed).
        verbose: print pycocotools' own log and summary table.

    Returns ``{"AP": ..., "AP50": ..., "AP75": ...}`` in [0, 100]. No predictions at all
    give 0 for each (pycocotools cannot load an empty result list).
    """
    COCO, COCOeval, _ = _coco_api()
    results = encode_predictions(predictions, gt_ann_file)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO(str(gt_ann_file))
    crowd_free = [a for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    if not crowd_free:
        raise ValueError(f"{gt_ann_file!r} has no (non-crowd) annotation to evaluate against")
    missing = [a["id"] for a in gt.dataset["annotations"] if "segmentation" not in a]
    if missing:
        raise ValueError(
            f"{gt_ann_file!r} has annotations without 'segmentation' (e.g. annotation id {missing[0]!r}); "
            f"mask AP needs the evaluation JSON with masks, not the box-only training JSON"
        )
    if image_ids is not None:
        image_ids = [int(i) for i in image_ids]
        unknown = [i for i in image_ids if i not in gt.imgs]
        if unknown:
            raise ValueError(f"image_ids {unknown[:5]} are not images of {gt_ann_file!r}")
        results = [r for r in results if r["image_id"] in set(image_ids)]
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with quiet:
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="segm")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (float(s) for s in evaluator.stats[:3])
    # pycocotools reports -1 when no ground truth falls in the evaluated set.
    return {name: max(v, 0.0) * 100.0 for name, v in (("AP", ap), ("AP50", ap50), ("AP75", ap75))}


def filled_box_predictions(gt_ann_file) -> list:
    """The filled-box baseline: one prediction per non-crowd GT annotation, score 1.

    Each mask is the annotation's box ``[x, y, w, h]`` filled over pixels
    ``floor(x) .. ceil(x + w) - 1`` (likewise in y), clipped to the image. A box-supervised
    model must beat this to have learned anything about shape.
    """
    data = load_coco_json(gt_ann_file)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    predictions = []
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        x0, y0 = max(int(math.floor(x)), 0), max(int(math.floor(y)), 0)
        x1, y1 = min(int(math.ceil(x + bw)), w), min(int(math.ceil(y + bh)), h)
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        predictions.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "mask": mask, "score": 1.0})
    return predictions


def masks_to_original_size(masks: torch.Tensor, input_size, orig_size, threshold: float = 0.5) -> torch.Tensor:
    """Bring masks predicted on the resized, padded input back to the original image.

    The dataset resizes an image of ``orig_size`` (h, w) to ``input_size`` (H, W) (item key
    ``size``) and :func:`apro.data.collate_batch` pads it at the bottom/right to
    (Hp, Wp). This crops the padding (``masks[:, :H, :W]``), resizes bilinearly to (h, w)
    and thresholds at ``threshold``.

    Args:
        masks: (K, Hp, Wp) bool or float (probabilities) at the padded input resolution.
        input_size: (H, W) of the resized image before padding.
        orig_size: (h, w) of the original image.

    Returns a bool (K, h, w) tensor on the masks' device.
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be a tensor of shape (K, Hp, Wp), got {getattr(masks, 'shape', type(masks).__name__)}")
    H, W = (int(v) for v in input_size)
    h, w = (int(v) for v in orig_size)
    if min(H, W, h, w) < 1:
        raise ValueError(f"input_size {tuple(input_size)} and orig_size {tuple(orig_size)} must be positive")
    k, hp, wp = masks.shape
    if hp < H or wp < W:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} are smaller than input_size {(H, W)}; they must be at the "
            f"(padded) input resolution — upsample them first"
        )
    if k == 0:
        return torch.zeros((0, h, w), dtype=torch.bool, device=masks.device)
    cropped = masks[:, :H, :W].float()
    resized = F.interpolate(cropped[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    return resized >= threshold


def to_coco_predictions(outputs: Sequence[dict], targets: Sequence[dict], category_ids: Sequence[int], encode: bool = True) -> list:
    """Model outputs of a batch -> prediction dicts for :func:`evaluate_masks`.

    Args:
        outputs: per image, dict ``masks`` (K, Hp, Wp) bool/float at input resolution,
            ``labels`` (K,) contiguous class indices, ``scores`` (K,).
        targets: the batch's per-image dicts from :func:`apro.data.collate_batch`
            (``image_id``, ``size``, ``orig_size`` are read).
        category_ids: contiguous index -> COCO category id (``dataset.category_ids``).
        encode: store each mask as RLE ``segmentation`` (compact) instead of a bool ``mask``.
    """
    if len(outputs) != len(targets):
        raise ValueError(f"outputs has {len(outputs)} images but targets has {len(targets)}")
    _, _, mask_utils = _coco_api()
    predictions = []
    for out, target in zip(outputs, targets):
        masks = masks_to_original_size(out["masks"], target["size"], target["orig_size"]).cpu().numpy()
        labels = torch.as_tensor(out["labels"]).cpu().tolist()
        scores = torch.as_tensor(out["scores"]).float().cpu().tolist()
        for mask, label, score in zip(masks, labels, scores):
            pred = {"image_id": int(target["image_id"]), "category_id": int(category_ids[label]), "score": float(score)}
            if encode:
                pred["segmentation"] = _encode(mask, mask_utils)
            else:
                pred["mask"] = mask
            predictions.append(pred)
    return predictions
