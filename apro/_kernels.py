"""Sequential numerical kernels (numba, compiled on first use and cached; no build step).

The interface is deliberately tiny and works on NumPy arrays of one image:

- ``sorted_edge_keys(weights)`` / ``sorted_edge_order(weights)``: stable argsort.
- ``grid_merge_tree(keys, H, W)``: Kruskal on the grid -> merge tree + tree edges.
- ``merge_tree(u, v, n)``: merge tree of a given spanning tree, edges in ascending order.
- ``propagate_merge_tree(tparent, merge_weights, inv_zeta2, values)``: exact GP (Alg. 1).
- ``tree_filter(u, v, affinity, values)``: two-pass exact tree filter (LTF / TEL).
- ``local_iterate(values, weights, radius, iterations, mask)``: fused LP iterations.

The tests check each against a brute-force oracle.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


def grid_edge_endpoints(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Endpoints of the grid edges: horizontal edges first (row-major), then vertical."""
    idx = np.arange(height * width, dtype=np.int64).reshape(height, width)
    u = np.concatenate([idx[:, :-1].ravel(), idx[:-1, :].ravel()])
    v = np.concatenate([idx[:, 1:].ravel(), idx[1:, :].ravel()])
    return u, v


def sorted_edge_keys(weights: np.ndarray) -> np.ndarray:
    """Edges sorted by (weight, index), as uint64 keys ``weight bits << 32 | index``.

    Non-negative IEEE floats order like their bit patterns, so sorting these keys by value
    (which NumPy does several times faster than ``argsort``) is a stable argsort; the index
    in the low bits breaks ties deterministically.
    """
    w = np.ascontiguousarray(weights, dtype=np.float32)
    keys = w.view(np.uint32).astype(np.uint64) << np.uint64(32)
    keys |= np.arange(w.size, dtype=np.uint64)
    keys.sort()
    return keys


def sorted_edge_order(weights: np.ndarray) -> np.ndarray:
    """Stable ascending argsort of non-negative float32 weights."""
    return (sorted_edge_keys(weights) & np.uint64(0xFFFFFFFF)).astype(np.int64)


@njit(nogil=True, cache=True, inline="always")
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@njit(nogil=True, cache=True, inline="always")
def _union(uf, size, node, tparent, a, b, nxt):
    """Join roots ``a`` and ``b`` under the new merge-tree node ``nxt``."""
    tparent[node[a]] = nxt
    tparent[node[b]] = nxt
    if size[a] < size[b]:
        a, b = b, a
    uf[b] = a
    size[a] += size[b]
    node[a] = nxt


@njit(nogil=True, cache=True)
def _merge_state(n):
    uf = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    node = np.arange(n, dtype=np.int32)
    tparent = np.empty(max(2 * n - 1, 1), dtype=np.int32)
    tparent[-1] = -1
    return uf, size, node, tparent


@njit(nogil=True, cache=True)
def grid_merge_tree(keys, height, width):
    """Kruskal on the 4-grid from edges sorted by (weight, id) (``sorted_edge_keys``).

    Returns ``(tparent, taken)``: the merge tree (``2N-1`` nodes; leaves are pixels, node
    ``N + t`` is the t-th merge, its parent index is always larger; the root has -1) and the
    grid edge ids that made the minimum spanning tree, in merge (ascending weight) order.
    """
    n = height * width
    uf, size, node, tparent = _merge_state(n)
    taken = np.empty(max(n - 1, 0), dtype=np.int64)
    nh = height * (width - 1)
    nxt = n
    for j in range(keys.shape[0]):
        if nxt == 2 * n - 1:
            break
        e = np.int64(keys[j] & np.uint64(0xFFFFFFFF))
        if e < nh:
            p = e + e // (width - 1)
            q = p + 1
        else:
            p = e - nh
            q = p + width
        a = _find(uf, p)
        b = _find(uf, q)
        if a != b:
            _union(uf, size, node, tparent, a, b, nxt)
            taken[nxt - n] = e
            nxt += 1
    return tparent, taken


@njit(nogil=True, cache=True)
def merge_tree(u, v, n):
    """Merge tree of a spanning tree whose ``N-1`` edges ``(u, v)`` come in ascending order."""
    uf, size, node, tparent = _merge_state(n)
    for t in range(u.shape[0]):
        _union(uf, size, node, tparent, _find(uf, u[t]), _find(uf, v[t]), n + t)
    return tparent


