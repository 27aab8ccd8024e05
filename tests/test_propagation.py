import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import apro
from apro.propagation import _local_affinity_torch, _local_iterate_torch, local_affinity
from apro.tree import SpanningTree, grid_edge_weights
from oracles import (
    global_propagation_oracle,
    local_propagation_oracle,
    path_costs_on_tree,
    propagate_dense,
)

SHAPES = [(1, 1), (1, 7), (6, 1), (5, 8), (9, 4), (7, 7)]


def _image(kind, shape, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    if kind == "random":
        return torch.rand(1, channels, h, w, generator=g)
    if kind == "constant":
        return torch.full((1, channels, h, w), 0.3)
    if kind == "quantised":  # heavy ties: 3 grey levels
        return (torch.randint(0, 3, (1, 1, h, w), generator=g).float() / 2).expand(1, channels, h, w).clone()
    raise ValueError(kind)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "constant", "quantised"])
def test_gp_matches_bruteforce(shape, kind):
    guide = _image(kind, shape, seed=sum(shape))
    values = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(1))
    for zeta in (0.3, 1.0):
        out = apro.global_propagation(values, guide, zeta)
        ref = global_propagation_oracle(values[0].numpy(), guide[0].numpy(), zeta)
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-5, rtol=0)


def test_gp_batch_and_prebuilt_tree_agree_with_bruteforce():
    g = torch.Generator().manual_seed(3)
    guide = torch.rand(3, 2, 6, 5, generator=g)
    values = torch.rand(3, 4, 6, 5, generator=g)
    out = apro.global_propagation(values, guide, 0.5)
    tree = apro.minimum_spanning_tree(guide)
    torch.testing.assert_close(apro.global_propagation(values, tree, 0.5), out, rtol=0, atol=0)
    for b in range(3):
        ref = global_propagation_oracle(values[b].numpy(), guide[b].numpy(), 0.5)
        np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-5, rtol=0)


def test_gp_with_embedding_matches_tree_walk():
    g = torch.Generator().manual_seed(4)
    guide = torch.rand(2, 3, 7, 6, generator=g)
    emb = torch.rand(2, 5, 7, 6, generator=g)
    values = torch.rand(2, 2, 7, 6, generator=g)
    tree = apro.minimum_spanning_tree(guide)
    out = apro.global_propagation(values, tree, 0.4, embedding=emb)
    torch.testing.assert_close(apro.global_propagation(values, guide, 0.4, embedding=emb), out)
    e = emb.double().flatten(2)
    for b in range(2):
        u, v = tree.edges[b, :, 0], tree.edges[b, :, 1]
        w = (e[b][:, u] - e[b][:, v]).pow(2).sum(0).numpy()
        cost = path_costs_on_tree(tree.edges[b].numpy(), w, 42, max)
        ref = propagate_dense(values[b].flatten(1).numpy(), np.exp(-cost / 0.4**2))
        np.testing.assert_allclose(out[b].flatten(1).numpy(), ref, atol=1e-5, rtol=0)


def _kruskal_random_ties(guide, seed):
    """An independent Kruskal whose ties are broken by a random key."""
    _, _, h, w = guide.shape
    wts = grid_edge_weights(guide)[0].numpy()
    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(np.isfinite(wts))
    ids = ids[np.lexsort((rng.random(ids.size), wts[ids]))]
    parent = list(range(h * w))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    edges, weights = [], []
    for e in ids:
        p, q = (e, e + 1) if e < h * w else (e - h * w, e - h * w + w)
        a, b = find(p), find(q)
        if a != b:
            parent[a] = b
            edges.append((p, q))
            weights.append(wts[e])
    return SpanningTree(
        torch.tensor([edges]), torch.tensor([weights], dtype=torch.float32), h, w
    )


def test_gp_does_not_depend_on_tie_breaking():
    guide = _image("quantised", (8, 9), seed=5)
    values = torch.rand(1, 2, 8, 9, generator=torch.Generator().manual_seed(0))
    t1, t2 = _kruskal_random_ties(guide, 0), _kruskal_random_ties(guide, 1)
    s1 = {tuple(sorted(e)) for e in t1.edges[0].tolist()}
    s2 = {tuple(sorted(e)) for e in t2.edges[0].tolist()}
    assert s1 != s2, "the test needs two different minimum spanning trees"
    y1 = apro.global_propagation(values, t1, 0.3)
    y2 = apro.global_propagation(values, t2, 0.3)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(apro.global_propagation(values, guide, 0.3), y1, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    c=st.integers(1, 4),
    zeta=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_gp_properties(h, w, c, zeta, seed):
    g = torch.Generator().manual_seed(seed)
    guide = torch.rand(2, 3, h, w, generator=g)
    values = torch.randn(2, c, h, w, generator=g)
    out = apro.global_propagation(values, guide, zeta)
    lo = values.amin((2, 3), keepdim=True)
    hi = values.amax((2, 3), keepdim=True)
    assert bool((out >= lo - 1e-5).all() and (out <= hi + 1e-5).all())
    const = torch.full_like(values, 0.7)
    torch.testing.assert_close(apro.global_propagation(const, guide, zeta), const)
    mean = apro.global_propagation(values, guide, 1e4)
    torch.testing.assert_close(mean, values.mean((2, 3), keepdim=True).expand_as(values), atol=1e-5, rtol=0)


def test_gp_tiny_zeta_is_identity_and_float64_kept():
    guide = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    values = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    out = apro.global_propagation(values, guide, 1e-6)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, values)


