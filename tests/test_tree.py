import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.sparse.csgraph import minimum_spanning_tree as scipy_mst

import apro
from apro import _kernels
from apro.tree import grid_edge_weights


def _grid_graph(guide):
    """All 4-grid edges with weight ||g_k - g_l||^2, built by plain loops."""
    d, h, w = guide.shape
    rows, cols, wts = [], [], []
    for y in range(h):
        for x in range(w):
            for yy, xx in ((y, x + 1), (y + 1, x)):
                if yy < h and xx < w:
                    rows.append(y * w + x)
                    cols.append(yy * w + xx)
                    wts.append(float(((guide[:, y, x] - guide[:, yy, xx]) ** 2).sum()))
    return np.array(rows), np.array(cols), np.array(wts)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (8, 1), (6, 7), (10, 3)])
def test_mst_is_a_minimum_spanning_tree(shape):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    guide = torch.rand(2, 3, *shape, generator=g)
    tree = apro.minimum_spanning_tree(guide)
    n = shape[0] * shape[1]
    assert tree.edges.shape == (2, n - 1, 2) and tree.weights.shape == (2, n - 1)
    for b in range(2):
        r, c, w = _grid_graph(guide[b].double().numpy())
        edges = tree.edges[b].numpy()
        # every tree edge is a grid edge with the stated weight
        lookup = {(int(a), int(bb)): ww for a, bb, ww in zip(r, c, w)}
        for (p, q), wt in zip(edges.tolist(), tree.weights[b].tolist()):
            key = (min(p, q), max(p, q))
            assert key in lookup
            assert wt == pytest.approx(lookup[key], abs=1e-6)
        # ascending, spanning, and of minimum total weight
        assert bool((tree.weights[b][1:] >= tree.weights[b][:-1]).all())
        if n > 1:
            adj = coo_matrix((np.ones(n - 1), (edges[:, 0], edges[:, 1])), shape=(n, n))
            assert connected_components(adj, directed=False)[0] == 1
            full = coo_matrix((w + 1e-9, (r, c)), shape=(n, n))  # +eps: scipy drops zero weights
            best = scipy_mst(full).sum() - (n - 1) * 1e-9
            assert tree.weights[b].double().sum().item() == pytest.approx(best, abs=1e-5)


def test_mst_with_ties_is_deterministic():
    guide = torch.zeros(1, 1, 6, 6)
    t1 = apro.minimum_spanning_tree(guide)
    t2 = apro.minimum_spanning_tree(guide)
    assert torch.equal(t1.edges, t2.edges)
    assert float(t1.weights.sum()) == 0.0


def test_select_repeats_trees():
    tree = apro.minimum_spanning_tree(torch.rand(2, 3, 4, 5))
    sel = tree.select(torch.tensor([1, 1, 0]))
    assert sel.batch_size == 3 and torch.equal(sel.edges[0], tree.edges[1])


def test_grid_edge_weights_layout():
    guide = torch.arange(6.0).reshape(1, 1, 2, 3)
    w = grid_edge_weights(guide)[0]
    # right neighbours: diff 1 inside rows; below: diff 3; missing neighbours are inf
    assert w[:6].tolist() == [1, 1, float("inf"), 1, 1, float("inf")]
    assert w[6:].tolist() == [9, 9, 9] + [float("inf")] * 3


def test_argsort_weights_is_a_stable_argsort():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 5, 1000).astype(np.float32) / 4
    np.testing.assert_array_equal(_kernels.argsort_weights(w), np.argsort(w, kind="stable"))


def _quantised_guide(h, w, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 3, (1, h, w)) / 2).astype(np.float32)


@pytest.mark.parametrize("shape", [(4, 5), (9, 7), (16, 3), (5, 16)])
@pytest.mark.parametrize("kind", ["random", "quantised"])
def test_grid_merges_split_in_halves_is_identical(shape, kind, monkeypatch):
    from apro.tree import grid_merges

    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    guide = rng.random((3, *shape)).astype(np.float32) if kind == "random" else _quantised_guide(*shape, 1)
    monkeypatch.setattr("apro.tree._SPLIT_PIXELS", 0)
    one, two = grid_merges(guide, threads=1), grid_merges(guide, threads=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), levels=st.sampled_from([2, 5, 0]), seed=st.integers(0, 2**16))
