"""PASCAL VOC semantic segmentation readers: the ``voc-sparse`` layout and the standard VOC 2012 one.

Label maps are single-channel PNGs (``'L'`` or palette ``'P'``; the palette index is the
class) with classes ``0..20`` and 255 for void / unlabeled. Every reader checks each file it
opens (decodable, same size as its image, no class index outside ``0..20`` or 255) and names
the file when it refuses one.

Layouts (``root`` is the directory given as ``--data``):

- ``voc-sparse`` (``../shared/data/voc-sparse``): ``images/NAME.jpg``, ``gt/NAME.png`` (dense
  GT), ``points/NAME.png``, ``scribbles/NAME.png`` (sparse labels, 255 = unlabeled),
  ``splits/{train,val}.txt``.
- VOC 2012 (``VOCdevkit/VOC2012``): ``JPEGImages/NAME.jpg``, ``SegmentationClassAug/NAME.png``
  or ``SegmentationClass/NAME.png`` (dense GT), ``ImageSets/Segmentation/{train,val}.txt``.
  Sparse labels are a directory of PNGs in the same encoding (``sparse_dir``), e.g. rasterised
  with :mod:`apro.data.sparse_formats`, or ``SegmentationPoints/`` / ``SegmentationScribbles/``
  under the root when present.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_INDEX = 255
LABEL_KINDS = ("points", "scribbles", "gt")


class VocDataError(ValueError):
    """A VOC file or directory that cannot be used; the message names it."""


def voc_palette() -> List[int]:
    """The VOC colour map as a flat 768-entry list for ``Image.putpalette`` (index 255 = (224, 224, 192))."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def read_image(path) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 of an image file; ``VocDataError`` naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise VocDataError(f"missing image file {os.fspath(path)}") from None
    except Exception as exc:
        raise VocDataError(f"cannot read image {os.fspath(path)}: {exc}") from None