def test_gp_has_no_gradient_and_keeps_float16():
    values = torch.rand(1, 1, 4, 4, requires_grad=True)
    out = apro.global_propagation(values, torch.rand(1, 3, 4, 4), 0.5)
    assert not out.requires_grad
    half = apro.global_propagation(values.detach().half(), torch.rand(1, 3, 4, 4), 0.5)
    assert half.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gp_and_lp_on_cuda():
    values = torch.rand(2, 2, 9, 9, device="cuda")
    image = torch.rand(2, 3, 9, 9, device="cuda")
    out = apro.global_propagation(values, image, 0.5)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), apro.global_propagation(values.cpu(), image.cpu(), 0.5))
    lp = apro.local_propagation(values, image, 3, 0.3, 4)
    torch.testing.assert_close(lp.cpu(), apro.local_propagation(values.cpu(), image.cpu(), 3, 0.3, 4))


def test_tree_filter_matches_path_product_bruteforce():
    g = torch.Generator().manual_seed(8)
    guide = torch.rand(2, 3, 6, 7, generator=g)
    values = torch.rand(2, 3, 6, 7, generator=g)
    tree = apro.minimum_spanning_tree(guide)
    out = apro.tree_filter(values, tree, 0.2)
    torch.testing.assert_close(apro.tree_filter(values, guide, 0.2), out)
    for b in range(2):
        cost = path_costs_on_tree(tree.edges[b].numpy(), tree.weights[b].double().numpy(), 42, lambda a, w: a + w)
        ref = propagate_dense(values[b].flatten(1).numpy(), np.exp(-cost / 0.2))
        np.testing.assert_allclose(out[b].flatten(1).numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1), (6, 9)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_lp_matches_direct_loop(shape, k):
    g = torch.Generator().manual_seed(k)
    image = torch.rand(2, 3, *shape, generator=g)
    values = torch.rand(2, 2, *shape, generator=g)
    out = apro.local_propagation(values, image, k, 0.3, 3)
    for b in range(2):
        ref = local_propagation_oracle(values[b].numpy(), image[b].numpy(), k, 0.3, 3)
        np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-5, rtol=0)


def test_lp_mask_applied_before_and_after_every_step():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 7, 8, generator=g)
    values = torch.rand(1, 1, 7, 8, generator=g)
    mask = torch.zeros(1, 1, 7, 8)
    mask[..., 2:6, 1:5] = 1
    out = apro.local_propagation(values, image, 3, 0.5, 4, mask=mask)
    ref = local_propagation_oracle(values[0].numpy(), image[0].numpy(), 3, 0.5, 4, mask[0].numpy())
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-5, rtol=0)
    assert bool((out[mask.expand_as(out) == 0] == 0).all())


def test_lp_entries_sharing_guide_and_mask_are_grouped_exactly():
    """Entries with equal (image, mask) share one weight computation; results are those of
    one call per entry, bit for bit, and the grouping distinguishes image from mask."""
    from apro.propagation import _identical_entries

    g = torch.Generator().manual_seed(4)
    img_a, img_b = torch.rand(1, 3, 9, 10, generator=g), torch.rand(1, 3, 9, 10, generator=g)
    box, other = torch.zeros(1, 1, 9, 10), torch.zeros(1, 1, 9, 10)
    box[..., 2:7, 1:6] = 1
    other[..., 1:5, 4:9] = 1
    image = torch.cat([img_a, img_a, img_a, img_b, img_a])
    mask = torch.cat([box, other, box, box, box])
    values = torch.rand(5, 2, 9, 10, generator=g)
    assert _identical_entries(image, mask.expand(5, 2, 9, 10)) == [[0, 2, 4], [1], [3]]
    out = apro.local_propagation(values, image, 5, 0.3, 6, mask=mask)
    for i in range(5):
        alone = apro.local_propagation(values[i:i + 1], image[i:i + 1], 5, 0.3, 6, mask=mask[i:i + 1])
        assert torch.equal(out[i:i + 1], alone), i


