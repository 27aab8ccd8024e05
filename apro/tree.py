"""Minimum spanning trees of the 4-connected pixel grid (paper Sec. 3.2.1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _kernels
from ._threads import map_images, parallel_calls
from ._validation import check_float_tensor


@dataclass(frozen=True)
class SpanningTree:
    """The spanning trees of a batch of ``H x W`` grids.

    ``edges``: ``(B, N-1, 2)`` int64 pixel indices (row-major, ``y * W + x``), sorted by
    ascending ``weights`` ``(B, N-1)`` float32 (the squared guide distance of each edge).
    Both live on the CPU, where the sequential kernels run.
    """

    edges: torch.Tensor
    weights: torch.Tensor
    height: int
    width: int

    @property
    def batch_size(self) -> int:
        return int(self.edges.shape[0])

    @property
    def num_pixels(self) -> int:
        return self.height * self.width

    def select(self, index: torch.Tensor) -> "SpanningTree":
        """Trees picked (and possibly repeated) by ``index`` ``(M,)``, e.g. one per instance."""
        index = torch.as_tensor(index, dtype=torch.long, device="cpu")
        return SpanningTree(self.edges[index], self.weights[index], self.height, self.width)


def _float_numpy(x: torch.Tensor) -> np.ndarray:
    """A C-contiguous NumPy copy or view of ``x`` on the CPU, float32/64 kept, other floats
    as float32."""
    x = x.detach().cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.contiguous().numpy()


def grid_edge_weights(guide: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance ``||g_k - g_l||^2`` across every 4-grid edge.

    ``guide``: ``(B, D, H, W)``. Returns ``(B, 2*H*W)`` float32 on the CPU: entry ``p`` is the
    edge from pixel ``p`` to its right neighbour, entry ``H*W + p`` the edge to the pixel
    below; slots without a neighbour (last column, last row) hold ``inf`` and sort last.
    """
    g = _float_numpy(guide)
    b, _, h, w = g.shape
    out = np.empty((b, 2 * h * w), dtype=np.float32)
    for i in range(b):
        _kernels.grid_weights(g[i], out[i], 0, h)
    return torch.from_numpy(out)


def tree_edge_weights(tree: SpanningTree, embedding: torch.Tensor) -> torch.Tensor:
    """``||e_k - e_l||^2`` for every tree edge. ``embedding``: ``(B, E, H, W)``; returns ``(B, N-1)``."""
    e = embedding.detach().to("cpu", torch.float64).flatten(2)
    u = tree.edges[..., 0].unsqueeze(1).expand(-1, e.shape[1], -1)
    v = tree.edges[..., 1].unsqueeze(1).expand(-1, e.shape[1], -1)
    return (e.gather(2, u) - e.gather(2, v)).pow(2).sum(1).to(torch.float32)


_SPLIT_PIXELS = 1 << 16


def grid_merges(guide: np.ndarray, threads: int = 1):
    """Kruskal on one image's grid (``guide``: ``(D, H, W)`` NumPy float).

    Returns ``(left, right, weight, edge)`` of the merge tree, merges in ascending order
    (see :func:`apro._kernels.grid_merges`). Only the edges that survive the 4-cycle test
    are sorted. With ``threads=2`` the top and bottom halves of the image are weighed,
    filtered and sorted in parallel; Kruskal merges the two sorted lists.
    """
    _, h, w = guide.shape
    n = h * w
    weights = np.empty(2 * n, dtype=np.float32)
    keep = np.ones(2 * n, dtype=np.uint8)
    if n < _SPLIT_PIXELS:  # below this, starting threads costs more than it saves
        threads = 1
    bounds = np.linspace(0, h, max(1, min(threads, h // 2)) + 1).astype(int)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    with parallel_calls(len(ranges)) as run:
        run(lambda r: _kernels.grid_weights(guide, weights, r[0], r[1]), ranges)
        run(lambda r: _kernels.drop_cycle_maxima(weights, h, w, keep, r[0], r[1]), ranges)
        lists = run(lambda r: _kernels.sort_keys(_kernels.candidate_keys(weights, keep, h, w, r[0], r[1])), ranges)
    second = lists[1] if len(lists) > 1 else np.empty(0, dtype=np.uint64)
    return _kernels.grid_merges(lists[0], second, h, w, _kernels.union_find_array(n))


def _edge_pixels(edge: np.ndarray, height: int, width: int) -> np.ndarray:
    """Grid edge ids (as in :func:`grid_edge_weights`) -> ``(M, 2)`` int64 pixel pairs."""
    n = height * width
    e = edge.astype(np.int64)
    below = e >= n
    p = np.where(below, e - n, e)
    return np.stack([p, np.where(below, p + width, p + 1)], axis=1)


def minimum_spanning_tree(guide: torch.Tensor, num_workers: int | None = None) -> SpanningTree:
    """Minimum spanning tree of each image's 4-connected grid (Kruskal).

    Args:
        guide: ``(B, D, H, W)`` float image or feature map; edge weight ``||g_k - g_l||^2``.
        num_workers: threads over the batch (default: ``torch.get_num_threads()``).

    Returns:
        :class:`SpanningTree` with ``B`` trees of ``H*W - 1`` edges each, in ascending weight
        order. Ties are broken by edge index, so the result is deterministic.
    """
    check_float_tensor(guide, "guide", 4, "(B, D, H, W)")
    b, _, h, w = guide.shape
    g = _float_numpy(guide)
    merges = map_images(lambda i: grid_merges(g[i]), b, num_workers)
    edges = torch.from_numpy(np.stack([_edge_pixels(m[3], h, w) for m in merges]).reshape(b, h * w - 1, 2))
    weights = torch.from_numpy(np.stack([m[2] for m in merges]).reshape(b, h * w - 1))
    return SpanningTree(edges=edges, weights=weights, height=h, width=w)
