"""COCO-format box-supervised instance data: a dataset reader and batching.

The reader trains from boxes and categories only (paper Sec. 4.1: box-supervised instance
segmentation); instance masks, when the JSON has them, are never read here — they are used
only by :mod:`apro.evaluation`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .._validation import check_count
from .images import read_rgb

logger = logging.getLogger(__name__)

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
_PAD_MULTIPLE = 32
_RAW_GRID_WARNED: set = set()


def _record_name(kind: str, record) -> str:
    if isinstance(record, dict) and "id" in record:
        return f"{kind} id {record['id']!r}"
    return f"{kind} {record!r}"[:120]


def load_coco_json(ann_file) -> dict:
    """Read a COCO instances JSON and check its structure.

    Raises ``FileNotFoundError`` for a missing file, and ``ValueError`` naming the file and
    the JSON error position for corrupt JSON, or naming the file and the record for a
    missing top-level section, a record without a required key, a duplicate id, an
    annotation whose ``image_id`` has no image, or whose ``category_id`` is not among the
    JSON's categories.
    """
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file {ann_file!r} does not exist; pass the path of a COCO instances JSON")
    try:
        with open(ann_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"annotation file {ann_file!r} is not valid JSON: {err.msg} at line {err.lineno} "
            f"column {err.colno} (char {err.pos}); fix or re-export the file"
        ) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"annotation file {ann_file!r} is not UTF-8 text ({err}); is it really a JSON file?") from err
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {ann_file!r}: top level must be a JSON object, got {type(data).__name__}")
    for section in ("images", "annotations", "categories"):
        if section not in data:
            raise ValueError(f"annotation file {ann_file!r} has no {section!r} list; it is not a COCO instances JSON")
        if not isinstance(data[section], list):
            raise ValueError(f"annotation file {ann_file!r}: {section!r} must be a list, got {type(data[section]).__name__}")

    def check_records(section, kind, keys):
        seen = set()
        for index, record in enumerate(data[section]):
            if not isinstance(record, dict):
                raise ValueError(f"annotation file {ann_file!r}: {section}[{index}] must be an object, got {record!r:.80}")
            missing = [k for k in keys if k not in record]
            if missing:
                raise ValueError(
                    f"annotation file {ann_file!r}: {section}[{index}] ({_record_name(kind, record)}) "
                    f"is missing key(s) {missing}"
                )
            if record["id"] in seen:
                raise ValueError(f"annotation file {ann_file!r}: duplicate {_record_name(kind, record)} in {section!r}")
            seen.add(record["id"])
        return seen

    category_ids = check_records("categories", "category", ("id",))
    image_ids = check_records("images", "image", _IMAGE_KEYS)
    check_records("annotations", "annotation", _ANNOTATION_KEYS)
    for record in data["images"]:
        h, w = record["height"], record["width"]
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise ValueError(
                f"annotation file {ann_file!r}: {_record_name('image', record)} ({record['file_name']!r}) has "
                f"height/width {h!r}/{w!r}; both must be positive integers"
            )
    for record in data["annotations"]:
        where = f"annotation file {ann_file!r}: {_record_name('annotation', record)}"
        if record["image_id"] not in image_ids:
            raise ValueError(f"{where} refers to image_id {record['image_id']!r}, which is not in 'images'")
        if record["category_id"] not in category_ids:
            raise ValueError(
                f"{where} (image_id {record['image_id']!r}) has category_id {record['category_id']!r}, which is not "
                f"in 'categories' (known ids: {sorted(category_ids)[:20]})"
            )
        box = record["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"{where} (image_id {record['image_id']!r}) has bbox {box!r:.80}; expected [x, y, width, height]")
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"{where} (image_id {record['image_id']!r}) has a non-finite bbox {box!r}")
    return data


def _resized_size(h: int, w: int, short_side: int, max_size: Optional[int]) -> tuple:
    scale = short_side / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale))), scale


class CocoBoxDataset(torch.utils.data.Dataset):
    """Images and boxes of a COCO instances JSON, for box-supervised instance segmentation.

    Args:
        image_dir: folder holding the images named by each image record's ``file_name``.
        ann_file: COCO instances JSON. Only ``bbox`` and ``category_id`` of annotations are read
            (``segmentation`` is never touched); crowd annotations (``iscrowd=1``) are ignored.
        train: training mode: random short side from ``short_sides`` and random horizontal
            flip, and images left without a usable box are skipped. Evaluation mode
            (``train=False``): short side ``max(short_sides)``, no flip, every image kept.
        short_sides: candidate lengths of the resized short side.
        max_size: cap on the resized long side (``None``: no cap).
        flip: allow the random horizontal flip (training only), probability 0.5.
        seed: the augmentation of item ``i`` in epoch ``e`` depends only on ``(seed, e, i)``,
            so it is the same in any worker process; call :meth:`set_epoch` once per epoch.
        check_files: check at construction that every image file exists.
        cache_images: keep each resized image (uint8, in memory, keyed by item and size) and
            reuse it when the item comes again at that size: decoding and resizing are about
            a tenth of a training step with a cached frozen backbone. Items are unchanged.

    Each item is a dict: ``image`` float32 (3, H, W) RGB in [0, 1] (resized); ``boxes``
    float32 (K, 4) xyxy in pixels of the resized image; ``labels`` int64 (K,) contiguous in
    ``0..num_classes-1``; ``image_id`` int; ``orig_size`` (h, w) of the file; ``size``
    (H, W) after resizing; ``scale`` float (resized / original, nominal; the two axes
    differ from it by at most the rounding of the size); ``flipped`` bool.

    Bad data: a missing image file, a corrupt JSON or image, a missing key, an unknown
    category or image id raise errors naming the file and record. Boxes with width or
    height <= 1 px after clipping to the image, or lying outside it, are skipped with one
    logged warning per annotation; in training an image left with no box is skipped with one
    warning per image.
    """

    def __init__(
        self,
        image_dir,
        ann_file,
        train: bool = True,
        short_sides: Sequence[int] = (640, 672, 704, 736, 768, 800),
        max_size: Optional[int] = 1333,
        flip: bool = True,
        seed: int = 0,
        check_files: bool = True,
        cache_images: bool = False,
    ):
        self.image_dir = os.fspath(image_dir)
        self.ann_file = os.fspath(ann_file)
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"image_dir {self.image_dir!r} is not a directory; pass the folder holding the images")
        short_sides = tuple(short_sides)
        if not short_sides:
            raise ValueError("short_sides must list at least one size, e.g. (640, 800)")
        for s in short_sides:
            check_count(s, "short_sides entries", 1)
        if max_size is not None:
            check_count(max_size, "max_size", 1)
        check_count(seed, "seed", 0)
        self.train = bool(train)
        self.short_sides = short_sides
        self.max_size = max_size
        self.flip = bool(flip)
        self.seed = seed
        self.epoch = 0
        self.cache_images = bool(cache_images)
        self._image_cache: dict = {}

        data = load_coco_json(self.ann_file)
        self.category_ids = sorted(c["id"] for c in data["categories"])
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.num_classes = len(self.category_ids)
        if self.num_classes == 0:
            raise ValueError(f"annotation file {self.ann_file!r} has no categories")
        contiguous = {cid: i for i, cid in enumerate(self.category_ids)}

        images = {}
        for record in sorted(data["images"], key=lambda r: r["id"]):
            images[record["id"]] = {
                "id": record["id"],
                "file_name": record["file_name"],
                "height": record["height"],
                "width": record["width"],
                "boxes": [],
                "labels": [],
                "ann_ids": [],
            }
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            info = images[ann["image_id"]]
            box = self._clean_box(ann, info)
            if box is not None:
                info["boxes"].append(box)
                info["labels"].append(contiguous[ann["category_id"]])
                info["ann_ids"].append(ann.get("id"))

        self.images = []
        for info in images.values():
            if self.train and not info["boxes"]:
                logger.warning(
                    "%s: skipping image id %r (%s) in training: it has no usable box",
                    self.ann_file, info["id"], info["file_name"],
                )
                continue
            self.images.append(info)
        if not self.images:
            raise ValueError(
                f"annotation file {self.ann_file!r} has no {'image with a usable box' if self.train else 'image'}; "
                f"nothing to {'train' if self.train else 'evaluate'} on"
            )
        if check_files:
            missing = [i for i in self.images if not os.path.isfile(self._path(i))]
            if missing:
                listed = ", ".join(f"{self._path(i)!r} (image id {i['id']!r})" for i in missing[:5])
                raise FileNotFoundError(
                    f"{len(missing)} image file(s) of {self.ann_file!r} are missing from {self.image_dir!r}: {listed}"
                    f"{' ...' if len(missing) > 5 else ''}"
                )

    def _clean_box(self, ann, info):
        """COCO ``[x, y, w, h]`` -> clipped xyxy, or ``None`` (logged) if degenerate or outside."""
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(info["width"])), min(y + h, float(info["height"]))
        if x1 - x0 <= 1 or y1 - y0 <= 1:
            outside = x >= info["width"] or y >= info["height"] or x + w <= 0 or y + h <= 0
            reason = "lies outside the image" if outside and w > 1 and h > 1 else "is empty or degenerate (width or height <= 1 px inside the image)"
            logger.warning(
                "%s: skipping annotation id %r of image id %r (%s): bbox %r %s (image %dx%d)",
                self.ann_file, ann["id"], info["id"], info["file_name"], ann["bbox"], reason,
                info["width"], info["height"],
            )
            return None
        return (x0, y0, x1, y1)

    def _path(self, info) -> str:
        return os.path.join(self.image_dir, info["file_name"])

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (see ``seed``)."""
        self.epoch = check_count(epoch, "epoch", 0)

    @property
    def image_ids(self) -> list:
        """COCO image ids in item order."""
        return [i["id"] for i in self.images]

    def load_image(self, index: int) -> Image.Image:
        """The original image of item ``index`` as an RGB PIL image (size checked against the JSON).

        Read with :func:`apro.data.images.read_rgb` (EXIF orientation applied, 16-bit scaled); a
        rotated file whose JSON gives the stored, unrotated size is read unrotated (with a warning).
        """
        info = self.images[index]
        path = self._path(info)
        try:
            rgb = read_rgb(path)
            if rgb.shape[:2] != (info["height"], info["width"]) and rgb.shape[:2] == (info["width"], info["height"]):
                # EXIF-rotated file annotated on its stored pixel grid: the JSON's size says which
                raw = read_rgb(path, exif_orientation=False)
                if raw.shape[:2] == (info["height"], info["width"]):
                    if path not in _RAW_GRID_WARNED:
                        _RAW_GRID_WARNED.add(path)
                        logger.warning(
                            "image file %r has an EXIF orientation but %r gives its stored (unrotated) size; "
                            "reading it unrotated to match the annotations", path, self.ann_file
                        )
                    rgb = raw
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path!r} (image id {info['id']!r} of {self.ann_file!r}) does not exist") from None
        except OSError as err:
            raise OSError(f"{err} (image id {info['id']!r} of {self.ann_file!r})") from err
        img = Image.fromarray(rgb)
        if img.size != (info["width"], info["height"]):
            raise ValueError(
                f"image file {path!r} (image id {info['id']!r}) is {img.size[0]}x{img.size[1]} but {self.ann_file!r} "
                f"says {info['width']}x{info['height']}; its boxes would be misplaced"
            )
        return img

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.images):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.images)} images")
        info = self.images[index]
        h, w = info["height"], info["width"]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            short_side = self.short_sides[int(rng.integers(len(self.short_sides)))]
            flip = self.flip and bool(rng.random() < 0.5)
        else:
            short_side, flip = max(self.short_sides), False
        nh, nw, scale = _resized_size(h, w, short_side, self.max_size)
        pixels = self._image_cache.get((index, nh, nw))
        if pixels is None:
            img = self.load_image(index)
            if (nh, nw) != (h, w):
                img = img.resize((nw, nh), Image.BILINEAR)
            pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
            if self.cache_images:
                self._image_cache[(index, nh, nw)] = pixels
        image = pixels.float().div_(255.0)

        boxes = torch.tensor(info["boxes"], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] *= nw / w
        boxes[:, 1::2] *= nh / h
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
        return {
            "image": image.contiguous(),
            "boxes": boxes,
            "labels": torch.tensor(info["labels"], dtype=torch.int64),
            "image_id": int(info["id"]),
            "orig_size": (h, w),
            "size": (nh, nw),
            "scale": float(scale),
            "flipped": flip,
        }


