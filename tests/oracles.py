"""Brute-force references the fast kernels are checked against (slow, obviously right)."""
from __future__ import annotations

import heapq
import math

import numpy as np


def grid_neighbours(h: int, w: int, y: int, x: int):
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        yy, xx = y + dy, x + dx
        if 0 <= yy < h and 0 <= xx < w:
            yield yy, xx


def minimax_distances_on_grid(guide: np.ndarray) -> np.ndarray:
    """``C[i, j]``: the smallest possible largest edge ``||g_k - g_l||^2`` over all grid paths
    from i to j (a bottleneck Dijkstra from every pixel). On any minimum spanning tree this
    equals the largest edge on the tree path, whichever tree the tie-breaking picked.

    ``guide``: ``(D, H, W)``. Returns ``(N, N)`` float64.
    """
    d, h, w = guide.shape
    g = guide.astype(np.float64)
    n = h * w
    out = np.full((n, n), np.inf)
    for src in range(n):
        best = out[src]
        best[src] = 0.0
        heap = [(0.0, src)]
        while heap:
            c, i = heapq.heappop(heap)
            if c > best[i]:
                continue
            y, x = divmod(i, w)
            for yy, xx in grid_neighbours(h, w, y, x):
                wt = float(((g[:, y, x] - g[:, yy, xx]) ** 2).sum())
                j = yy * w + xx
                cand = max(c, wt)
                if cand < best[j]:
                    best[j] = cand
                    heapq.heappush(heap, (cand, j))
    return out


def path_costs_on_tree(edges: np.ndarray, weights: np.ndarray, n: int, combine) -> np.ndarray:
    """Walk the tree from every pixel, combining edge weights along the path with
    ``combine(running, w)`` (max for GP, + for the tree filter). Returns ``(N, N)``."""
    adj = [[] for _ in range(n)]
    for (a, b), wt in zip(edges.tolist(), weights.tolist()):
        adj[a].append((b, wt))
        adj[b].append((a, wt))
    out = np.zeros((n, n))
    for src in range(n):
        seen = np.zeros(n, dtype=bool)
        seen[src] = True
        stack = [(src, 0.0)]
        while stack:
            i, c = stack.pop()
            out[src, i] = c
            for j, wt in adj[i]:
                if not seen[j]:
                    seen[j] = True
                    stack.append((j, combine(c, wt)))
    return out


def propagate_dense(values: np.ndarray, affinity: np.ndarray) -> np.ndarray:
    """``y_i = sum_j phi_j A_ij / sum_j A_ij``. ``values``: ``(C, N)``, ``affinity``: ``(N, N)``."""
    return (values.astype(np.float64) @ affinity.T) / affinity.sum(1)[None, :]


def global_propagation_oracle(values: np.ndarray, guide: np.ndarray, zeta: float) -> np.ndarray:
    """GP of SPEC §2 from its definition, independent of any tree. ``values``: ``(C, H, W)``."""
    c = values.shape[0]
    cost = minimax_distances_on_grid(guide)
    out = propagate_dense(values.reshape(c, -1), np.exp(-cost / zeta**2))
    return out.reshape(values.shape)


def local_propagation_oracle(values, image, kernel_size, zeta, iterations, mask=None):
    """LP of SPEC §3 as a direct per-pixel loop. ``values (C, H, W)``, ``image (D, H, W)``."""
    c, h, w = values.shape
    r = kernel_size // 2
    img = image.astype(np.float64)
    m = np.ones((1, h, w)) if mask is None else mask.astype(np.float64)
    y = values.astype(np.float64) * m
    for _ in range(iterations):
        nxt = np.zeros_like(y)
        for i in range(h):
            for j in range(w):
                num = np.zeros(c)
                den = 0.0
                for ii in range(max(0, i - r), min(h, i + r + 1)):
                    for jj in range(max(0, j - r), min(w, j + r + 1)):
                        a = math.exp(-float(((img[:, i, j] - img[:, ii, jj]) ** 2).sum()) / zeta**2)
                        num += a * y[:, ii, jj]
                        den += a
                nxt[:, i, j] = num / den
        y = nxt * m
    return y
