"""Sequential numerical kernels (numba, compiled on first use and cached; no build step).

The interface is deliberately tiny and works on NumPy arrays of one image:

- ``sorted_edge_keys(weights)`` / ``sorted_edge_order(weights)``: stable argsort.
- ``grid_merge_tree(keys, weights, H, W)``: Kruskal on the grid -> merge tree + tree edges.
- ``merge_tree(u, v, n)``: merge tree of a given spanning tree, edges in ascending order.
- ``preorder_merge_tree(tparent, merge_weights)``: depth-first layout of a merge tree.
- ``propagate_merge_tree(*layout, inv_zeta2, values)``: exact GP (Alg. 1) on that layout.
- ``tree_filter(u, v, affinity, values)``: two-pass exact tree filter (LTF / TEL).
- ``local_weights(image, radius, inv_zeta2)`` / ``local_iterate(...)``: LP affinities and steps.

The tests check each against a brute-force oracle.
"""
from __future__ import annotations

import numpy as np
from numba import njit


def sorted_edge_keys(weights: np.ndarray) -> np.ndarray:
    """Edges sorted by (weight, index), as uint64 keys ``weight bits << 32 | index``.

    Non-negative IEEE floats (+inf included) order like their bit patterns, so sorting these keys by value
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
def grid_merge_tree(keys, weights, height, width):
    """Kruskal on the 4-grid from edges sorted by (weight, id) (``sorted_edge_keys``).

    Returns ``(tparent, edges, edge_weights)``: the merge tree (``2N-1`` nodes; leaves are
    pixels, node ``N + t`` is the t-th merge, its parent index is always larger; the root
    has -1) and the ``N-1`` tree edges (pixel pairs) with their weights, in merge order.
    """
    n = height * width
    uf, size, node, tparent = _merge_state(n)
    edges = np.empty((max(n - 1, 0), 2), dtype=np.int64)
    edge_weights = np.empty(max(n - 1, 0), dtype=np.float64)
    nxt = n
    for j in range(keys.shape[0]):
        if nxt == 2 * n - 1:
            break
        e = np.int64(keys[j] & np.uint64(0xFFFFFFFF))
        if e < n:
            p = e
            q = e + 1
        else:
            p = e - n
            q = p + width
        a = _find(uf, p)
        b = _find(uf, q)
        if a != b:
            _union(uf, size, node, tparent, a, b, nxt)
            edges[nxt - n, 0] = p
            edges[nxt - n, 1] = q
            edge_weights[nxt - n] = weights[e]
            nxt += 1
    return tparent, edges, edge_weights


@njit(nogil=True, cache=True)
def merge_tree(u, v, n):
    """Merge tree of a spanning tree whose ``N-1`` edges ``(u, v)`` come in ascending order."""
    uf, size, node, tparent = _merge_state(n)
    for t in range(u.shape[0]):
        _union(uf, size, node, tparent, _find(uf, u[t]), _find(uf, v[t]), n + t)
    return tparent


@njit(nogil=True, cache=True)
def preorder_merge_tree(tparent, merge_weights):
    """Lay the merge tree out in depth-first preorder, so the per-channel passes of
    :func:`propagate_merge_tree` touch memory mostly sequentially.

    Returns ``(ipar, iweight, leaf_pixel, leaf_parent)``: for the ``N-1`` merge nodes in
    preorder, the preorder position of the parent (-1 at the root) and the merge weight;
    for the ``N`` pixels in DFS order, the pixel index and its parent's position.
    """
    m = tparent.shape[0]
    n = (m + 1) // 2
    ipar = np.empty(max(n - 1, 0), dtype=np.int32)
    iweight = np.empty(max(n - 1, 0), dtype=np.float64)
    leaf_pixel = np.empty(n, dtype=np.int32)
    leaf_parent = np.full(n, -1, dtype=np.int32)
    if n == 1:
        leaf_pixel[0] = 0
        return ipar, iweight, leaf_pixel, leaf_parent
    leaves = np.zeros(n - 1, dtype=np.int32)
    first = np.full(n - 1, -1, dtype=np.int32)
    second = np.empty(n - 1, dtype=np.int32)
    for t in range(m - 1):
        p = tparent[t] - n
        leaves[p] += 1 if t < n else leaves[t - n]
        if first[p] < 0:
            first[p] = t
        else:
            second[p] = t
    pos = np.empty(n - 1, dtype=np.int32)
    lstart = np.empty(n - 1, dtype=np.int32)
    pos[n - 2] = 0
    lstart[n - 2] = 0
    ipar[0] = -1
    iweight[0] = merge_weights[n - 2]
    for p in range(n - 2, -1, -1):
        nxt_pos = pos[p] + 1
        nxt_leaf = lstart[p]
        for child in (first[p], second[p]):
            if child < n:
                leaf_pixel[nxt_leaf] = child
                leaf_parent[nxt_leaf] = pos[p]
                nxt_leaf += 1
            else:
                q = child - n
                pos[q] = nxt_pos
                lstart[q] = nxt_leaf
                ipar[nxt_pos] = pos[p]
                iweight[nxt_pos] = merge_weights[q]
                nxt_pos += leaves[q] - 1
                nxt_leaf += leaves[q]
    return ipar, iweight, leaf_pixel, leaf_parent


@njit(nogil=True, cache=True)
def propagate_merge_tree(ipar, iweight, leaf_pixel, leaf_parent, inv_zeta2, values):
    """Exact global affinity propagation on a merge tree (paper Sec. 3.3, Alg. 1).

    Takes the preorder layout of :func:`preorder_merge_tree`. When components A and B merge
    at weight w (merge node p with children A, B), every pixel of A gains
    ``exp(-w/zeta^2) * S_B`` with ``S_B = S_p - S_A``. The gains are lazy tags on the merge
    nodes, pushed down to the pixels in one pass. The normaliser is the same computation on
    an all-ones input, done once; then each channel costs four linear passes. Sums are float64.

    ``values``: ``(C, N)``; returns ``(C, N)`` of the same dtype.
    """
    c, n = values.shape
    out = np.empty_like(values)
    if n == 1:
        out[:] = values
        return out
    f = np.exp(-iweight * inv_zeta2)
    count = np.zeros(n - 1)
    for j in range(n):
        count[leaf_parent[j]] += 1.0
    for t in range(n - 2, 0, -1):
        count[ipar[t]] += count[t]
    zacc = np.empty(n - 1)
    zacc[0] = 0.0
    for t in range(1, n - 1):
        p = ipar[t]
        zacc[t] = zacc[p] + f[p] * (count[p] - count[t])
    norm = np.empty(n)
    for j in range(n):
        p = leaf_parent[j]
        norm[j] = 1.0 / (1.0 + zacc[p] + f[p] * (count[p] - 1.0))
    sums = np.empty(n - 1)
    acc = np.empty(n - 1)
    for k in range(c):
        vk = values[k]
        ok = out[k]
        sums[:] = 0.0
        for j in range(n):
            sums[leaf_parent[j]] += vk[leaf_pixel[j]]
        for t in range(n - 2, 0, -1):
            sums[ipar[t]] += sums[t]
        acc[0] = 0.0
        for t in range(1, n - 1):
            p = ipar[t]
            acc[t] = acc[p] + f[p] * (sums[p] - sums[t])
        for j in range(n):
            p = leaf_parent[j]
            i = leaf_pixel[j]
            v = vk[i]
            ok[i] = (v + acc[p] + f[p] * (sums[p] - v)) * norm[j]
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


@njit(nogil=True, cache=True)
def local_iterate(values, weights, radius, iterations, mask):
    """Fused local propagation steps (paper Eq. 6, repeated) for the planes of one image.

    ``values``: ``(C, H, W)``; ``weights``: ``(K*K, H, W)`` normalised affinities shared by
    the planes; ``mask``: ``(C, H, W)``, applied before the first step and after every step.
    """
    planes, h, w = values.shape
    k = 2 * radius + 1
    out = np.empty_like(values)
    wt = weights
    for p in range(planes):
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


@njit(nogil=True, cache=True)
def local_weights(image, radius, inv_zeta2):
    """Normalised local affinities (paper Eq. 5) for every pixel and window offset of one image.

    ``image``: ``(D, H, W)``. Returns ``(K*K, H, W)``; offset ``s = dy * K + dx`` points to
    ``(y + dy - r, x + dx - r)``. Neighbours outside the image get weight 0.
    """
    d, h, w = image.shape
    k = 2 * radius + 1
    kk = k * k
    out = np.zeros((kk, h, w), dtype=image.dtype)
    for s in range(kk):
        dy = s // k - radius
        dx = s % k - radius
        for y in range(max(0, -dy), min(h, h - dy)):
            for x in range(max(0, -dx), min(w, w - dx)):
                dist = 0.0
                for ch in range(d):
                    diff = image[ch, y + dy, x + dx] - image[ch, y, x]
                    dist += diff * diff
                out[s, y, x] = np.exp(-dist * inv_zeta2)
    for y in range(h):
        for x in range(w):
            z = 0.0
            for s in range(kk):
                z += out[s, y, x]
            for s in range(kk):
                out[s, y, x] /= z
    return out