def test_gp_entries_with_one_tree_in_a_row_share_it_exactly():
    """Consecutive entries with the same tree (the instances of one image) are propagated as
    channels of one merge tree: the result equals one call per entry, bit for bit, for runs,
    repeats that are not consecutive, several channels, and the embedding (second-stage) path."""
    from apro.propagation import _tree_run_heads

    g = torch.Generator().manual_seed(6)
    trees = apro.minimum_spanning_tree(torch.rand(3, 3, 9, 11, generator=g))
    index = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1])
    tree = trees.select(index)
    assert _tree_run_heads(tree).tolist() == [True, False, False, True, True, False, True, True]
    values = torch.rand(len(index), 2, 9, 11, generator=g)
    for embedding in (None, values):
        out = apro.global_propagation(values, tree, 0.3, embedding=embedding)
        for i in range(len(index)):
            one = tree.select(torch.tensor([i]))
            alone = apro.global_propagation(values[i:i + 1], one, 0.3,
                                            embedding=None if embedding is None else embedding[i:i + 1])
            assert torch.equal(out[i:i + 1], alone), (i, embedding is None)


def test_lp_weight_cache_is_exact_and_follows_the_guide():
    from apro.propagation import _WeightCache

    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 12, 10, generator=g)
    values = torch.rand(1, 2, 12, 10, generator=g)
    reference = lambda img: _local_iterate_torch(values, _local_affinity_torch(img, 5, 0.3), 2, 4,  # noqa: E731
                                                 torch.ones(1, 1, 12, 10))
    first = apro.local_propagation(values, image, 5, 0.3, 4)
    assert torch.equal(apro.local_propagation(values, image, 5, 0.3, 4), first)  # a cache hit
    torch.testing.assert_close(first, reference(image))
    changed = image.clone()
    changed[0, 1, 5, 4] += 0.25  # same shape, one pixel differs: must not reuse the weights
    torch.testing.assert_close(apro.local_propagation(values, changed, 5, 0.3, 4), reference(changed))
    cache = _WeightCache(size=2)
    guides = [np.random.default_rng(i).random((3, 6, 7)).astype(np.float32) for i in range(3)]
    for guide in guides:
        cache.get(guide, 1, 4.0)
    assert len(cache._entries) == 2  # least recently used dropped
    np.testing.assert_array_equal(cache.get(guides[0], 1, 4.0), cache.get(guides[0].copy(), 1, 4.0))


def test_lp_torch_path_matches_kernel_path():
    g = torch.Generator().manual_seed(6)
    image = torch.rand(2, 3, 11, 13, generator=g)
    values = torch.rand(2, 3, 11, 13, generator=g)
    mask = (torch.rand(2, 1, 11, 13, generator=g) > 0.3).float()
    torch.testing.assert_close(local_affinity(image, 5, 0.2), _local_affinity_torch(image, 5, 0.2))
    fast = apro.local_propagation(values, image, 5, 0.2, 6, mask=mask)
    slow = _local_iterate_torch(values, _local_affinity_torch(image, 5, 0.2), 2, 6, mask)
    torch.testing.assert_close(fast, slow)


def test_lp_properties():
    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 3, 10, 10, generator=g)
    values = torch.rand(1, 2, 10, 10, generator=g, dtype=torch.float64)
    out = apro.local_propagation(values, image.double(), 5, 0.15, 20)
    assert out.dtype == torch.float64
    assert bool((out >= values.amin() - 1e-9).all() and (out <= values.amax() + 1e-9).all())
    const = torch.full_like(values, 0.25)
    torch.testing.assert_close(apro.local_propagation(const, image.double(), 5, 0.15, 20), const)
    torch.testing.assert_close(apro.local_propagation(values, image.double(), 5, 0.15, 0), values)


def test_modules_hold_hyperparameters():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 6, 6, generator=g)
    values = torch.rand(1, 1, 6, 6, generator=g)
    gp = apro.GlobalAffinityPropagation(zeta=0.3)
    lp = apro.LocalAffinityPropagation(kernel_size=3, zeta=0.2, iterations=5)
    tf = apro.TreeFilter(sigma=0.1)
    torch.testing.assert_close(gp(values, image), apro.global_propagation(values, image, 0.3))
    torch.testing.assert_close(lp(values, image), apro.local_propagation(values, image, 3, 0.2, 5))
    torch.testing.assert_close(tf(values, image), apro.tree_filter(values, image, 0.1))
    assert "zeta=0.3" in repr(gp) and "iterations=5" in repr(lp)


