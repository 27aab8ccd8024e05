"""A synthetic COCO-format set for tests and examples: textured shapes on a striped background."""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from .._validation import check_count


class SyntheticCoco(NamedTuple):
    """Paths written by :func:`make_synthetic_coco`."""

    image_dir: str
    train_ann: str
    eval_ann: str


_SHAPES = ("ellipse", "triangle", "diamond")


def _texture(rng, h, w, base, amplitude):
    """``base`` RGB colour modulated by oriented stripes and pixel noise, clipped to [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4.0, 12.0)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 2 * np.pi))
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    noise = rng.normal(0.0, amplitude * 0.4, size=(h, w, 3)).astype(np.float32)
    out = np.asarray(base, np.float32)[None, None, :] + amplitude * stripes[..., None] * tint + noise
    return np.clip(out, 0.0, 1.0)


def _shape_mask(rng, kind, h, w, cy, cx, ry, rx):
    """Boolean (h, w) mask of one shape centred at (cy, cx) with half extents (ry, rx)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if kind == "ellipse":
        t = rng.uniform(0, np.pi)
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if kind == "diamond":
        return np.abs(dx) / rx + np.abs(dy) / ry <= 1.0
    # triangle: random vertices on three sectors of the ellipse around the centre
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, size=3)
    px, py = cx + rx * np.cos(angles), cy + ry * np.sin(angles)
    signs = []
    for k in range(3):
        ax, ay, bx, by = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
        signs.append((bx - ax) * (yy - ay) - (by - ay) * (xx - ax))
    return ((signs[0] >= 0) & (signs[1] >= 0) & (signs[2] >= 0)) | ((signs[0] <= 0) & (signs[1] <= 0) & (signs[2] <= 0))


def _class_colour(c: int, num_classes: int) -> np.ndarray:
    hue = (c / max(num_classes, 1) + 0.05) % 1.0
    # saturated HSV -> RGB (value 0.9, saturation 0.85)
    i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
    v, s = 0.9, 0.85
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def make_synthetic_coco(root, num_images: int, size=(96, 128), num_classes: int = 2, seed: int = 0) -> SyntheticCoco:
    """Write a small COCO-format instance segmentation set of textured shapes.

    Each image (PNG) has a textured, low-saturation background and 1-3 non-overlapping
    objects. An object's class fixes its shape (class ``c`` is an ellipse, triangle or
    diamond for ``c % 3`` = 0, 1, 2 — none fills its box, so filled boxes score clearly
    below true masks) and its hue (saturated, jittered); each object is textured with its
    own stripes and noise. Two JSONs share image and annotation ids:
    ``train.json`` has boxes and categories only (no ``segmentation``, ``area`` is the box
    area) and ``eval.json`` adds RLE ``segmentation``, mask ``area`` and ``iscrowd=0``.
    Boxes are the tight pixel boxes of the masks. Deterministic for a ``seed``.

    Returns :class:`SyntheticCoco` (image_dir, train_ann, eval_ann).
    """
    from pycocotools import mask as mask_utils

    check_count(num_images, "num_images", 1)
    check_count(num_classes, "num_classes", 1)
    check_count(seed, "seed", 0)
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise TypeError(f"size must be a pair (H, W), got {size!r}")
    h, w = (check_count(int(s), "size entries", 16) for s in size)
    root = os.fspath(root)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)

    categories = [{"id": c + 1, "name": f"{_SHAPES[c % 3]}_{c}", "supercategory": "shape"} for c in range(num_classes)]
    images, train_anns, eval_anns = [], [], []
    ann_id = 1
    for image_index in range(num_images):
        image_id = image_index + 1
        grey = rng.uniform(0.3, 0.6)
        canvas = _texture(rng, h, w, (grey, grey, grey) + rng.uniform(-0.05, 0.05, 3), 0.12)
        occupied = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, 4))):
            c = int(rng.integers(num_classes))
            for _attempt in range(30):
                ry = rng.uniform(0.12, 0.3) * min(h, w)
                rx = ry * rng.uniform(0.7, 1.4)
                cy, cx = rng.uniform(ry, h - ry), rng.uniform(min(rx, w / 2), max(w - rx, w / 2))
                mask = _shape_mask(rng, _SHAPES[c % 3], h, w, cy, cx, ry, rx)
                grown = mask.copy()
                grown[1:] |= mask[:-1]; grown[:-1] |= mask[1:]
                grown[:, 1:] |= mask[:, :-1]; grown[:, :-1] |= mask[:, 1:]
                if mask.sum() >= 16 and not (grown & occupied).any():
                    break
            else:
                continue
            occupied |= mask
            colour = np.clip(_class_colour(c, num_classes) + rng.uniform(-0.08, 0.08, 3), 0, 1)
            canvas[mask] = _texture(rng, h, w, colour, 0.08)[mask]
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            common = {"id": ann_id, "image_id": image_id, "category_id": c + 1, "bbox": bbox, "iscrowd": 0}
            train_anns.append({**common, "area": float(bbox[2] * bbox[3])})
            eval_anns.append({**common, "area": float(mask.sum()), "segmentation": rle})
            ann_id += 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray((canvas * 255 + 0.5).astype(np.uint8)).save(os.path.join(image_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})

    paths = SyntheticCoco(image_dir, os.path.join(root, "train.json"), os.path.join(root, "eval.json"))
    for path, anns in ((paths.train_ann, train_anns), (paths.eval_ann, eval_anns)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return paths