def test_cycle_filter_keeps_a_minimum_spanning_tree(h, w, levels, seed):
    """The edges that survive the 4-cycle test still contain a minimum spanning tree."""
    rng = np.random.default_rng(seed)
    guide = rng.random((2, h, w)) if levels == 0 else rng.integers(0, levels, (2, h, w)) / levels
    guide = guide.astype(np.float32)
    n = h * w
    weights = np.empty(2 * n, dtype=np.float32)
    keep = np.ones(2 * n, dtype=np.uint8)
    _kernels.grid_weights(guide, weights, 0, h)
    _kernels.drop_cycle_maxima(weights, h, w, keep, 0, h)
    keys = _kernels.candidate_keys(weights, keep, h, w, 0, h)
    ids = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    assert np.all(np.isfinite(weights[ids])) and np.all(np.diff(ids) > 0)
    if h > 1 and w > 1:
        assert ids.size < 2 * n - h - w  # something was dropped
    r, c, wt = _grid_graph(guide.astype(np.float64))
    if n == 1:
        return
    full = coo_matrix((wt + 1e-9, (r, c)), shape=(n, n))
    p = np.where(ids < n, ids, ids - n)
    q = np.where(ids < n, p + 1, p + w)
    kept = coo_matrix((weights[ids].astype(np.float64) + 1e-9, (p, q)), shape=(n, n))
    assert connected_components(kept, directed=False)[0] == 1
    assert scipy_mst(kept).sum() == pytest.approx(scipy_mst(full).sum(), abs=1e-5)


@settings(max_examples=30, deadline=None)
@given(data=st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.5, float("inf")]) | st.floats(min_value=0.0, width=32, allow_nan=False), max_size=300))
def test_sort_keys_is_a_stable_sort(data):
    w = np.array(data, dtype=np.float32)
    keys = (w.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(w.size, dtype=np.uint64)
    np.testing.assert_array_equal(_kernels.sort_keys(keys.copy()), np.sort(keys))


def test_a_tree_with_a_cycle_is_rejected():
    edges = torch.tensor([[[0, 1], [1, 0], [2, 3]]])  # 2x2 grid: (0,1) twice, 2 never joined to 0/1
    tree = apro.SpanningTree(edges, torch.tensor([[0.1, 0.2, 0.3]]), 2, 2)
    with pytest.raises(ValueError, match="spanning tree"):
        apro.global_propagation(torch.rand(1, 1, 2, 2), tree, 0.5)


def test_int64_union_find_gives_the_same_merges(monkeypatch):
    """Images of 2**25 pixels and more switch the union-find to int64; same results."""
    from apro.tree import grid_merges

    guide = _quantised_guide(13, 11, 3)
    small = grid_merges(guide)
    monkeypatch.setattr(_kernels, "union_find_array", lambda n: np.empty(n, dtype=np.int64))
    for a, b in zip(small, grid_merges(guide)):
        np.testing.assert_array_equal(a, b)
    edges = np.stack([np.arange(142), np.arange(1, 143)], 1)
    l32, r32 = _kernels.tree_merges(edges[:, 0].copy(), edges[:, 1].copy(), np.empty(143, np.int32))
    l64, r64 = _kernels.tree_merges(edges[:, 0].copy(), edges[:, 1].copy(), np.empty(143, np.int64))
    np.testing.assert_array_equal(l32, l64)
    np.testing.assert_array_equal(r32, r64)


def test_union_find_width():
    assert _kernels.union_find_array(1000).dtype == np.int32
    assert _kernels.union_find_array(1 << 25).dtype == np.int64


@pytest.mark.parametrize(
    "edges, weights, match",
    [
        ([[[0, 1], [1, 7], [2, 3]]], [[0.1, 0.2, 0.3]], "outside the pixels"),
        ([[[0, 1], [1, 3]]], [[0.1, 0.2]], r"\(B, N-1, 2\)"),
        ([[[0, 1], [1, 3], [2, 3]]], [[0.1, float("nan"), 0.3]], "NaN"),
        ([[[0, 1], [1, 3], [2, 3]]], [[0.1, -1.0, 0.3]], "negative"),
    ],
)
def test_a_malformed_tree_is_rejected(edges, weights, match):
    tree = apro.SpanningTree(torch.tensor(edges), torch.tensor(weights), 2, 2)
    with pytest.raises(ValueError, match=match):
        apro.global_propagation(torch.rand(1, 1, 2, 2), tree, 0.5)
