"""Sequential numerical kernels (numba, compiled on first use and cached; no build step).

The interface is deliberately tiny and works on NumPy arrays of one image:

- ``grid_weights``, ``drop_cycle_maxima``, ``candidate_keys`` (each over a range of rows,
  so an image can be split between threads), then ``sort_keys``: the edges that can be in
  a minimum spanning tree, as keys sorted by (weight, edge id).
- ``grid_merges(first, second, H, W, par)`` / ``tree_merges(u, v, par)``: Kruskal -> the
  merge tree.
- ``propagate_merges(left, right, weight, inv_zeta2, values, rows, out)``: exact GP
  (Alg. 1) on the merge tree.
- ``tree_filter(u, v, affinity, values)``: two-pass exact tree filter (LTF / TEL).
- ``local_weights(image, radius, inv_zeta2)`` / ``local_iterate(...)``: LP affinities and steps.

The tests check each against a brute-force oracle.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._prefetch import prefetch

_LOW32 = np.uint64(0xFFFFFFFF)
_RADIX_BITS = 11
_AHEAD = 16  # how many merges / edges ahead the random rows are prefetched


@njit(nogil=True, cache=True)
def grid_weights(guide, out, row0, row1):
    """``||g_k - g_l||^2`` across the edges of the 4-grid of ``guide`` ``(D, H, W)`` that
    leave pixels of rows ``[row0, row1)``, written into ``out`` ``(2 H W,)`` float32.

    Entry ``p`` is the edge from pixel ``p`` to its right neighbour, entry ``H W + p`` the
    edge to the pixel below; slots without a neighbour (last column, last row) hold ``inf``.
    Differences are taken in the guide's precision, squares summed in float32.
    """
    d, h, w = guide.shape
    n = h * w
    out[row0 * w : row1 * w] = 0.0
    out[n + row0 * w : n + row1 * w] = 0.0
    for c in range(d):
        g = guide[c]
        for y in range(row0, row1):
            right = out[y * w : y * w + w - 1]
            for x in range(w - 1):
                t = np.float32(g[y, x + 1] - g[y, x])
                right[x] += t * t
            if y + 1 < h:
                below = out[n + y * w : n + y * w + w]
                for x in range(w):
                    t = np.float32(g[y + 1, x] - g[y, x])
                    below[x] += t * t
    for y in range(row0, row1):
        out[y * w + w - 1] = np.inf
        if y == h - 1:
            out[n + y * w : n + y * w + w] = np.inf


@njit(nogil=True, cache=True, inline="always")
def _key(bits, e):
    return (np.uint64(bits[e]) << np.uint64(32)) | np.uint64(e)


@njit(nogil=True, cache=True)
def drop_cycle_maxima(weights, height, width, keep, row0, row1):
    """Mark in ``keep`` (``(2 H W,)`` uint8, 1 = candidate) the edges that can be in the MST,
    for the unit squares whose top row is in ``[row0, row1)``.

    Every unit square is a 4-cycle, and the largest edge of a cycle (in the total order by
    weight, then id) is in no minimum spanning tree of that order (the cycle property), so it
    is dropped; that removes about 40% of the edges before the sort. Non-negative IEEE floats
    order like their bit patterns, so keys ``weight bits << 32 | id`` order like (weight, id).
    Edges without a neighbour are dropped too.
    """
    n = height * width
    bits = weights.view(np.uint32)
    for y in range(row0, row1):
        keep[y * width + width - 1] = 0
        if y == height - 1:
            for x in range(width):
                keep[n + y * width + x] = 0
    for y in range(row0, min(row1, height - 1)):
        for x in range(width - 1):
            p = y * width + x
            top = max(_key(bits, p), _key(bits, p + width))
            side = max(_key(bits, n + p), _key(bits, n + p + 1))
            keep[np.int64(max(top, side) & _LOW32)] = 0


@njit(nogil=True, cache=True)
def candidate_keys(weights, keep, height, width, row0, row1):
    """Keys ``weight bits << 32 | id`` of the kept edges leaving rows ``[row0, row1)``, in id
    order (unsorted)."""
    n = height * width
    bits = weights.view(np.uint32)
    lo = row0 * width
    hi = row1 * width
    count = 0
    for p in range(lo, hi):
        count += keep[p] + keep[n + p]
    keys = np.empty(count, dtype=np.uint64)
    j = 0
    for base in (0, n):
        for e in range(base + lo, base + hi):
            if j < count:
                keys[j] = _key(bits, e)
            j += keep[e]
    return keys


@njit(nogil=True, cache=True)
def sort_keys(keys):
    """Ascending sort of ``weight bits << 32 | id`` keys: LSD radix sort on the 31 weight
    bits (the sign bit is 0). Stable, so keys given in id order stay in id order on ties.
    ``keys`` is used as scratch; the sorted keys are returned (``keys`` itself or a new array)."""
    n = keys.shape[0]
    passes = (31 + _RADIX_BITS - 1) // _RADIX_BITS
    buckets = 1 << _RADIX_BITS
    mask = np.uint64(buckets - 1)
    hist = np.zeros((passes, buckets), dtype=np.int64)
    for i in range(n):
        k = keys[i] >> np.uint64(32)
        for s in range(passes):
            hist[s, np.int64((k >> np.uint64(s * _RADIX_BITS)) & mask)] += 1
    src = keys  # sorted in place, ping-ponging with one scratch array
    dst = np.empty_like(keys)
    for s in range(passes):
        h = hist[s]
        if h.max() == n:  # every key has the same digit: nothing to do
            continue
        total = 0
        for b in range(buckets):
            c = h[b]
            h[b] = total
            total += c
        shift = np.uint64(32 + s * _RADIX_BITS)
        for i in range(n):
            k = src[i]
            b = np.int64((k >> shift) & mask)
            dst[h[b]] = k
            h[b] += 1
        src, dst = dst, src
    return src


def argsort_weights(weights: np.ndarray) -> np.ndarray:
    """Stable ascending argsort of non-negative float32 weights (radix sort of packed keys)."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    keys = (w.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(w.size, dtype=np.uint64)
    return (sort_keys(keys) & _LOW32).astype(np.int64)