def collate_batch(items: Sequence[dict], size_divisor: int = _PAD_MULTIPLE) -> dict:
    """Batch dataset items, zero-padding images at the bottom/right to a multiple of ``size_divisor``.

    Returns a dict: ``images`` (B, 3, Hp, Wp) float; ``valid`` (B, 1, Hp, Wp) float, 1 on
    each image's own pixels and 0 on padding; ``targets`` the list of per-image dicts
    (every item key except ``image``). Boxes stay valid since padding is bottom/right.
    """
    if not items:
        raise ValueError("collate_batch needs at least one item")
    check_count(size_divisor, "size_divisor", 1)
    for i, item in enumerate(items):
        image = item.get("image") if isinstance(item, dict) else None
        if not (isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3):
            raise ValueError(f"items[{i}] must be a dataset item dict with 'image' of shape (3, H, W)")
    hmax = max(item["image"].shape[1] for item in items)
    wmax = max(item["image"].shape[2] for item in items)
    hp = -(-hmax // size_divisor) * size_divisor
    wp = -(-wmax // size_divisor) * size_divisor
    first = items[0]["image"]
    images = first.new_zeros((len(items), 3, hp, wp))
    valid = first.new_zeros((len(items), 1, hp, wp))
    targets = []
    for i, item in enumerate(items):
        _, h, w = item["image"].shape
        images[i, :, :h, :w] = item["image"]
        valid[i, :, :h, :w] = 1.0
        targets.append({k: v for k, v in item.items() if k != "image"})
    return {"images": images, "valid": valid, "targets": targets}