def read_label(path, size: Optional[Sequence[int]] = None, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """A label PNG as ``(H, W)`` uint8, checked.

    Args:
        path: ``'L'`` or ``'P'`` PNG (palette index = class); ``'RGB'`` colour maps are refused.
        size: expected ``(H, W)`` (the image's), or None.
        num_classes: classes are ``0..num_classes-1``; 255 is void / unlabeled.

    Raises:
        VocDataError: missing, unreadable, multi-channel, wrong size, or unknown class index.
    """
    name = os.fspath(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise VocDataError(f"label {name} has PNG mode {im.mode!r}; expected a single-channel "
                                   "'L' or palette 'P' map of class indices")
            label = np.array(im, dtype=np.uint8)
    except VocDataError:
        raise
    except FileNotFoundError:
        raise VocDataError(f"missing label file {name}") from None
    except Exception as exc:
        raise VocDataError(f"cannot read label {name}: {exc}") from None
    if size is not None and tuple(label.shape) != tuple(size):
        raise VocDataError(f"label {name} is {label.shape[1]}x{label.shape[0]} but its image is "
                           f"{size[1]}x{size[0]} (W x H)")
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        value = int(label[bad][0])
        raise VocDataError(f"label {name} holds unknown class index {value} (classes are 0..{num_classes - 1}, "
                           f"{IGNORE_INDEX} = void)")
    return label


def write_label(path, label, palette: bool = True) -> None:
    """Write ``(H, W)`` class indices as a palette PNG (VOC colours) or an ``'L'`` PNG."""
    arr = label.cpu().numpy() if torch.is_tensor(label) else np.asarray(label)
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette(voc_palette())
    im.save(path)


def read_split(path) -> List[str]:
    """Names listed one per line (blank lines and surrounding spaces ignored)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise VocDataError(f"missing split file {os.fspath(path)}") from None
    names = [line.strip().split()[0] for line in text.splitlines() if line.strip()]
    if not names:
        raise VocDataError(f"split file {os.fspath(path)} lists no image")
    return names


@dataclass(frozen=True)
class VocFiles:
    """Paths of one split: ``images[i]``, its dense GT ``gts[i]`` (or None) and its training label ``labels[i]``."""

    names: tuple
    images: tuple
    gts: tuple
    labels: tuple
    layout: str


def detect_layout(root) -> str:
    """"voc-sparse" or "voc2012" from the directories present under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise VocDataError(f"data directory {os.fspath(root)} does not exist")
    if (root / "images").is_dir() and (root / "splits").is_dir():
        return "voc-sparse"
    if (root / "JPEGImages").is_dir() and (root / "ImageSets" / "Segmentation").is_dir():
        return "voc2012"
    raise VocDataError(f"{os.fspath(root)} is neither a voc-sparse directory (images/, gt/, splits/) nor a "
                       "VOC 2012 one (JPEGImages/, SegmentationClass[Aug]/, ImageSets/Segmentation/)")


def _existing(paths, what: str, split_file: str):
    for p in paths:
        if p is not None and not p.is_file():
            raise VocDataError(f"{what} {os.fspath(p)} is missing (listed in {split_file})")
    return tuple(paths)


def voc_files(root, split: str = "train", labels: Optional[str] = "gt", sparse_dir=None) -> VocFiles:
    """The files of ``split`` under ``root`` (either layout), each checked to exist.

    Args:
        root: data directory (see the module docstring).
        split: split name (``splits/NAME.txt`` or ``ImageSets/Segmentation/NAME.txt``) or a path to a
            split file.
        labels: the training label: "points", "scribbles", "gt", or None (no training label).
        sparse_dir: directory of ``NAME.png`` label maps used instead of the layout's own (e.g.
            dense pseudo labels, or sparse labels for a VOC 2012 tree).
    """
    root = Path(root)
    layout = detect_layout(root)
    if labels is not None and labels not in LABEL_KINDS:
        raise ValueError(f"labels must be one of {LABEL_KINDS} or None, got {labels!r}")
    if layout == "voc-sparse":
        split_file = Path(split) if split.endswith(".txt") else root / "splits" / f"{split}.txt"
        image_dir, gt_dir = root / "images", root / "gt"
        sparse = {"points": root / "points", "scribbles": root / "scribbles"}
    else:
        split_file = Path(split) if split.endswith(".txt") else root / "ImageSets" / "Segmentation" / f"{split}.txt"
        image_dir = root / "JPEGImages"
        gt_dir = root / "SegmentationClassAug"
        if not gt_dir.is_dir():
            gt_dir = root / "SegmentationClass"
        sparse = {"points": root / "SegmentationPoints", "scribbles": root / "SegmentationScribbles"}
    names = read_split(split_file)
    sf = os.fspath(split_file)
    images = _existing([image_dir / f"{n}.jpg" for n in names], "image", sf)
    has_gt = gt_dir.is_dir()
    gts = _existing([gt_dir / f"{n}.png" for n in names], "ground truth", sf) if has_gt else (None,) * len(names)
    if sparse_dir is not None:
        label_dir = Path(sparse_dir)
        if not label_dir.is_dir():
            raise VocDataError(f"label directory {os.fspath(label_dir)} does not exist")
        label_paths = _existing([label_dir / f"{n}.png" for n in names], "label", sf)
    elif labels == "gt":
        if not has_gt:
            raise VocDataError(f"{os.fspath(root)} has no dense ground truth directory")
        label_paths = gts
    elif labels is None:
        label_paths = (None,) * len(names)
    else:
        if not sparse[labels].is_dir():
            raise VocDataError(f"{os.fspath(root)} has no {labels} directory ({os.fspath(sparse[labels])}); "
                               "pass sparse_dir (--label-dir) with NAME.png label maps")
        label_paths = _existing([sparse[labels] / f"{n}.png" for n in names], f"{labels} label", sf)
    return VocFiles(tuple(names), images, gts, label_paths, layout)


class VocSegmentation(Dataset):
    """One VOC split as a dataset of ``{"name", "image", "label", "gt", "valid"}`` items.

    ``image`` is ``(3, H, W)`` float32 RGB in [0, 1]; ``label`` (the training label) and ``gt``
    (the dense ground truth, when the layout has it) are ``(H, W)`` int64 with 255 = void /
    unlabeled; ``valid`` ``(H, W)`` bool is False on padding a transform added (the pairwise
    losses leave it out: it is not unlabeled image). ``transform(image, *labels) -> (image,
    *labels)`` is applied last to ``label``, ``gt`` and a map of ones (e.g.
    :class:`apro.data.augmentation.SemanticAugmentation`, which pads labels with 255).

    Args:
        root, split, labels, sparse_dir: see :func:`voc_files`.
        transform: optional joint transform.
        num_classes: 21 for VOC.
    """

    def __init__(self, root, split: str = "train", labels: Optional[str] = "points", sparse_dir=None,
                 transform=None, num_classes: int = NUM_CLASSES):
        self.files = voc_files(root, split, labels, sparse_dir)
        self.root = os.fspath(root)
        self.split = split
        self.labels = labels
        self.transform = transform
        self.num_classes = num_classes
        self.class_names = VOC_CLASSES if num_classes == NUM_CLASSES else tuple(str(i) for i in range(num_classes))

    def __len__(self) -> int:
        return len(self.files.names)

    def load(self, index: int):
        """Decoded arrays ``(image HxWx3 uint8, label HxW uint8 or None, gt HxW uint8 or None)``."""
        f = self.files
        image = read_image(f.images[index])
        size = image.shape[:2]
        gt = read_label(f.gts[index], size, self.num_classes) if f.gts[index] is not None else None
        if f.labels[index] is None:
            label = None
        elif f.labels[index] == f.gts[index]:
            label = gt
        else:
            label = read_label(f.labels[index], size, self.num_classes)
        return image, label, gt

    def __getitem__(self, index: int) -> dict:
        image, label, gt = self.load(index)
        h, w = image.shape[:2]
        img = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
        lab = torch.from_numpy(label.astype(np.int64)) if label is not None else torch.full((h, w), IGNORE_INDEX)
        g = torch.from_numpy(gt.astype(np.int64)) if gt is not None else torch.full((h, w), IGNORE_INDEX)
        inside = torch.ones((h, w), dtype=torch.int64)
        if self.transform is not None:
            img, lab, g, inside = self.transform(img, lab, g, inside)
        return {"name": self.files.names[index], "image": img, "label": lab, "gt": g, "valid": inside == 1}


def check_files(dataset: VocSegmentation, progress: bool = False) -> int:
    """Decode every file of ``dataset`` once (sizes and class indices checked); returns the count."""
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="checking labels", unit="img")
    for i in indices:
        dataset.load(i)
    return len(dataset)