def union_find_array(n: int) -> np.ndarray:
    """Scratch for :func:`grid_merges` / :func:`tree_merges`: int32 while ``node << 5`` fits."""
    return np.empty(n, dtype=np.int32 if (2 * n) << 5 < 2**31 else np.int64)


@njit(nogil=True, cache=True, inline="always")
def _root(par, p):
    """Root of ``p``; ``p`` is then linked straight to it. ``par[x] >= 0`` is a parent, a
    root holds ``-1 - (merge node << 5 | rank)``. The first two hops are branch-free
    (selects), so the CPU can overlap the memory accesses of successive edges."""
    r1 = par[p]
    a = r1 if r1 >= 0 else p
    r2 = par[a]
    a = r2 if r2 >= 0 else a
    if par[a] >= 0:  # rare: a longer path, walked with path halving
        while par[a] >= 0:
            g = par[a]
            if par[g] >= 0:
                par[a] = par[g]
            a = g
    par[p] = a if r1 >= 0 else r1
    return a


@njit(nogil=True, cache=True, inline="always")
def _merge(par, a, b, node, left, right, t):
    """Record merge ``t`` of roots ``a`` and ``b`` (children ``left[t]``, ``right[t]``) and,
    if they differ, join them by rank under merge node ``node``. Branch-free; returns 1 if
    they were joined, else 0 (then the slot ``t`` is reused)."""
    ra = -1 - par[a]
    rb = -1 - par[b]
    left[t] = ra >> 5
    right[t] = rb >> 5
    ka = ra & 31
    kb = rb & 31
    swap = ka < kb
    hi = b if swap else a
    lo = a if swap else b
    rank = max(ka, kb) + (1 if ka == kb else 0)
    joined = a != b
    par[lo] = hi if joined else par[lo]
    par[hi] = (-1 - ((node << 5) | rank)) if joined else par[hi]
    return 1 if joined else 0


