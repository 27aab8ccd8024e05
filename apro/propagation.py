"""Global and local affinity propagation (paper Eqs. 2-6) and the tree filter it is compared with.

All three produce *targets*: they run without autograd and their results carry no gradient.
"""
from __future__ import annotations

import threading
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from . import _kernels
from ._threads import default_workers, map_images
from ._validation import (
    check_count,
    check_float_tensor,
    check_kernel_size,
    check_positive,
    check_same_grid,
)
from .tree import _SPLIT_PIXELS, SpanningTree, _float_numpy, grid_merges, minimum_spanning_tree, tree_edge_weights

GuideOrTree = Union[torch.Tensor, SpanningTree]


def _check_values(values: torch.Tensor) -> torch.Tensor:
    return check_float_tensor(values, "values", 4, "(B, C, H, W)")


def _is_tree(guide_or_tree: GuideOrTree, values: torch.Tensor) -> bool:
    """Check ``guide_or_tree`` against ``values``; True for a prebuilt tree, False for a guide."""
    if isinstance(guide_or_tree, SpanningTree):
        _check_tree(guide_or_tree, values)
        return True
    check_float_tensor(guide_or_tree, "guide_or_tree", 4, "(B, D, H, W) or a SpanningTree")
    check_same_grid(values, "values", guide_or_tree, "guide_or_tree")
    return False


def _check_tree(tree: SpanningTree, values: torch.Tensor) -> None:
    b, _, h, w = values.shape
    if (tree.height, tree.width) != (h, w):
        raise ValueError(
            f"guide_or_tree is a tree of a {tree.height}x{tree.width} grid but values is {h}x{w}; "
            f"build the tree at the values' resolution"
        )
    if tree.batch_size != b:
        raise ValueError(f"guide_or_tree holds {tree.batch_size} trees but values has batch size {b}")
    n = h * w
    if tuple(tree.edges.shape) != (b, n - 1, 2) or tuple(tree.weights.shape) != (b, n - 1):
        raise ValueError(
            f"guide_or_tree must hold (B, N-1, 2) edges and (B, N-1) weights with N = {n}, got "
            f"{tuple(tree.edges.shape)} and {tuple(tree.weights.shape)}"
        )
    if n > 1 and (int(tree.edges.min()) < 0 or int(tree.edges.max()) >= n):
        raise ValueError(f"guide_or_tree has edges outside the pixels 0..{n - 1} of a {h}x{w} grid")
    if not bool(torch.isfinite(tree.weights).all()) or bool((tree.weights < 0).any()):
        raise ValueError("guide_or_tree has negative, NaN or inf edge weights")


def _planes(values: torch.Tensor, channel_last: bool = False) -> np.ndarray:
    """``(B, C, H, W)`` -> NumPy ``(B, C, N)`` (float32/64 kept), or ``(B, N, C)`` float64."""
    if channel_last:
        return values.detach().cpu().to(torch.float64).flatten(2).transpose(1, 2).contiguous().numpy()
    return _float_numpy(values.flatten(2))


def _to_output(out, like: torch.Tensor, channel_last: bool = False) -> torch.Tensor:
    y = torch.from_numpy(out if isinstance(out, np.ndarray) else np.stack(out))
    if channel_last:
        y = y.transpose(1, 2)
    return y.reshape(like.shape).to(device=like.device, dtype=like.dtype)


def _tree_merges(edges, weights, n):
    """Merge tree of one spanning tree given as ``(N-1, 2)`` edges with weights (any order)."""
    if weights.size > 1 and not bool((weights[1:] >= weights[:-1]).all()):
        order = _kernels.argsort_weights(weights)
        edges, weights = edges[order], weights[order]
    u = np.ascontiguousarray(edges[:, 0])
    v = np.ascontiguousarray(edges[:, 1])
    left, right = _kernels.tree_merges(u, v, _kernels.union_find_array(n))
    return left, right, np.ascontiguousarray(weights, dtype=np.float32)


_BLOCK = 7  # channels per float64 row of 8 (with the normaliser): one cache line


def _row_width(channels: int) -> int:
    return 2 if channels == 1 else 4 if channels <= 3 else 8


