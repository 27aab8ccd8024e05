"""Pictures: mask overlays for ``apro refine``/``apro demo`` and the paper's Fig. 3 affinity maps.

Affinity of a pixel ``i`` to every pixel ``j`` (paper Fig. 3):

- GP: ``psi_g(i, j) = exp(-C_ij / zeta_g^2)``, ``C_ij`` the largest edge weight on the MST path
  (SPEC §2), on the ImageNet-normalised image. Shown *unnormalised*: 1 at ``i`` itself.
- Tree filter: ``exp(-sum of edge weights on the path / sigma)`` on the raw RGB image in
  [0, 1] (SPEC §5, TEL). Unnormalised: 1 at ``i``.
- LP: ``T`` local steps are not a symmetric kernel, so what is shown is how much of a unit
  delta at ``i`` each pixel holds after :func:`apro.local_propagation` (the column ``i`` of
  the ``T``-step operator), divided by its maximum so the panel spans [0, 1].

GP and the tree filter are symmetric kernels; running :func:`apro.global_propagation` on a
delta at ``i`` returns ``psi(j, i) / z_j``, which mixes in every pixel's normaliser ``z_j``.
The maps here undo that by reading the path maxima/sums off the same spanning tree instead;
``tests/test_figures.py`` checks both against a brute force and against
``global_propagation`` itself.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .propagation import local_propagation
from ._color import imagenet_normalize
from .tree import SpanningTree, minimum_spanning_tree

MASK_COLOUR = (30, 144, 255)
CONTOUR_COLOUR = (255, 255, 0)
BOX_COLOUR = (0, 255, 0)
OBJECT_LABEL_COLOUR = (255, 0, 0)
BACKGROUND_LABEL_COLOUR = (0, 255, 255)


def line_width(height: int, width: int) -> int:
    """Pixels of an overlay's lines for an image of this size: 2 up to 500 px, then ~1/250 of
    the longer side, so lines stay visible when a large image is shown scaled down."""
    return max(2, int(round(max(height, width) / 250)))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` (H, W) bool grown by a ``(2 radius + 1)``-pixel square (separable max filter)."""
    if radius <= 0:
        return mask
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        n = out.shape[axis]
        for shift in range(1, min(radius, n - 1) + 1):
            lead = [slice(None)] * 2
            lag = [slice(None)] * 2
            lead[axis], lag[axis] = slice(shift, None), slice(None, n - shift)
            grown[tuple(lead)] |= out[tuple(lag)]
            grown[tuple(lag)] |= out[tuple(lead)]
        out = grown
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    m = np.pad(mask, 1, constant_values=False)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """``(H, W)`` bool contour of ``mask`` about ``width`` pixels thick (its boundary pixels grown
    by ``(width - 1) // 2``), for drawing; see :func:`line_width`."""
    return _dilate(_boundary(np.asarray(mask, bool)), (int(width) - 1) // 2)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    box: Optional[Sequence[float]] = None,
    labels: Optional[np.ndarray] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Image with the mask tinted and outlined, the box drawn and sparse labels painted.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool object mask.
        box: optional ``(x0, y0, x1, y1)`` drawn as a green rectangle.
        labels: optional ``(H, W)`` sparse labels (1 object -> red, 0 background -> cyan,
            anything else unlabeled), each labelled pixel drawn as a square dot so single
            clicked points stay visible.
        alpha: opacity of the mask tint.

    The contour (yellow), box lines and label dots are :func:`line_width` pixels wide (2 px
    up to a 500-pixel image, growing with the image's longer side).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    image = np.asarray(image)
    mask = np.asarray(mask, bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask must have shape {image.shape[:2]}, got {mask.shape}")
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(MASK_COLOUR, np.float32)
    out = out.round().astype(np.uint8)
    h, w = mask.shape
    lw = line_width(h, w)
    out[outline(mask, lw)] = CONTOUR_COLOUR
    if labels is not None:
        labels = np.asarray(labels)
        out[_dilate(labels == 0, lw)] = BACKGROUND_LABEL_COLOUR
        out[_dilate(labels == 1, lw)] = OBJECT_LABEL_COLOUR
    if box is not None:
        x0, y0 = int(np.clip(round(box[0]), 0, w - 1)), int(np.clip(round(box[1]), 0, h - 1))
        x1, y1 = int(np.clip(round(box[2]) - 1, 0, w - 1)), int(np.clip(round(box[3]) - 1, 0, h - 1))
        for t in range(lw):
            out[np.clip(y0 + t, 0, h - 1), x0 : x1 + 1] = BOX_COLOUR
            out[np.clip(y1 - t, 0, h - 1), x0 : x1 + 1] = BOX_COLOUR
            out[y0 : y1 + 1, np.clip(x0 + t, 0, w - 1)] = BOX_COLOUR
            out[y0 : y1 + 1, np.clip(x1 - t, 0, w - 1)] = BOX_COLOUR
    return out


def _path_costs(tree: SpanningTree, source: int, reduce: str) -> np.ndarray:
    """For every pixel j, the max (``"max"``) or sum (``"sum"``) of edge weights on the tree
    path from ``source`` to j (first tree of the batch)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order

    n = tree.num_pixels
    u = tree.edges[0, :, 0].numpy()
    v = tree.edges[0, :, 1].numpy()
    w = tree.weights[0].numpy().astype(np.float64)
    graph = coo_matrix((np.ones(len(u)), (u, v)), shape=(n, n)).tocsr()
    order, pred = breadth_first_order(graph, source, directed=False, return_predecessors=True)
    # weight of the edge joining each node to its BFS parent
    up = np.zeros(n)
    child_is_v = pred[v] == u
    up[v[child_is_v]] = w[child_is_v]
    up[u[~child_is_v]] = w[~child_is_v]
    cost = np.zeros(n)
    combine = max if reduce == "max" else (lambda a, b: a + b)
    pred_list, up_list, cost_list = pred.tolist(), up.tolist(), [0.0] * n
    for node in order[1:].tolist():
        cost_list[node] = combine(cost_list[pred_list[node]], up_list[node])
    cost[:] = cost_list
    return cost


def _check_pixel(pixel: Sequence[int], h: int, w: int) -> tuple:
    x, y = int(pixel[0]), int(pixel[1])
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"pixel ({x}, {y}) is outside the {w}x{h} image (x in [0, {w - 1}], y in [0, {h - 1}])")
    return x, y


def gp_affinity(image: torch.Tensor, pixel: Sequence[int], zeta: float = 0.01) -> torch.Tensor:
    """GP affinity ``exp(-C_ij / zeta^2)`` of ``pixel = (x, y)`` to all pixels, ``(H, W)``.

    ``image``: ``(3, H, W)`` RGB in [0, 1]; the tree is built on its ImageNet normalisation.
    """
    _, h, w = image.shape
    x, y = _check_pixel(pixel, h, w)
    tree = minimum_spanning_tree(imagenet_normalize(image[None].float()))
    cost = _path_costs(tree, y * w + x, "max")
    return torch.from_numpy(np.exp(-cost / zeta**2).reshape(h, w)).float()


def tree_filter_affinity(image: torch.Tensor, pixel: Sequence[int], sigma: float = 0.02) -> torch.Tensor:
    """Tree-filter affinity ``exp(-sum_path w / sigma)`` of ``pixel`` on the raw RGB MST, ``(H, W)``."""
    _, h, w = image.shape
    x, y = _check_pixel(pixel, h, w)
    tree = minimum_spanning_tree(image[None].float())
    cost = _path_costs(tree, y * w + x, "sum")
    return torch.from_numpy(np.exp(-cost / sigma).reshape(h, w)).float()


def lp_affinity(
    image: torch.Tensor, pixel: Sequence[int], zeta: float = 0.15, kernel_size: int = 5, iterations: int = 20
) -> torch.Tensor:
    """LP spread of a unit delta at ``pixel`` after ``iterations`` steps, scaled to max 1, ``(H, W)``."""
    _, h, w = image.shape
    x, y = _check_pixel(pixel, h, w)
    delta = torch.zeros(1, 1, h, w, dtype=torch.float64)
    delta[0, 0, y, x] = 1.0
    guide = imagenet_normalize(image[None].double())
    spread = local_propagation(delta, guide, kernel_size, zeta, iterations)[0, 0]
    return (spread / spread.max()).float()


def affinity_figure(
    image: torch.Tensor,
    pixel: Sequence[int],
    path: str,
    zeta_g: float = 0.01,
    zeta_s: float = 0.15,
    sigma: float = 0.02,
    kernel_size: int = 5,
    iterations: int = 20,
    dpi: int = 120,
) -> dict:
    """Write the paper's Fig. 3 for one pixel: image (star), tree filter, LP, GP side by side.

    ``image``: ``(3, H, W)`` RGB in [0, 1]; ``pixel``: ``(x, y)``. Writes a PNG to ``path`` and
    returns the three ``(H, W)`` maps by name (``"treefilter"``, ``"lp"``, ``"gp"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = {
        "treefilter": tree_filter_affinity(image, pixel, sigma),
        "lp": lp_affinity(image, pixel, zeta_s, kernel_size, iterations),
        "gp": gp_affinity(image, pixel, zeta_g),
    }
    titles = {
        "treefilter": f"Tree filter (sigma={sigma:g})",
        "lp": f"LP ({kernel_size}x{kernel_size}, T={iterations}, zeta_s={zeta_s:g}), max-scaled",
        "gp": f"GP (zeta_g={zeta_g:g})",
    }
    x, y = int(pixel[0]), int(pixel[1])
    h, w = image.shape[-2:]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4 * h / w + 0.6))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title("image")
    for ax, name in zip(axes[1:], ("treefilter", "lp", "gp")):
        im = ax.imshow(maps[name].numpy(), cmap="jet", vmin=0, vmax=1)
        ax.set_title(titles[name], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    axes[0].plot([x], [y], marker="*", color="lime", markersize=14, markeredgecolor="black")
    for ax in axes[1:]:  # hollow on the maps so LP's few-pixel spread stays visible
        ax.plot([x], [y], marker="*", markersize=12, markerfacecolor="none", markeredgecolor="lime")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return maps