@njit(nogil=True, cache=True)
def propagate_merge_tree(tparent, merge_weights, inv_zeta2, values):
    """Exact global affinity propagation on a merge tree (paper Sec. 3.3, Alg. 1).

    When components A and B merge at weight w (merge-tree node p with children A, B), every
    pixel of A gains ``exp(-w/zeta^2) * S_B`` with ``S_B = S_p - S_A``. The gains are kept
    as lazy tags on the children and pushed down to the pixels in one pass; the normaliser
    is the same computation on an all-ones input. ``values``: ``(N, C)`` float64.
    """
    n, c = values.shape
    m = 2 * n - 1
    f = np.exp(-merge_weights * inv_zeta2)
    cnt = np.zeros(m)
    cnt[:n] = 1.0
    sums = np.zeros((m, c))
    sums[:n] = values
    for t in range(m - 1):
        p = tparent[t]
        cnt[p] += cnt[t]
        for k in range(c):
            sums[p, k] += sums[t, k]
    zacc = np.empty(m)
    acc = np.empty((m, c))
    zacc[m - 1] = 0.0
    acc[m - 1] = 0.0
    for t in range(m - 2, -1, -1):
        p = tparent[t]
        fp = f[p - n]
        zacc[t] = zacc[p] + fp * (cnt[p] - cnt[t])
        for k in range(c):
            acc[t, k] = acc[p, k] + fp * (sums[p, k] - sums[t, k])
    out = np.empty((n, c))
    for i in range(n):
        z = 1.0 + zacc[i]
        for k in range(c):
            out[i, k] = (values[i, k] + acc[i, k]) / z
    return out


@njit(nogil=True, cache=True)
def _bfs_order(u, v, n):
    """BFS order from pixel 0 of a tree given by its edges, with each node's parent edge."""
    deg = np.zeros(n + 1, dtype=np.int64)
    for e in range(u.shape[0]):
        deg[u[e] + 1] += 1
        deg[v[e] + 1] += 1
    for i in range(n):
        deg[i + 1] += deg[i]
    fill = deg[:-1].copy()
    nbr = np.empty(2 * u.shape[0], dtype=np.int64)
    eid = np.empty(2 * u.shape[0], dtype=np.int64)
    for e in range(u.shape[0]):
        nbr[fill[u[e]]] = v[e]
        eid[fill[u[e]]] = e
        fill[u[e]] += 1
        nbr[fill[v[e]]] = u[e]
        eid[fill[v[e]]] = e
        fill[v[e]] += 1
    order = np.empty(n, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    pedge = np.full(n, -1, dtype=np.int64)
    seen = np.zeros(n, dtype=np.bool_)
    order[0] = 0
    seen[0] = True
    head = 0
    tail = 1
    while head < tail:
        x = order[head]
        head += 1
        for j in range(deg[x], deg[x + 1]):
            y = nbr[j]
            if not seen[y]:
                seen[y] = True
                parent[y] = x
                pedge[y] = eid[j]
                order[tail] = y
                tail += 1
    return order, parent, pedge


@njit(nogil=True, cache=True)
def tree_filter(u, v, affinity, values):
    """Exact tree filter: y_i = sum_j phi_j prod_path a / sum_j prod_path a, in O(N C).

    ``affinity``: per-edge factor in (0, 1]; ``values``: ``(N, C)`` float64.
    Leaf-to-root pass aggregates subtrees, root-to-leaf pass adds the rest of the tree.
    """
    n, c = values.shape
    order, parent, pedge = _bfs_order(u, v, n)
    up = np.empty((n, c + 1))
    up[:, :c] = values
    up[:, c] = 1.0
    for t in range(n - 1, 0, -1):
        x = order[t]
        a = affinity[pedge[x]]
        p = parent[x]
        for k in range(c + 1):
            up[p, k] += a * up[x, k]
    down = np.empty((n, c + 1))
    r = order[0]
    for k in range(c + 1):
        down[r, k] = up[r, k]
    for t in range(1, n):
        x = order[t]
        a = affinity[pedge[x]]
        p = parent[x]
        for k in range(c + 1):
            down[x, k] = up[x, k] + a * (down[p, k] - a * up[x, k])
    out = np.empty((n, c))
    for i in range(n):
        for k in range(c):
            out[i, k] = down[i, k] / down[i, c]
    return out


@njit(parallel=True, cache=True)
def local_iterate(values, weights, radius, iterations, mask):
    """Fused local propagation steps (paper Eq. 6, repeated).

    ``values``: ``(P, H, W)`` float32 planes; ``weights``: ``(Q, K*K, H, W)`` normalised
    affinities, plane ``p`` uses ``weights[p // (P // Q)]``; ``mask``: ``(P, H, W)``,
    applied before the first step and after every step.
    """
    planes, h, w = values.shape
    per = planes // weights.shape[0]
    k = 2 * radius + 1
    out = np.empty_like(values)
    for p in prange(planes):
        wt = weights[p // per]
        cur = np.zeros((h + 2 * radius, w + 2 * radius), dtype=values.dtype)
        for y in range(h):
            for x in range(w):
                cur[y + radius, x + radius] = values[p, y, x] * mask[p, y, x]
        nxt = np.empty((h, w), dtype=values.dtype)
        for _ in range(iterations):
            nxt[:, :] = 0
            for s in range(k * k):
                dy = s // k
                dx = s % k
                for y in range(h):
                    for x in range(w):
                        nxt[y, x] += wt[s, y, x] * cur[y + dy, x + dx]
            for y in range(h):
                for x in range(w):
                    cur[y + radius, x + radius] = nxt[y, x] * mask[p, y, x]
        for y in range(h):
            for x in range(w):
                out[p, y, x] = cur[y + radius, x + radius]
    return out