def _channel_blocks(channels: int, spread: int):
    """Channel ranges of at most 7, and at least ``spread`` of them (for idle threads)."""
    blocks = max(-(-channels // _BLOCK), min(channels, spread))
    bounds = np.linspace(0, channels, blocks + 1).astype(int)
    return list(zip(bounds[:-1], bounds[1:]))


class _RowBuffers(threading.local):
    """Each thread's scratch rows, reused across the blocks and images of one call."""

    def get(self, n: int, width: int) -> np.ndarray:
        rows = getattr(self, "rows", None)
        if rows is None or rows.shape != (2 * n - 1, width):
            rows = self.rows = _kernels.row_buffer(n, width)
        return rows


def _propagate_image(merge, planes, out, inv_zeta2, blocks, buffers):
    """GP of one image's ``planes`` ``(C, N)`` into ``out`` over its merge tree, for the
    channel ``blocks`` given."""
    for lo, hi in blocks:
        rows = buffers.get(planes.shape[1], _row_width(hi - lo))
        _kernels.propagate_merges(merge[0], merge[1], merge[2], inv_zeta2, planes[lo:hi], rows, out[lo:hi])


def _propagate(merge_of, planes, inv_zeta2, num_workers, split_merge=None):
    """GP of every image, its merge tree from ``merge_of(i)`` (``(left, right, weight, ...)``).

    With at least as many images as threads, each thread does whole images (tree and all
    channels). With fewer, the trees are built first (by ``split_merge(i)`` if given, which
    may itself use the idle threads) and then the channel blocks of each image are spread
    over the threads.
    """
    b, c, n = planes.shape
    workers = num_workers or default_workers()
    out = np.empty_like(planes)
    buffers = _RowBuffers()
    if b >= workers:
        whole = _channel_blocks(c, 1)
        map_images(lambda i: _propagate_image(merge_of(i), planes[i], out[i], inv_zeta2, whole, buffers), b, num_workers)
        return out
    if n < _SPLIT_PIXELS:  # small images: spreading channels costs more than it saves
        workers = b
    merges = map_images(split_merge or merge_of, b, num_workers)
    jobs = [(i, block) for i in range(b) for block in _channel_blocks(c, workers // b)]

    def run(k):
        i, block = jobs[k]
        _propagate_image(merges[i], planes[i], out[i], inv_zeta2, [block], buffers)

    map_images(run, len(jobs), num_workers)
    return out


@torch.no_grad()
def global_propagation(
    values: torch.Tensor,
    guide_or_tree: GuideOrTree,
    zeta: float,
    embedding: Optional[torch.Tensor] = None,
    num_workers: Optional[int] = None,
) -> torch.Tensor:
    """Exact global affinity propagation over a minimum spanning tree (paper Eqs. 3-4).

    ``y_i = sum_j phi_j exp(-C_ij / zeta^2) / sum_j exp(-C_ij / zeta^2)`` over *all* pixels j,
    where ``C_ij`` is the largest edge weight on the tree path between i and j (0 for i = j).
    Computed exactly by ascending merges with lazy tags (Sec. 3.3, Alg. 1): one radix sort
    (of the grid edges that survive a 4-cycle test) and one union-find per image, shared by
    all C channels, then two linear passes per channel over the merge tree.

    Args:
        values: ``(B, C, H, W)`` unary term ``phi`` (e.g. mask probabilities).
        guide_or_tree: ``(B, D, H, W)`` guide (image or features) whose minimum spanning tree
            is used, or a prebuilt :class:`~apro.tree.SpanningTree` of the same grid.
        zeta: ``zeta_g > 0``; smaller means sharper affinities.
        embedding: optional ``(B, E, H, W)``; edge weights on the tree become
            ``||e_k - e_l||^2`` (the tree itself still comes from the guide). This is the
            second stage of the released two-stage GP.
        num_workers: threads over the batch, and over the channels when there are fewer
            images than threads (default ``torch.get_num_threads()``).

    Returns:
        ``(B, C, H, W)`` on the device and dtype of ``values``. No gradient flows through
        it: the result is a pseudo-label target. Inputs on CUDA work; the kernel runs on CPU.
    """
    _check_values(values)
    inv_zeta2 = 1.0 / check_positive(zeta, "zeta") ** 2
    b, _, h, w = values.shape
    if embedding is not None:
        check_float_tensor(embedding, "embedding", 4, "(B, E, H, W)")
        check_same_grid(values, "values", embedding, "embedding")
    planes = _planes(values)

    n = h * w
    if _is_tree(guide_or_tree, values):
        tree = guide_or_tree
    elif embedding is None:
        guide = _float_numpy(guide_or_tree)
        spare = max(1, (num_workers or default_workers()) // b)
        return _to_output(
            _propagate(
                lambda i: grid_merges(guide[i]),
                planes,
                inv_zeta2,
                num_workers,
                split_merge=lambda i: grid_merges(guide[i], threads=spare),
            ),
            values,
        )
    else:
        tree = minimum_spanning_tree(guide_or_tree, num_workers=num_workers)

    edges = tree.edges.numpy()
    weights = (tree.weights if embedding is None else tree_edge_weights(tree, embedding)).numpy()
    if embedding is None and b > 1:
        # Consecutive entries with the same tree (the instances of one image) share its merge
        # tree: one sort and union-find, their channels propagated together.
        starts = np.flatnonzero(_tree_run_heads(tree))
        if starts.size < b:
            stops = np.append(starts[1:], b)
            c = planes.shape[1]
            out = np.empty_like(planes)
            for s, e in zip(starts, stops):
                merges = _tree_merges(edges[s], weights[s], n)
                out[s:e] = _propagate(lambda _: merges, planes[s:e].reshape(1, (e - s) * c, n), inv_zeta2,
                                      num_workers).reshape(e - s, c, n)
            return _to_output(out, values)
    merge_of = lambda i: _tree_merges(edges[i], weights[i], n)  # noqa: E731
    return _to_output(_propagate(merge_of, planes, inv_zeta2, num_workers), values)


def _tree_run_heads(tree: SpanningTree) -> np.ndarray:
    """``(B,)`` bool: entry i starts a run of equal consecutive trees (same edges and weights)."""
    same = (tree.edges[1:] == tree.edges[:-1]).flatten(1).all(1) & (tree.weights[1:] == tree.weights[:-1]).all(1)
    return np.concatenate([[True], ~same.numpy()])


@torch.no_grad()
def tree_filter(
    values: torch.Tensor,
    guide_or_tree: GuideOrTree,
    sigma: float,
    num_workers: Optional[int] = None,
) -> torch.Tensor:
    """Exact tree filter (LTF, NeurIPS 2019; TEL, CVPR 2022) on the minimum spanning tree.

    Like :func:`global_propagation` but the pairwise term is the *product* of edge
    affinities along the tree path, ``exp(-sum_path w / sigma)``; computed exactly in O(N)
    with a leaf-to-root and a root-to-leaf pass.

    Args:
        values: ``(B, C, H, W)``.
        guide_or_tree: ``(B, D, H, W)`` guide or a :class:`~apro.tree.SpanningTree`.
        sigma: ``> 0`` (TEL uses 0.02 on the RGB image in [0, 1]).

    Returns:
        ``(B, C, H, W)``, device and dtype of ``values``, no gradient.
    """
    _check_values(values)
    sigma = check_positive(sigma, "sigma")
    if _is_tree(guide_or_tree, values):
        tree = guide_or_tree
    else:
        tree = minimum_spanning_tree(guide_or_tree, num_workers=num_workers)
    planes = _planes(values, channel_last=True)
    edges = tree.edges.numpy()
    affinity = np.exp(-tree.weights.numpy().astype(np.float64) / sigma)
    out = map_images(
        lambda i: _kernels.tree_filter(edges[i, :, 0], edges[i, :, 1], affinity[i], planes[i]),
        values.shape[0],
        num_workers,
    )
    return _to_output(out, values, channel_last=True)


def local_affinity(image: torch.Tensor, kernel_size: int, zeta: float) -> torch.Tensor:
    """Normalised local affinities ``psi_s(i, j) / z_i`` (paper Eq. 5).

    ``image``: ``(B, D, H, W)``. Returns ``(B, k*k, H, W)``: entry ``s = dy * k + dx`` is the
    weight pixel ``(y, x)`` gives to ``(y + dy - r, x + dx - r)``; neighbours outside the
    image get weight 0. Same device and dtype as ``image``.
    """
    img = image.detach()
    if img.device.type == "cpu" and img.dtype in (torch.float32, torch.float64):
        arr = img.contiguous().numpy()
        out = map_images(lambda i: _kernels.local_weights(arr[i], kernel_size // 2, 1.0 / zeta**2), len(arr), None)
        return torch.from_numpy(np.stack(out))
    return _local_affinity_torch(img, kernel_size, zeta)


def _local_affinity_torch(img: torch.Tensor, kernel_size: int, zeta: float) -> torch.Tensor:
    """:func:`local_affinity` in plain torch (any device)."""
    r = kernel_size // 2
    b, _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (r, r, r, r))
    inside = torch.nn.functional.pad(img.new_ones(1, 1, h, w), (r, r, r, r))
    weights = []
    for dy in range(kernel_size):
        for dx in range(kernel_size):
            d = (padded[..., dy : dy + h, dx : dx + w] - img).pow(2).sum(1)
            weights.append(torch.exp(-d / zeta**2) * inside[0, :, dy : dy + h, dx : dx + w])
    a = torch.stack(weights, 1)
    return a / a.sum(1, keepdim=True)


def _local_iterate_torch(values, weights, radius, iterations, mask):
    """Reference-speed LP steps in plain torch (any device)."""
    k = 2 * radius + 1
    h, w = values.shape[-2:]
    y = values * mask
    for _ in range(iterations):
        padded = torch.nn.functional.pad(y, (radius, radius, radius, radius))
        acc = torch.zeros_like(y)
        for s in range(k * k):
            dy, dx = divmod(s, k)
            acc += weights[:, s : s + 1] * padded[..., dy : dy + h, dx : dx + w]
        y = acc * mask
    return y


@torch.no_grad()
def local_propagation(
    values: torch.Tensor,
    image: torch.Tensor,
    kernel_size: int = 5,
    zeta: float = 0.15,
    iterations: int = 20,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Local affinity propagation (paper Eqs. 5-6), repeated ``iterations`` times.

    Each step ``y_i = sum_{j in N(i)} y_j psi_s(i,j) / sum_{j in N(i)} psi_s(i,j)`` over the
    ``k x k`` window (i included) with ``psi_s = exp(-||I_i - I_j||^2 / zeta^2)``; pixels
    outside the image are not neighbours.

    Args:
        values: ``(B, C, H, W)`` unary term.
        image: ``(B, D, H, W)`` guide image (ImageNet-normalised in the released settings).
        kernel_size: odd window size ``k`` (3 or 5 in the paper).
        zeta: ``zeta_s > 0``.
        iterations: number of steps ``T >= 0`` (20 is the paper's best, Table 6).
        mask: optional ``(B, 1, H, W)`` or ``(B, C, H, W)``; multiplies the values before the
            first step and after every step (the box-supervised use keeps mass in the box).

    Returns:
        ``(B, C, H, W)`` on the device and dtype of ``values``; no gradient (a target).
    """
    _check_values(values)
    check_float_tensor(image, "image", 4, "(B, D, H, W)")
    check_same_grid(values, "values", image, "image")
    k = check_kernel_size(kernel_size)
    zeta = check_positive(zeta, "zeta")
    iterations = check_count(iterations, "iterations")
    b, c, h, w = values.shape
    if mask is None:
        mask = values.new_ones(b, 1, h, w)
    else:
        check_float_tensor(mask, "mask", 4, "(B, 1, H, W) or (B, C, H, W)")
        check_same_grid(values, "values", mask, "mask")
        if mask.shape[1] not in (1, c):
            raise ValueError(f"mask must have 1 or {c} channels (like values), got {mask.shape[1]}")
    vals = values.detach()
    mask = mask.detach().to(device=vals.device, dtype=vals.dtype)
    img = image.detach().to(device=vals.device, dtype=vals.dtype)
    if vals.device.type == "cpu" and vals.dtype in (torch.float32, torch.float64):
        m = mask.expand(b, c, h, w).contiguous()
        guide = img.contiguous().numpy()
        out = np.zeros((b, c, h, w), dtype=guide.dtype)
        # Entries with the same guide and mask (e.g. the positives of one instance in SOLOv2)
        # share their window weights: one call per group, its values stacked as planes.
        groups = _identical_entries(img, m)
        planes = [vals[g].reshape(-1, h, w).contiguous().numpy() for g in groups]
        masks = [m[g].reshape(-1, h, w).contiguous().numpy() for g in groups]
        results = [np.zeros_like(x) for x in planes]
        map_images(lambda i: _lp_image(planes[i], guide[groups[i][0]], masks[i], k // 2, zeta, iterations,
                                       results[i]), len(groups), None)
        for g, r in zip(groups, results):
            out[g] = r.reshape(len(g), c, h, w)
        return torch.from_numpy(out)
    return _local_iterate_torch(vals, local_affinity(img, k, zeta), k // 2, iterations, mask)


def _identical_entries(image: torch.Tensor, mask: torch.Tensor) -> list:
    """Batch indices grouped by equal ``(image[i], mask[i])`` (CPU tensors), in order of first
    appearance. Candidates share a hash of their bytes and are confirmed with ``torch.equal``."""
    b = image.shape[0]
    if b == 1:
        return [[0]]
    flat_i, flat_m = image.reshape(b, -1).contiguous(), mask.reshape(b, -1).contiguous()
    np_i, np_m = flat_i.numpy(), flat_m.numpy()
    groups, by_key = [], {}
    for i in range(b):
        candidates = by_key.setdefault((hash(np_i[i].tobytes()), hash(np_m[i].tobytes())), [])
        for g in candidates:
            if torch.equal(flat_i[i], flat_i[g[0]]) and torch.equal(flat_m[i], flat_m[g[0]]):
                g.append(i)
                break
        else:
            candidates.append([i])
            groups.append(candidates[-1])
    return groups


class _WeightCache:
    """The LP window weights of the last few small guides, keyed by their content.

    A per-image fit (``apro refine``) runs LP on the same guide at every step; its weights
    (one exp per pixel and offset) cost as much as the 20 propagation steps. Entries are
    found by a hash of the guide's bytes and confirmed by comparing the stored guide, so a
    hit is exact. Guides above ``max_pixels`` (full-resolution LP) are not kept.
    """

    def __init__(self, size: int = 8, max_pixels: int = 128 * 128):
        self.size, self.max_pixels = size, max_pixels
        self._entries: dict = {}
        self._lock = threading.Lock()

    def get(self, guide: np.ndarray, radius: int, inv_zeta2: float) -> np.ndarray:
        if guide.shape[-2] * guide.shape[-1] > self.max_pixels:
            return _kernels.local_weights(guide, radius, inv_zeta2)
        key = (hash(guide.tobytes()), guide.shape, guide.dtype.str, radius, inv_zeta2)
        with self._lock:
            hit = self._entries.pop(key, None)
            if hit is not None:
                self._entries[key] = hit  # most recently used last
        if hit is not None and np.array_equal(hit[0], guide):
            return hit[1]
        weights = _kernels.local_weights(guide, radius, inv_zeta2)
        with self._lock:
            self._entries[key] = (guide.copy(), weights)
            while len(self._entries) > self.size:
                self._entries.pop(next(iter(self._entries)))
        return weights


_LP_WEIGHTS = _WeightCache()


def _lp_image(values, image, mask, radius, zeta, iterations, out):
    """LP of one image on the CPU, restricted to the mask's bounding box grown by ``radius``.

    Exact: outside the mask every value is 0 after each step, and every pixel of the box
    keeps its whole window (or the image border) inside the grown crop, so its normaliser
    is unchanged.
    """
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    if rows.size == 0:
        return
    h, w = values.shape[-2:]
    y0, y1 = max(0, rows[0] - radius), min(h, rows[-1] + radius + 1)
    x0, x1 = max(0, cols[0] - radius), min(w, cols[-1] + radius + 1)
    crop = (slice(None), slice(y0, y1), slice(x0, x1))
    weights = _LP_WEIGHTS.get(np.ascontiguousarray(image[crop]), radius, 1.0 / zeta**2)
    out[crop] = _kernels.local_iterate(
        np.ascontiguousarray(values[crop]), weights, radius, iterations, np.ascontiguousarray(mask[crop])
    )


class GlobalAffinityPropagation(nn.Module):
    """Module form of :func:`global_propagation` holding ``zeta``.

    ``forward(values (B, C, H, W), guide_or_tree, embedding=None) -> (B, C, H, W)``.
    """

    def __init__(self, zeta: float = 0.01):
        super().__init__()
        self.zeta = check_positive(zeta, "zeta")

    def forward(self, values, guide_or_tree, embedding=None):
        return global_propagation(values, guide_or_tree, self.zeta, embedding=embedding)

    def extra_repr(self) -> str:
        return f"zeta={self.zeta}"


class LocalAffinityPropagation(nn.Module):
    """Module form of :func:`local_propagation` holding ``kernel_size``, ``zeta``, ``iterations``.

    ``forward(values (B, C, H, W), image (B, D, H, W), mask=None) -> (B, C, H, W)``.
    """

    def __init__(self, kernel_size: int = 5, zeta: float = 0.15, iterations: int = 20):
        super().__init__()
        self.kernel_size = check_kernel_size(kernel_size)
        self.zeta = check_positive(zeta, "zeta")
        self.iterations = check_count(iterations, "iterations")

    def forward(self, values, image, mask=None):
        return local_propagation(values, image, self.kernel_size, self.zeta, self.iterations, mask)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, zeta={self.zeta}, iterations={self.iterations}"


class TreeFilter(nn.Module):
    """Module form of :func:`tree_filter` holding ``sigma``."""

    def __init__(self, sigma: float = 0.02):
        super().__init__()
        self.sigma = check_positive(sigma, "sigma")

    def forward(self, values, guide_or_tree):
        return tree_filter(values, guide_or_tree, self.sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