@njit(nogil=True, cache=True)
def _init_roots(par):
    for i in range(par.shape[0]):
        par[i] = -1 - (i << 5)


@njit(nogil=True, cache=True, inline="always")
def _prefetch_edge(par, key, n, width):
    e = np.int64(key & _LOW32)
    e = e - n if e >= n else e
    prefetch(par, e)
    prefetch(par, e + width)


@njit(nogil=True, cache=True)
def grid_merges(first, second, height, width, par):
    """Kruskal on the grid, fed two lists of candidate keys, each sorted by (weight, id)
    (e.g. the two halves of the image, sorted in parallel); they are merged on the fly.

    Returns ``(left, right, weight, edge)``, one entry per merge ``t = 0..N-2`` in ascending
    order: the merge tree node ``N + t`` joins children ``left[t]`` and ``right[t]`` (a
    child ``< N`` is a pixel) across grid edge ``edge[t]`` of weight ``weight[t]``.
    ``par``: scratch of length N from :func:`union_find_array`.
    """
    n = height * width
    _init_roots(par)
    m = max(n - 1, 0)
    left = np.empty(m + 1, dtype=np.int32)
    right = np.empty(m + 1, dtype=np.int32)
    weight = np.empty(m + 1, dtype=np.float32)
    edge = np.empty(m + 1, dtype=np.int32)
    na = first.shape[0]
    nb = second.shape[0]
    sentinel = np.uint64(0xFFFFFFFFFFFFFFFF)
    wa = first.view(np.float32)  # little-endian: the weight is the upper half of each key
    wb = second.view(np.float32)
    i = 0
    j = 0
    t = 0
    while t < m and i + j < na + nb:
        if na > 0:
            _prefetch_edge(par, first[min(i + _AHEAD, na - 1)], n, width)
        if nb > 0:
            _prefetch_edge(par, second[min(j + _AHEAD, nb - 1)], n, width)
        ka = first[i] if i < na else sentinel
        kb = second[j] if j < nb else sentinel
        take_a = ka < kb
        key = ka if take_a else kb
        w = wa[2 * i + 1] if take_a else wb[2 * j + 1]
        i += 1 if take_a else 0
        j += 0 if take_a else 1
        e = np.int64(key & _LOW32)
        below = e >= n
        p = e - n if below else e
        q = p + (width if below else 1)
        a = _root(par, p)
        b = _root(par, q)
        weight[t] = w
        edge[t] = e
        t += _merge(par, a, b, n + t, left, right, t)
    if t != m:
        raise ValueError("the candidate edges do not connect the grid")
    return left[:m], right[:m], weight[:m], edge[:m]


@njit(nogil=True, cache=True)
def tree_merges(u, v, par):
    """Merge tree of a spanning tree whose ``N-1`` edges ``(u, v)`` come in ascending weight
    order; returns ``(left, right)`` as in :func:`grid_merges`."""
    n = par.shape[0]
    _init_roots(par)
    m = u.shape[0]
    left = np.empty(m, dtype=np.int32)
    right = np.empty(m, dtype=np.int32)
    t = 0
    for j in range(m):
        t += _merge(par, _root(par, u[j]), _root(par, v[j]), n + t, left, right, t)
    if t != m:
        raise ValueError("the edges do not form a spanning tree (they close a cycle)")
    return left, right


def row_buffer(n: int, width: int) -> np.ndarray:
    """Scratch rows for :func:`propagate_merges`: ``(2N-1, width)`` float64, 64-byte aligned
    (a row of 8 is then exactly one cache line)."""
    flat = np.empty((2 * n - 1) * width + 8)
    start = (-flat.ctypes.data % 64) // 8
    return flat[start : start + (2 * n - 1) * width].reshape(2 * n - 1, width)


