"""Classical single-image segmenters APro's pseudo labels are compared with (SPEC §5, issue 3).

Thin wrappers with one calling convention: ``image`` is an ``(H, W, 3)`` uint8 RGB array,
labels follow :mod:`apro.refine` (0 = background, 1 = object, 255 = unlabeled), every function
returns an ``(H, W)`` bool object mask. OpenCV, scikit-image and pydensecrf2 are imported
lazily, so ``apro`` itself does not need them; a missing one raises ImportError naming the pip
package to install.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .refine import check_box


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this classical method needs the '{package}' package ({err}); "
            f"install it with: pip install {package}   (or: pip install 'apro[classical]')"
        ) from None


def _check_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _check_labels(labels, image: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels must have shape {image.shape[:2]} like the image, got {labels.shape}")
    if not ((labels == 0).any() and (labels == 1).any()):
        raise ValueError("labels need at least one object (1) and one background (0) pixel")
    return labels


def grabcut(image, box: Sequence[float], iterations: int = 5) -> np.ndarray:
    """OpenCV GrabCut initialised with a rectangle ``(x0, y0, x1, y1)`` (x1/y1 exclusive).

    Returns the ``(H, W)`` bool mask of definite + probable foreground.
    """
    cv2 = _require("cv2", "opencv-python-headless")
    image = _check_rgb(image)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = check_box(box, h, w)
    x0, y0 = int(round(x0)), int(round(y0))
    x1, y1 = max(x0 + 1, int(round(x1))), max(y0 + 1, int(round(y1)))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(bgr, mask, (x0, y0, x1 - x0, y1 - y0), bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        # GrabCut needs background samples; a box covering the whole image has none
        return np.zeros((h, w), bool) | _box_array(h, w, x0, y0, x1, y1)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def _box_array(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def random_walker(image, labels, beta: float = 130.0) -> np.ndarray:
    """scikit-image ``random_walker`` seeded by scribbles/points (0 bg, 1 object, 255 unlabeled)."""
    seg = _require("skimage.segmentation", "scikit-image")
    image = _check_rgb(image)
    labels = _check_labels(labels, image)
    seeds = np.zeros(labels.shape, np.int32)
    seeds[labels == 0] = 1
    seeds[labels == 1] = 2
    result = seg.random_walker(image.astype(np.float64) / 255.0, seeds, beta=beta, mode="cg_j", channel_axis=-1)
    return result == 2


def dense_crf(
    image,
    object_probability,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 60.0,
    bilateral_srgb: float = 10.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl & Koltun 2011) via ``pydensecrf2``.

    ``object_probability``: ``(H, W)`` unary P(object) in [0, 1]. Returns the MAP bool mask.
    """
    dcrf = _require("pydensecrf.densecrf", "pydensecrf2")
    image = _check_rgb(image)
    p = np.asarray(object_probability, np.float64)
    if p.shape != image.shape[:2]:
        raise ValueError(f"object_probability must have shape {image.shape[:2]}, got {p.shape}")
    p = np.clip(p, 1e-5, 1 - 1e-5)
    h, w = p.shape
    unary = -np.log(np.stack([1 - p, p]).reshape(2, -1)).astype(np.float32)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    q = np.array(crf.inference(iterations)).reshape(2, h, w)
    return q[1] > q[0]


def dense_crf_box(image, box: Sequence[float], object_prior: float = 0.6, **kwargs) -> np.ndarray:
    """DenseCRF from a box: P(object) = ``object_prior`` inside the box, ~0 outside."""
    image = _check_rgb(image)
    h, w = image.shape[:2]
    x0, y0, x1, y1 = check_box(box, h, w)
    prior = np.zeros((h, w))
    prior[_box_array(h, w, int(round(x0)), int(round(y0)), max(int(round(x0)) + 1, int(round(x1))),
                     max(int(round(y0)) + 1, int(round(y1))))] = object_prior
    return dense_crf(image, prior, **kwargs) & (prior > 0)


def dense_crf_labels(image, labels, confidence: float = 0.9, **kwargs) -> np.ndarray:
    """DenseCRF from scribbles/points: labeled pixels get ``confidence``, unlabeled 0.5."""
    image = _check_rgb(image)
    labels = _check_labels(labels, image)
    prior = np.full(labels.shape, 0.5)
    prior[labels == 1] = confidence
    prior[labels == 0] = 1 - confidence
    return dense_crf(image, prior, **kwargs)
