"""apro.figures: overlays and the Fig. 3 affinity maps, checked against brute force."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree as scipy_mst
from scipy.sparse.csgraph import shortest_path

import apro
from apro.figures import (
    BOX_COLOUR,
    MASK_COLOUR,
    affinity_figure,
    gp_affinity,
    lp_affinity,
    overlay,
    tree_filter_affinity,
)
from apro._color import imagenet_normalize
from oracles import minimax_distances_on_grid


def _image(seed=0, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g)


def _grid_edges(guide):
    d, h, w = guide.shape
    rows, cols, wts = [], [], []
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0)):
                yy, xx = y + dy, x + dx
                if yy < h and xx < w:
                    rows.append(y * w + x)
                    cols.append(yy * w + xx)
                    wts.append(float(((guide[:, y, x] - guide[:, yy, xx]) ** 2).sum()))
    return np.array(rows), np.array(cols), np.array(wts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gp_affinity_matches_brute_force_minimax(seed):
    image = _image(seed)
    _, h, w = image.shape
    x, y = (seed * 2) % w, (seed + 1) % h
    zeta = 0.8
    guide = imagenet_normalize(image[None].double())[0].numpy()
    cost = minimax_distances_on_grid(guide)[y * w + x].reshape(h, w)
    got = gp_affinity(image, (x, y), zeta)
    assert got[y, x] == 1.0
    np.testing.assert_allclose(got.numpy(), np.exp(-cost / zeta**2), rtol=1e-5, atol=1e-6)


def test_gp_affinity_is_what_global_propagation_spreads():
    """global_propagation of a delta at i gives psi(j, i) / z_j: the figure's map, normalised."""
    image = _image(4)
    _, h, w = image.shape
    zeta = 0.8
    guide = imagenet_normalize(image[None].double())[0].numpy()
    psi = np.exp(-minimax_distances_on_grid(guide) / zeta**2)
    x, y = 3, 2
    delta = torch.zeros(1, 1, h, w, dtype=torch.float64)
    delta[0, 0, y, x] = 1
    spread = apro.global_propagation(delta, imagenet_normalize(image[None].double()), zeta)[0, 0].numpy()
    row = gp_affinity(image, (x, y), zeta).double().numpy().reshape(-1)
    np.testing.assert_allclose(spread.reshape(-1), row / psi.sum(1), rtol=1e-5)


def test_tree_filter_affinity_matches_path_sums_on_the_mst():
    image = _image(5)
    _, h, w = image.shape
    r, c, wt = _grid_edges(image.double().numpy())
    n = h * w
    mst = scipy_mst(coo_matrix((wt + 1e-12, (r, c)), shape=(n, n)).tocsr())  # random weights: unique MST
    dist = shortest_path(mst, directed=False)  # on a tree the shortest path is the tree path
    x, y, sigma = 1, 3, 0.5
    got = tree_filter_affinity(image, (x, y), sigma).double().numpy().reshape(-1)
    np.testing.assert_allclose(got, np.exp(-dist[y * w + x] / sigma), rtol=1e-4, atol=1e-7)
    assert got[y * w + x] == 1.0
    spread = apro.tree_filter(torch.eye(n, dtype=torch.float64)[y * w + x].view(1, 1, h, w), image[None].double(), sigma)
    full = np.exp(-dist / sigma)
    np.testing.assert_allclose(spread.numpy().reshape(-1), full[:, y * w + x] / full.sum(1), rtol=1e-4)


def test_lp_affinity_is_a_max_scaled_spread():
    image = _image(6, 12, 12)
    a = lp_affinity(image, (6, 6), iterations=3)
    assert float(a.max()) == pytest.approx(1.0) and float(a.min()) >= 0
    assert float(a[0, 0]) == 0  # 3 steps of a 5x5 window reach 6 pixels, not the corner


def test_pixel_outside_raises():
    with pytest.raises(ValueError, match="outside"):
        gp_affinity(_image(), (6, 0))


def test_affinity_figure_is_written(tmp_path):
    image = _image(7, 24, 32)
    path = tmp_path / "fig.png"
    maps = affinity_figure(image, (5, 7), str(path), zeta_g=0.5, sigma=0.2)
    assert set(maps) == {"gp", "lp", "treefilter"}
    assert float(maps["gp"][7, 5]) == 1.0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_overlay_tints_the_mask_and_draws_the_box():
    image = np.full((20, 30, 3), 100, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    out = overlay(image, mask, box=(2, 2, 28, 18), alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    inner = out[10, 15].astype(int)
    np.testing.assert_allclose(inner, (np.array(MASK_COLOUR) + 100) / 2, atol=1)
    assert tuple(out[2, 10]) == BOX_COLOUR
    assert tuple(out[10, 25]) == (100, 100, 100)
    with pytest.raises(ValueError, match="mask"):
        overlay(image, mask[:5])