def propagate_merges(left, right, weight, inv_zeta2, values, rows, out):
    """See :func:`_propagate_rows`. The row width is passed as the length of a tuple, so
    that numba compiles one kernel per width, with the inner loops unrolled."""
    _propagate_rows(left, right, weight, inv_zeta2, values, rows, out, (0,) * rows.shape[1])


@njit(nogil=True, cache=True)
def _propagate_rows(left, right, weight, inv_zeta2, values, rows, out, width):
    """Exact global affinity propagation on a merge tree (paper Sec. 3.3, Alg. 1).

    When components A and B merge (merge node p, ``f = exp(-w/zeta^2)``), every pixel of A
    gains ``f S_B``, with ``S_B`` the sum of the values over B, and its normaliser gains
    ``f |B|``. Bottom-up, every node gets its subtree sums ``S``. Top-down, node k holds
    ``X_k = S_k + (what k's pixels gain above k)``, so for p's children
    ``X_A = X_p - (1 - f) S_B``, and at a pixel ``X_i = phi_i + gain_i``.

    Each node is one float64 row of ``rows`` ``(2N-1, W)``: the normaliser (a channel of
    ones) and up to ``W-1`` channels, visited together so that one cache line serves them
    all. The rows of the merges a few steps ahead are prefetched.

    ``weight``: the merge weights (ascending, so equal ones are neighbours and share one
    ``exp``). ``values``: ``(C, N)`` with ``C <= W-1``; writes ``out`` ``(C, N)``.
    """
    w = len(width)
    c, n = values.shape
    m = n - 1
    flat = rows.reshape(-1)
    for i in range(n):
        rows[i, 0] = 1.0
        for k in range(1, w):
            rows[i, k] = values[k - 1, i] if k <= c else 0.0
    for t in range(m):
        if t + _AHEAD < m:
            for line in range(0, w, 8):
                prefetch(flat, left[t + _AHEAD] * w + line)
                prefetch(flat, right[t + _AHEAD] * w + line)
        a = left[t]
        b = right[t]
        for k in range(w):
            rows[n + t, k] = rows[a, k] + rows[b, k]
    last = -1.0
    g = 0.0
    for t in range(m - 1, -1, -1):
        if t >= _AHEAD:
            for line in range(0, w, 8):
                prefetch(flat, left[t - _AHEAD] * w + line)
                prefetch(flat, right[t - _AHEAD] * w + line)
        a = left[t]
        b = right[t]
        wt = np.float64(weight[t])
        if wt != last:
            g = -math.expm1(-wt * inv_zeta2)
            last = wt
        for k in range(w):
            p = rows[n + t, k]
            sa = rows[a, k]
            sb = rows[b, k]
            rows[a, k] = p - g * sb
            rows[b, k] = p - g * sa
    for i in range(n):
        z = 1.0 / rows[i, 0]
        for k in range(c):
            out[k, i] = rows[i, k + 1] * z


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
    One output row at a time, summing the K*K shifted rows in offset order (the loop over x
    vectorises and the rows stay in cache).
    """
    planes, h, w = values.shape
    k = 2 * radius + 1
    kk = k * k
    out = np.empty_like(values)
    for p in range(planes):
        cur = np.zeros((h + 2 * radius, w + 2 * radius), dtype=values.dtype)
        cur[radius:radius + h, radius:radius + w] = values[p] * mask[p]
        nxt = np.empty((h, w), dtype=values.dtype)
        for _ in range(iterations):
            for y in range(h):
                acc = nxt[y]
                acc[:] = 0
                for s in range(kk):
                    wrow = weights[s, y]
                    crow = cur[y + s // k, s % k:s % k + w]
                    for x in range(w):
                        acc[x] += wrow[x] * crow[x]
            cur[radius:radius + h, radius:radius + w] = nxt * mask[p]
        out[p] = cur[radius:radius + h, radius:radius + w]
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