def _bad_calls():
    v = torch.rand(1, 2, 5, 5)
    img = torch.rand(1, 3, 5, 5)
    nan = img.clone()
    nan[0, 0, 1, 1] = float("nan")
    inf = img.clone()
    inf[0, 1, 2, 2] = float("inf")
    gp, lp = apro.global_propagation, apro.local_propagation
    return [
        (lambda: gp(v[0], img, 0.1), "values"),
        (lambda: gp(v, img[0], 0.1), "guide_or_tree"),
        (lambda: gp(v, torch.rand(1, 3, 5, 4), 0.1), "guide_or_tree"),
        (lambda: gp(v, torch.rand(2, 3, 5, 5), 0.1), "guide_or_tree"),
        (lambda: gp(v, nan, 0.1), "guide_or_tree"),
        (lambda: gp(v, inf, 0.1), "guide_or_tree"),
        (lambda: gp(v.long(), img, 0.1), "values"),
        (lambda: gp(v, img.int(), 0.1), "guide_or_tree"),
        (lambda: gp(v, img, 0.0), "zeta"),
        (lambda: gp(v, img, -1.0), "zeta"),
        (lambda: gp(v, img, float("nan")), "zeta"),
        (lambda: gp(v, img, "big"), "zeta"),
        (lambda: gp(v, img, 0.1, embedding=torch.rand(1, 2, 4, 5)), "embedding"),
        (lambda: gp(v, apro.minimum_spanning_tree(torch.rand(1, 3, 4, 5)), 0.1), "guide_or_tree"),
        (lambda: gp(torch.rand(1, 2, 0, 5), img, 0.1), "values"),
        (lambda: lp(v, img, kernel_size=4), "kernel_size"),
        (lambda: lp(v, img, kernel_size=0), "kernel_size"),
        (lambda: lp(v, img, kernel_size=3.0), "kernel_size"),
        (lambda: lp(v, img, zeta=0), "zeta"),
        (lambda: lp(v, img, iterations=-1), "iterations"),
        (lambda: lp(v, nan), "image"),
        (lambda: lp(v, torch.rand(1, 3, 6, 5)), "image"),
        (lambda: lp(v, img, mask=torch.ones(1, 3, 5, 5)), "mask"),
        (lambda: lp(v, img, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool)), "mask"),
        (lambda: apro.tree_filter(v, img, sigma=0), "sigma"),
        (lambda: apro.minimum_spanning_tree(torch.rand(3, 5, 5)), "guide"),
        (lambda: apro.LocalAffinityPropagation(kernel_size=2), "kernel_size"),
        (lambda: apro.GlobalAffinityPropagation(zeta=-2), "zeta"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_names_the_argument(index):
    call, name = _bad_calls()[index]
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def test_lp_on_the_mask_crop_equals_full_image():
    g = torch.Generator().manual_seed(12)
    image = torch.rand(3, 3, 30, 40, generator=g)
    values = torch.rand(3, 2, 30, 40, generator=g)
    mask = torch.zeros(3, 1, 30, 40)
    mask[0, :, 10:18, 12:20] = 1  # interior box: the kernel runs on a crop
    mask[1, :, 0:5, 30:40] = 1  # box touching the border
    fast = apro.local_propagation(values, image, 5, 0.2, 7, mask=mask)
    slow = _local_iterate_torch(values, _local_affinity_torch(image, 5, 0.2), 2, 7, mask)
    torch.testing.assert_close(fast, slow)
    assert bool((fast[2] == 0).all())  # empty mask


@pytest.mark.parametrize("channels", [1, 2, 3, 5, 7, 8, 15])
@pytest.mark.parametrize("workers", [1, 2])
def test_gp_channel_blocks_match_bruteforce(channels, workers, monkeypatch):
    """Channels go through the merge tree in rows of 2, 4 or 8 (blocks of up to 7); with two
    threads and one image, the image's halves and its channel blocks go to both threads
    (done here for a small image by lowering the size threshold)."""
    monkeypatch.setattr("apro.propagation._SPLIT_PIXELS", 0)
    monkeypatch.setattr("apro.tree._SPLIT_PIXELS", 0)
    g = torch.Generator().manual_seed(channels)
    guide = torch.rand(1, 3, 6, 7, generator=g)
    values = torch.randn(1, channels, 6, 7, generator=g)
    out = apro.global_propagation(values, guide, 0.4, num_workers=workers)
    ref = global_propagation_oracle(values[0].numpy(), guide[0].numpy(), 0.4)
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-5, rtol=0)
