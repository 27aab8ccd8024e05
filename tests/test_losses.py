"""Tests of apro.losses: hand-computed cases, oracles, gradients, toy images and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.color import rgb2lab

import apro
from apro import global_propagation, local_propagation, minimum_spanning_tree, tree_filter
from apro._color import imagenet_normalize, rgb_to_lab
from apro.losses import (
    BOX_MASK_LOSSES,
    SPARSE_LOSSES,
    APRoBoxLoss,
    APRoSparseLoss,
    BoxMaskLoss,
    BoxProjectionLoss,
    CRFLoss,
    PairwiseLoss,
    PartialCrossEntropy,
    SparseLoss,
    TreeEnergyLoss,
    TreeFilterBoxLoss,
    TreeFilterLocalBoxLoss,
    apro_box_loss,
    apro_sparse_loss,
    box_mask_loss,
    box_projection_loss,
    color_similarity,
    crf_loss,
    mean_field_target,
    pairwise_loss,
    partial_cross_entropy,
    sparse_loss,
    tree_energy_loss,
    tree_filter_box_loss,
    tree_filter_local_box_loss,
    tree_guide,
)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def logit(p):
    return math.log(p / (1.0 - p))


def rgb_row(*colours):
    """A 1 x W image from RGB triples, shape (1, 3, 1, W), float64."""
    return torch.tensor(colours, dtype=torch.float64).T.reshape(1, 3, 1, len(colours))


def random_box_batch(seed=0, n=3, h=12, w=14):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, h, w, generator=g)
    image = images[[0, 0, 1]][:n]
    logits = torch.randn(n, 1, h, w, generator=g, dtype=torch.float64).requires_grad_()
    box = torch.zeros(n, 1, h, w, dtype=torch.float64)
    box[0, :, 2:9, 3:11] = 1
    box[1 % n, :, 4:12, 0:7] = 1
    box[2 % n, :, 0:6, 5:14] = 1
    return logits, box, image.double()


def random_sparse_batch(seed=0, b=2, k=3, h=10, w=12):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.full((b, h, w), 255, dtype=torch.long)
    labels[:, 2, 1:9] = 0
    labels[:, 7, 3:6] = 1
    labels[-1, 4:9, 10] = k - 1
    return logits, labels, image


# --------------------------------------------------------------------------- colour


def test_rgb_to_lab_matches_skimage():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[0, :, 0, 0] = 0.0
    x[0, :, 0, 1] = 1.0
    x[0, :, 0, 2] = 0.02  # linear branch of the sRGB gamma
    ours = rgb_to_lab(x).numpy()
    ref = np.stack([rgb2lab(x[i].permute(1, 2, 0).numpy()).transpose(2, 0, 1) for i in range(2)])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


# --------------------------------------------------------------------------- tree filter oracle


def brute_force_tree_filter(values, edges, weights, sigma):
    """y_i = sum_j v_j prod_{path i->j} exp(-w/sigma) / sum_j prod_path, by walking the tree from each i."""
    n = values.shape[0]
    adj = [[] for _ in range(n)]
    for (u, v), w in zip(edges, weights):
        adj[u].append((v, math.exp(-w / sigma)))
        adj[v].append((u, math.exp(-w / sigma)))
    out = np.zeros_like(values)
    for i in range(n):
        factor = np.zeros(n)
        factor[i] = 1.0
        stack, seen = [i], {i}
        while stack:
            x = stack.pop()
            for y, a in adj[x]:
                if y not in seen:
                    seen.add(y)
                    factor[y] = factor[x] * a
                    stack.append(y)
        out[i] = factor @ values / factor.sum()
    return out


@pytest.mark.parametrize(
    "seed,h,w,c,sigma,smooth",
    [(0, 4, 5, 1, 0.5, True), (1, 5, 6, 3, 0.02, True), (2, 1, 7, 2, 0.2, False), (3, 6, 1, 1, 1.0, False),
     (4, 6, 7, 2, 0.05, True), (5, 3, 3, 1, 0.02, False)],
)
def test_tree_filter_matches_path_product_oracle(seed, h, w, c, sigma, smooth):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, h, w, generator=g)
    if smooth:  # small steps so that affinities are far from 0 and 1 and pixels really mix
        image = image * 0.15
    values = torch.rand(2, c, h, w, generator=g, dtype=torch.float64)
    tree = minimum_spanning_tree(image)
    ours = tree_filter(values, tree, sigma).numpy()
    for b in range(2):
        planes = values[b].reshape(c, -1).T.numpy()
        ref = brute_force_tree_filter(planes, tree.edges[b].numpy(), tree.weights[b].double().numpy(), sigma)
        np.testing.assert_allclose(ours[b].reshape(c, -1).T, ref, atol=1e-5)
        # The oracle itself must not be trivial: the filter moved the values.
        if smooth:
            assert np.abs(ref - planes).max() > 1e-3


@settings(max_examples=20, deadline=None)
@given(
    h=st.integers(1, 5), w=st.integers(2, 5), c=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
    sigma=st.sampled_from([0.02, 0.1, 0.5, 2.0]), scale=st.sampled_from([0.05, 0.3, 1.0]),
)
def test_tree_filter_matches_oracle_property(h, w, c, seed, sigma, scale):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g) * scale
    values = torch.rand(1, c, h, w, generator=g, dtype=torch.float64)
    tree = minimum_spanning_tree(image)
    ours = tree_filter(values, tree, sigma)[0].reshape(c, -1).T.numpy()
    ref = brute_force_tree_filter(values[0].reshape(c, -1).T.numpy(), tree.edges[0].numpy(),
                                  tree.weights[0].double().numpy(), sigma)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# --------------------------------------------------------------------------- hand-computed cases


def test_box_projection_loss_hand_computed():
    lv = [[0.0, 2.0, -1.0], [1.0, -3.0, 0.5]]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 1, 2, 3)
    box = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.float64).view(1, 1, 2, 3)
    p = [[sig(v) for v in row] for row in lv]
    px = [max(p[0][j], p[1][j]) for j in range(3)]
    bx = [0.0, 1.0, 1.0]
    py = [max(p[0]), max(p[1])]
    by = [1.0, 1.0]

    def dice(x, t):
        return 1 - 2 * sum(a * b for a, b in zip(x, t)) / (sum(a * a for a in x) + sum(b * b for b in t) + 1e-5)

    expected = dice(px, bx) + dice(py, by)
    assert float(box_projection_loss(logits, box)) == pytest.approx(expected, abs=1e-10)


def test_pairwise_loss_hand_computed():
    red, green, blue = (0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.9)
    image = rgb_row(red, green, red, blue, red)  # only red pixels 0, 2, 4 are similar (at distance 2)
    lv = [1.5, -0.5, 0.3, 2.0, -1.2]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 1, 1, 5)
    p = [sig(v) for v in lv]

    def pair(i, j):
        return -math.log(p[i] * p[j] + (1 - p[i]) * (1 - p[j]))

    full = torch.ones(1, 1, 1, 5, dtype=torch.float64)
    expected = (2 * pair(0, 2) + 2 * pair(2, 4)) / 4
    assert float(pairwise_loss(logits, full, image)) == pytest.approx(expected, abs=1e-10)
    # Only pairs whose centre pixel is inside the box count: 2->0, 2->4, 4->2.
    box = torch.tensor([0, 1, 1, 1, 1], dtype=torch.float64).view(1, 1, 1, 5)
    expected = (pair(2, 0) + 2 * pair(2, 4)) / 3
    assert float(pairwise_loss(logits, box, image)) == pytest.approx(expected, abs=1e-10)
    assert float(pairwise_loss(logits, box, image, weight=2.5)) == pytest.approx(2.5 * expected, abs=1e-10)


def test_pairwise_loss_with_repeated_images_equals_the_per_instance_loss():
    """Consecutive instances of one image share one colour similarity: the loss is the same as
    with every instance's similarity computed on its own, in any order of the images."""
    from torch.nn import functional as F

    from apro.losses.pairwise import _neighbours, _shared_color_similarity

    g = torch.Generator().manual_seed(0)
    images = 0.4 + 0.03 * torch.rand(3, 3, 12, 14, generator=g, dtype=torch.float64)  # similar colours
    order = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1, 1])
    image = images[order]
    logits = torch.randn(len(order), 1, 12, 14, generator=g, dtype=torch.float64)
    box = (torch.rand(len(order), 1, 12, 14, generator=g) > 0.3).to(torch.float64)
    shared = _shared_color_similarity(image)
    alone = torch.cat([color_similarity(image[i:i + 1]) for i in range(len(order))])
    assert torch.allclose(shared, alone, rtol=0, atol=1e-12)
    weights = (alone >= 0.3).to(torch.float64) * box
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    same = torch.logaddexp(log_p.unsqueeze(2) + _neighbours(log_p), log_q.unsqueeze(2) + _neighbours(log_q))[:, 0]
    assert 0.05 < float(weights.mean()) < 0.9  # some pairs count, not all
    expected = float((-same * weights).sum() / weights.sum())
    assert float(pairwise_loss(logits, box, image)) == pytest.approx(expected, rel=1e-12)


def test_color_similarity_is_exp_of_half_lab_distance():
    a, b = (0.5, 0.4, 0.3), (0.505, 0.402, 0.306)
    image = rgb_row(a, (0.0, 0.0, 0.0), b)
    lab = rgb2lab(np.array([[a, b]]))[0]
    expected = math.exp(-0.5 * np.linalg.norm(lab[0] - lab[1]))
    sim = color_similarity(image)  # offsets in row-major order of the dilated 3x3 window
    assert float(sim[0, 4, 0, 0]) == pytest.approx(expected, abs=1e-9)  # neighbour (0, +2)
    assert float(sim[0, 3, 0, 2]) == pytest.approx(expected, abs=1e-9)  # neighbour (0, -2)
    assert float(sim[0, :, 0, 1].sum()) == 0.0  # both neighbours of the middle pixel are outside
    assert 0.3 < expected < 1.0


def test_tree_filter_box_loss_hand_computed():
    image = rgb_row((0.2, 0.3, 0.4), (0.4, 0.3, 0.5), (0.45, 0.2, 0.5))
    sigma = 0.05
    w01 = (0.2**2 + 0 + 0.1**2)
    w12 = (0.05**2 + 0.1**2 + 0)
    a, c = math.exp(-w01 / sigma), math.exp(-w12 / sigma)
    lv = [0.7, -1.1, 2.0]
    p = [sig(v) for v in lv]
    y = [
        (p[0] + a * p[1] + a * c * p[2]) / (1 + a + a * c),
        (a * p[0] + p[1] + c * p[2]) / (a + 1 + c),
        (a * c * p[0] + c * p[1] + p[2]) / (a * c + c + 1),
    ]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 1, 1, 3)
    box = torch.tensor([1, 1, 0], dtype=torch.float64).view(1, 1, 1, 3)
    expected = 2.0 * (abs(y[0] - p[0]) + abs(y[1] - p[1])) / 2
    # Tree edge weights are stored in float32, hence the tolerance.
    assert float(tree_filter_box_loss(logits, box, image, sigma=sigma)) == pytest.approx(expected, abs=1e-6)


def test_tree_energy_loss_hand_computed():
    image = rgb_row((0.2, 0.3, 0.4), (0.4, 0.3, 0.5), (0.45, 0.2, 0.5))
    sigma = 0.05
    a = math.exp(-(0.2**2 + 0.1**2) / sigma)
    c = math.exp(-(0.05**2 + 0.1**2) / sigma)
    lv = [[0.3, -0.2, 1.0], [0.1, 0.9, -0.4]]  # (K=2, W=3)
    p = []
    for i in range(3):
        e = [math.exp(lv[0][i]), math.exp(lv[1][i])]
        p.append([e[0] / sum(e), e[1] / sum(e)])
    weights = [[1, a, a * c], [a, 1, c], [a * c, c, 1]]
    y = [[sum(weights[i][j] * p[j][k] for j in range(3)) / sum(weights[i]) for k in range(2)] for i in range(3)]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 255, 255]]])
    expected = 0.4 * sum(abs(y[i][k] - p[i][k]) for i in (1, 2) for k in range(2)) / 2
    assert float(tree_energy_loss(logits, labels, image, sigma=sigma)) == pytest.approx(expected, abs=1e-6)


def test_crf_loss_one_mean_field_step_hand_computed():
    # Normalised colours differ by 0.1 in one channel, so k_01 = exp(-0.01 / (2 * 0.1^2)) = exp(-0.5).
    image = rgb_row((0.5, 0.5, 0.5), (0.5 + 0.229 * 0.1, 0.5, 0.5))
    k = math.exp(-0.5)
    p = [0.8, 0.3]
    logits = torch.tensor([logit(v) for v in p], dtype=torch.float64).view(1, 1, 1, 2)
    box = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    x = []
    for i, j in ((0, 1), (1, 0)):
        q_fg = p[i] * p[j] ** k
        q_bg = (1 - p[i]) * (1 - p[j]) ** k
        x.append(min(max(q_fg / (1e-6 + q_fg + q_bg), 0.1), 0.9))
    t = [float(v > 0.5) for v in x]
    assert t == [1.0, 0.0]  # the case is not degenerate: the target differs from an all-on/off mask
    target = mean_field_target(torch.tensor(p, dtype=torch.float64).view(1, 1, 1, 2), box, image, iterations=1)
    assert target.flatten().tolist() == t
    expected = 1 - 2 * sum(a * b for a, b in zip(p, t)) / (sum(a * a for a in p) + sum(t) + 0.002)
    assert float(crf_loss(logits, box, image, iterations=1)) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("level,target", [(0.7, 1.0), (0.4, 0.0)])
def test_crf_loss_flat_image_converges_to_majority(level, target):
    # On a flat image q_fg = x^n, q_bg = (1-x)^n: x > 0.5 grows to the 0.9 clamp, x < 0.5 shrinks to 0.1.
    image = torch.full((1, 3, 3, 4), 0.3, dtype=torch.float64)
    probs = torch.full((1, 1, 3, 4), level, dtype=torch.float64)
    box = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    assert torch.equal(mean_field_target(probs, box, image), torch.full_like(probs, target))
    n = 12
    expected = 1 - 2 * level * target * n / (n * level**2 + n * target + 0.002)
    assert float(crf_loss(torch.logit(probs), box, image)) == pytest.approx(expected, abs=1e-9)


def test_crf_target_is_zero_outside_the_box():
    image = torch.full((1, 3, 4, 4), 0.3, dtype=torch.float64)
    probs = torch.full((1, 1, 4, 4), 0.95, dtype=torch.float64)
    box = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    box[..., :, :3] = 1
    target = mean_field_target(probs, box, image)
    assert float(target[..., 3].sum()) == 0.0
    assert float(target[..., 1:3, :2].min()) == 1.0


def test_apro_box_loss_flat_image_hand_computed():
    image = torch.full((1, 3, 1, 4), 0.6, dtype=torch.float64)
    lv = [0.5, -1.0, 2.0, 0.3]
    p = [sig(v) for v in lv]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 1, 1, 4)
    b = [1.0, 1.0, 1.0, 0.0]
    box = torch.tensor(b, dtype=torch.float64).view(1, 1, 1, 4)
    # GP on a flat image: every C_ij = 0, so both stages give the plain mean of p.
    mean = sum(p) / 4
    expected_g = 2.0 * sum(abs(mean - p[i]) * b[i] for i in range(4)) / 3
    got = apro_box_loss(logits, box, image, variant="gp")
    assert float(got) == pytest.approx(expected_g, abs=1e-9)
    # One LP step, 3-window, flat image: y_i = B_i * mean over in-image neighbours of B_j p_j.
    bp = [b[i] * p[i] for i in range(4)]
    y = [b[0] * (bp[0] + bp[1]) / 2, b[1] * sum(bp[0:3]) / 3, b[2] * sum(bp[1:4]) / 3, b[3] * (bp[2] + bp[3]) / 2]
    expected_l = 1.0 * sum(abs(y[i] - p[i]) * b[i] for i in range(4)) / 3
    got = apro_box_loss(logits, box, image, variant="lp", kernel_size=3, iterations=1)
    assert float(got) == pytest.approx(expected_l, abs=1e-9)
    got = apro_box_loss(logits, box, image, variant="gp-lp-p", kernel_size=3, iterations=1)
    assert float(got) == pytest.approx(expected_g + expected_l, abs=1e-9)


def test_apro_box_loss_one_stage_gp_hand_computed():
    # zeta_gh=None: the paper's one-stage GP (Eq. 3). Row a, a, c: C_01 = 0, C_02 = C_12 = w.
    image = rgb_row((0.2, 0.3, 0.4), (0.2, 0.3, 0.4), (0.7, 0.1, 0.5))
    guide = imagenet_normalize(image)
    w = float(((guide[..., 0] - guide[..., 2]) ** 2).sum())
    zeta = 1.5
    a = math.exp(-w / zeta**2)
    lv = [0.4, -0.8, 1.3]
    p = [sig(v) for v in lv]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 1, 1, 3)
    box = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 3)
    y = [(p[0] + p[1] + a * p[2]) / (2 + a), (p[0] + p[1] + a * p[2]) / (2 + a), (a * (p[0] + p[1]) + p[2]) / (2 * a + 1)]
    expected = 2.0 * sum(abs(y[i] - p[i]) for i in range(3)) / 3
    got = apro_box_loss(logits, box, image, variant="gp", zeta_gl=zeta, zeta_gh=None)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # a second stage (here a wide one) changes the target, so the option is not a no-op
    assert abs(float(apro_box_loss(logits, box, image, variant="gp", zeta_gl=zeta, zeta_gh=5.0)) - expected) > 1e-3
    with pytest.raises(ValueError, match="zeta_gh"):
        apro_box_loss(logits, box, image, variant="gp", zeta_gh=0.0)


@pytest.mark.parametrize("fn", [apro_box_loss, tree_filter_box_loss, tree_filter_local_box_loss, crf_loss])
def test_box_terms_are_normalised_per_instance_then_averaged(fn):
    # The released code divides each instance's term by its own box area, then averages.
    logits, box, image = random_box_batch(seed=13)
    box[0] = 0
    box[0, :, 5:7, 6:8] = 1  # a 4-pixel box next to a 56- and a 54-pixel one
    logits = logits.detach()
    singles = [float(fn(logits[i : i + 1], box[i : i + 1], image[i : i + 1])) for i in range(3)]
    assert float(fn(logits, box, image)) == pytest.approx(sum(singles) / 3, rel=1e-9)


def test_tree_filter_local_is_tree_filter_plus_apro_local_term():
    # Table 5's "TreeFilter + Local Pairwise": GP's place taken by the tree filter, LP unchanged.
    logits, box, image = random_box_batch(seed=15)
    logits = logits.detach()
    expected = tree_filter_box_loss(logits, box, image) + apro_box_loss(logits, box, image, variant="lp")
    torch.testing.assert_close(tree_filter_local_box_loss(logits, box, image), expected)
    # On the 1 x 3 hand case of the tree filter, add the hand-computed one-step LP term.
    image = rgb_row((0.2, 0.3, 0.4), (0.2, 0.3, 0.4), (0.2, 0.3, 0.4))
    lv = [0.7, -1.1, 2.0]
    p = [sig(v) for v in lv]
    logits = torch.tensor(lv, dtype=torch.float64).view(1, 1, 1, 3)
    box = torch.tensor([1, 1, 0], dtype=torch.float64).view(1, 1, 1, 3)
    tf = (p[0] + p[1] + p[2]) / 3  # flat image: every path product is 1
    lp = [(p[0] + p[1]) / 2, (p[0] + p[1]) / 3]  # one masked 3-window step, pixel 2 masked out
    expected = 2.0 * (abs(tf - p[0]) + abs(tf - p[1])) / 2 + 1.0 * (abs(lp[0] - p[0]) + abs(lp[1] - p[1])) / 2
    got = tree_filter_local_box_loss(logits, box, image, kernel_size=3, iterations=1)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_partial_cross_entropy_hand_computed():
    lv = [[[1.0, 0.0]], [[-1.0, 2.0]]]  # (K=2, H=1, W=2)
    logits = torch.tensor(lv).unsqueeze(0)
    labels = torch.tensor([[[0, 255]]])
    expected = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(-1.0)))
    assert float(partial_cross_entropy(logits, labels)) == pytest.approx(expected, abs=1e-6)


def test_apro_sparse_loss_flat_image_hand_computed():
    image = torch.full((1, 3, 2, 2), 0.4, dtype=torch.float64)
    logits = torch.tensor([[[0.0, 1.0], [2.0, -1.0]], [[0.5, 0.5], [0.0, 1.0]]], dtype=torch.float64).unsqueeze(0)
    labels = torch.tensor([[[0, 255], [255, 255]]])
    p = torch.softmax(logits, 1)[0]
    mean = p.mean((1, 2), keepdim=True)  # flat image: GP is the image-wide mean per class
    unl = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    expected = 0.4 * float(((p - mean).abs() * unl).sum()) / 3
    got = apro_sparse_loss(logits, labels, image, variant="gp")
    assert float(got) == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------- gradients and detached targets


@pytest.mark.parametrize("name", sorted(BOX_MASK_LOSSES))
def test_box_losses_give_finite_nonzero_gradients(name):
    logits, box, image = random_box_batch()
    # Similar colours so that the BoxInst threshold admits pairs too.
    image = 0.5 + 0.02 * (image - 0.5)
    loss = BOX_MASK_LOSSES[name](logits, box, image)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", sorted(SPARSE_LOSSES))
def test_sparse_losses_give_finite_nonzero_gradients(name):
    logits, labels, image = random_sparse_batch()
    loss = SPARSE_LOSSES[name](logits, labels, image)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "fn", [pairwise_loss, crf_loss, tree_filter_box_loss, tree_filter_local_box_loss, apro_box_loss]
)
def test_each_comparison_term_alone_reaches_the_logits(fn):
    logits, box, image = random_box_batch(seed=3)
    image = 0.5 + 0.02 * (image - 0.5)
    fn(logits, box, image).backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0


def _grad(loss_fn, logits):
    x = logits.detach().clone().requires_grad_()
    loss_fn(x).backward()
    return x.grad


def _l1(p, y, m):
    return ((p - y).abs() * m).sum() / m.sum()


def _instance_l1(p, y, b):
    return (((p - y).abs() * b).sum((1, 2, 3)) / b.sum((1, 2, 3))).mean()


def _mal_dice(p, t):
    p, t = p.flatten(1), t.flatten(1)
    return (1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + 0.001 + (t * t).sum(1) + 0.001)).mean()


def test_box_pseudo_labels_carry_no_gradient():
    logits, box, image = random_box_batch(seed=5)
    guide = imagenet_normalize(image)
    tree = minimum_spanning_tree(guide)
    p0 = torch.sigmoid(logits.detach())
    y1 = global_propagation(p0, tree, 0.01)
    gp = global_propagation(y1, tree, 0.07, embedding=y1)
    lp = local_propagation(p0, guide, 5, 0.15, 20, mask=box)
    tf = tree_filter(p0, minimum_spanning_tree(image), 0.02)

    def ref(x):
        p = torch.sigmoid(x)
        return 2.0 * _instance_l1(p, gp, box) + 1.0 * _instance_l1(p, lp, box)

    torch.testing.assert_close(_grad(lambda x: apro_box_loss(x, box, image), logits), _grad(ref, logits))
    torch.testing.assert_close(
        _grad(lambda x: tree_filter_box_loss(x, box, image), logits),
        _grad(lambda x: 2.0 * _instance_l1(torch.sigmoid(x), tf, box), logits),
    )
    lp_gp = global_propagation(global_propagation(lp, tree, 0.01), tree, 0.07,
                               embedding=global_propagation(lp, tree, 0.01))
    torch.testing.assert_close(
        _grad(lambda x: apro_box_loss(x, box, image, variant="lp-gp-c"), logits),
        _grad(lambda x: 3.0 * _instance_l1(torch.sigmoid(x), lp_gp, box), logits),
    )
    target = mean_field_target(p0, box, image)
    torch.testing.assert_close(
        _grad(lambda x: crf_loss(x, box, image), logits),
        _grad(lambda x: _mal_dice(torch.sigmoid(x), target), logits),
    )


def test_sparse_pseudo_labels_carry_no_gradient():
    logits, labels, image = random_sparse_batch(seed=6)
    guide = imagenet_normalize(image)
    tree = minimum_spanning_tree(guide)
    p0 = torch.softmax(logits.detach(), 1)
    y1 = global_propagation(p0, tree, 0.01)
    gp = global_propagation(y1, tree, 0.07, embedding=y1)
    lp = local_propagation(p0, guide, 5, 0.15, 20)
    tf = tree_filter(p0, minimum_spanning_tree(image), 0.02)
    unl = (labels == 255).unsqueeze(1).double()

    def ref(x):
        p = torch.softmax(x, 1)
        return 0.4 * (_l1(p, gp, unl) + _l1(p, lp, unl))

    torch.testing.assert_close(_grad(lambda x: apro_sparse_loss(x, labels, image), logits), _grad(ref, logits))
    torch.testing.assert_close(
        _grad(lambda x: tree_energy_loss(x, labels, image), logits),
        _grad(lambda x: 0.4 * _l1(torch.softmax(x, 1), tf, unl), logits),
    )


# --------------------------------------------------------------------------- toy images


def _disc_scene(h=32, w=32):
    """Bluish disc on a reddish background; the disc's tight box also covers background corners."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    obj = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) <= 9.5**2)[None, None]
    image = torch.where(obj, torch.tensor([0.1, 0.3, 0.8]).view(1, 3, 1, 1), torch.tensor([0.85, 0.25, 0.15]).view(1, 3, 1, 1))
    ys, xs = torch.nonzero(obj[0, 0], as_tuple=True)
    box = torch.zeros(1, 1, h, w)
    box[..., ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
    return image, box, obj


@pytest.mark.parametrize("name", sorted(BOX_MASK_LOSSES))
def test_right_mask_beats_filled_box_on_toy_image(name):
    image, box, obj = _disc_scene()
    right = torch.where(obj, 4.0, -4.0)
    filled = torch.where(box > 0, 4.0, -4.0)
    loss_right = float(box_mask_loss(name, right, box, image))
    loss_filled = float(box_mask_loss(name, filled, box, image))
    if name == "projection":  # the unary term alone cannot tell them apart (equal projections)
        assert loss_right == pytest.approx(loss_filled, abs=1e-6)
    else:
        assert loss_right < loss_filled - 1e-3


def test_apro_box_loss_prefers_right_mask_for_every_variant():
    image, box, obj = _disc_scene()
    right = torch.where(obj, 4.0, -4.0)
    filled = torch.where(box > 0, 4.0, -4.0)
    for variant in ("gp-lp-p", "gp-lp-c", "lp-gp-c", "gp", "lp"):
        assert float(apro_box_loss(right, box, image, variant=variant)) < float(
            apro_box_loss(filled, box, image, variant=variant)
        )


@pytest.mark.parametrize("name", ["apro", "gp", "lp", "gp-lp-c", "lp-gp-c", "treeenergy"])
def test_sparse_right_segmentation_beats_shifted_one(name):
    image, _, obj = _disc_scene()
    labels = torch.full((1, 32, 32), 255, dtype=torch.long)
    labels[0, 15, 12:20] = 1  # a scribble on the disc
    labels[0, 2, 2:30] = 0  # and one on the background
    truth = obj[:, 0].long()
    wrong = torch.zeros_like(truth)
    wrong[:, :, :16] = truth[:, :, :16]  # only the left half of the disc
    wrong[:, :, 16:22] = 1  # and a band of background
    to_logits = lambda seg: torch.stack([(seg == 0).float(), (seg == 1).float()], 1) * 8.0 - 4.0  # noqa: E731
    assert float(sparse_loss(name, to_logits(truth), labels, image)) < float(sparse_loss(name, to_logits(wrong), labels, image))


# --------------------------------------------------------------------------- empty boxes, sharing, wrappers


@pytest.mark.parametrize("name", sorted(BOX_MASK_LOSSES))
def test_empty_box_instance_contributes_nothing(name):
    logits, box, image = random_box_batch(seed=7)
    box[1] = 0
    keep = [0, 2]
    with_empty, terms = box_mask_loss(name, logits, box, image, return_terms=True)
    without = box_mask_loss(name, logits[keep], box[keep], image[keep])
    assert torch.isfinite(with_empty)
    torch.testing.assert_close(with_empty, without)
    assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"), rel=1e-6)
    everything_empty = box_mask_loss(name, logits, torch.zeros_like(box), image)
    assert float(everything_empty.detach()) == 0.0
    everything_empty.backward()
    assert float(logits.grad.abs().sum()) == 0.0


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(sorted(BOX_MASK_LOSSES)), seed=st.integers(0, 1000))
def test_box_losses_do_not_depend_on_instance_order(name, seed):
    logits, box, image = random_box_batch(seed=seed)
    logits = logits.detach()
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(
        box_mask_loss(name, logits, box, image), box_mask_loss(name, logits[order], box[order], image[order])
    )


def test_shared_tree_gives_the_same_loss_as_building_it():
    logits, box, image = random_box_batch(seed=8)
    per_image = image[[0, 2]]
    index = torch.tensor([0, 0, 1])
    tree = minimum_spanning_tree(tree_guide("apro", per_image)).select(index)
    torch.testing.assert_close(box_mask_loss("apro", logits, box, image, tree=tree), box_mask_loss("apro", logits, box, image))
    raw = minimum_spanning_tree(tree_guide("treefilter", per_image)).select(index)
    torch.testing.assert_close(
        box_mask_loss("treefilter", logits, box, image, tree=raw), box_mask_loss("treefilter", logits, box, image)
    )
    # A normalised-image tree given to the raw-image tree filter is caught, not silently used.
    with pytest.raises(ValueError, match="raw RGB"):
        box_mask_loss("treefilter", logits, box, image, tree=tree)
    with pytest.raises(ValueError, match="ImageNet-normalised"):
        box_mask_loss("apro", logits, box, image, tree=raw)
    with pytest.raises(ValueError, match="tree holds 2 trees"):
        box_mask_loss("apro", logits, box, image, tree=minimum_spanning_tree(tree_guide("apro", per_image)))


def test_sparse_losses_accept_prebuilt_trees():
    logits, labels, image = random_sparse_batch(seed=14)
    logits = logits.detach()
    for name in ("treeenergy", "apro", "lp-gp-c"):
        tree = minimum_spanning_tree(tree_guide(name, image))
        torch.testing.assert_close(sparse_loss(name, logits, labels, image, tree=tree), sparse_loss(name, logits, labels, image))
    torch.testing.assert_close(tree_guide("treeenergy", image), image)
    torch.testing.assert_close(tree_guide("apro", image), imagenet_normalize(image))


def test_modules_match_functions():
    logits, box, image = random_box_batch(seed=9)
    image = 0.5 + 0.05 * (image - 0.5)
    pairs = [
        (BoxProjectionLoss()(logits, box), box_projection_loss(logits, box)),
        (APRoBoxLoss(variant="lp-gp-c")(logits, box, image), apro_box_loss(logits, box, image, variant="lp-gp-c")),
        (PairwiseLoss()(logits, box, image), pairwise_loss(logits, box, image)),
        (TreeFilterBoxLoss()(logits, box, image), tree_filter_box_loss(logits, box, image)),
        (TreeFilterLocalBoxLoss()(logits, box, image), tree_filter_local_box_loss(logits, box, image)),
        (CRFLoss(iterations=10)(logits, box, image), crf_loss(logits, box, image, iterations=10)),
        (BoxMaskLoss("crf")(logits, box, image), BOX_MASK_LOSSES["crf"](logits, box, image)),
    ]
    slogits, labels, simage = random_sparse_batch(seed=9)
    pairs += [
        (PartialCrossEntropy()(slogits, labels), partial_cross_entropy(slogits, labels)),
        (APRoSparseLoss(variant="gp")(slogits, labels, simage), apro_sparse_loss(slogits, labels, simage, variant="gp")),
        (TreeEnergyLoss()(slogits, labels, simage), tree_energy_loss(slogits, labels, simage)),
        (SparseLoss("apro")(slogits, labels, simage), SPARSE_LOSSES["apro"](slogits, labels, simage)),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b)


def test_registry_totals_are_projection_plus_terms():
    logits, box, image = random_box_batch(seed=10)
    proj = 3.0 * box_projection_loss(logits, box)
    torch.testing.assert_close(BOX_MASK_LOSSES["apro"](logits, box, image), proj + apro_box_loss(logits, box, image))
    torch.testing.assert_close(BOX_MASK_LOSSES["pairwise"](logits, box, image), proj + pairwise_loss(logits, box, image))
    torch.testing.assert_close(
        BOX_MASK_LOSSES["crf"](logits, box, image), proj + crf_loss(logits, box, image, weight=0.375)
    )
    slogits, labels, simage = random_sparse_batch(seed=10)
    torch.testing.assert_close(
        SPARSE_LOSSES["treeenergy"](slogits, labels, simage),
        partial_cross_entropy(slogits, labels) + tree_energy_loss(slogits, labels, simage),
    )


def test_float32_in_float32_out_and_all_labeled_is_zero_term():
    logits, box, image = random_box_batch(seed=11)
    out = box_mask_loss("apro", logits.detach().float(), box.float(), image.float())
    assert out.dtype == torch.float32
    slogits, labels, simage = random_sparse_batch(seed=11)
    full = torch.zeros_like(labels)
    assert float(apro_sparse_loss(slogits.detach(), full, simage)) == 0.0
    assert float(tree_energy_loss(slogits.detach(), full, simage)) == 0.0
    assert float(partial_cross_entropy(slogits.detach(), torch.full_like(labels, 255))) == 0.0


# --------------------------------------------------------------------------- bad input


def _box_case(**change):
    logits, box, image = random_box_batch(seed=12)
    args = dict(logits=logits.detach(), box_mask=box, image=image)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(logits=torch.zeros(3, 2, 12, 14)), ValueError, "logits"),
        (dict(logits=torch.zeros(3, 12, 14)), ValueError, "logits"),
        (dict(logits=torch.zeros(3, 1, 12, 14, dtype=torch.long)), TypeError, "logits"),
        (dict(logits=torch.full((3, 1, 12, 14), float("nan"))), ValueError, "logits"),
        (dict(box_mask=torch.ones(3, 1, 12, 13)), ValueError, "box_mask"),
        (dict(box_mask=torch.ones(2, 1, 12, 14)), ValueError, "box_mask"),
        (dict(box_mask=torch.full((3, 1, 12, 14), 2.0)), ValueError, "box_mask"),
        (dict(box_mask=torch.ones(3, 1, 12, 14, dtype=torch.bool)), TypeError, "box_mask"),
        (dict(image=torch.rand(3, 1, 12, 14)), ValueError, "image"),
        (dict(image=torch.rand(3, 3, 10, 14)), ValueError, "image"),
        (dict(image=torch.rand(3, 3, 12, 14) * 255), ValueError, "image"),
        (dict(image=torch.full((3, 3, 12, 14), float("nan"))), ValueError, "image"),
    ],
)
@pytest.mark.parametrize("name", ["apro", "pairwise", "crf", "treefilter"])
def test_bad_box_input_is_rejected_naming_the_argument(change, error, match, name):
    args = _box_case(**change)
    with pytest.raises(error, match=match):
        box_mask_loss(name, args["logits"], args["box_mask"], args["image"])


@pytest.mark.parametrize(
    "labels,error,match",
    [
        (torch.zeros(2, 10, 12), TypeError, "labels"),
        (torch.zeros(2, 10, 11, dtype=torch.long), ValueError, "labels"),
        (torch.zeros(10, 12, dtype=torch.long), ValueError, "labels"),
        (torch.full((2, 10, 12), 3, dtype=torch.long), ValueError, "class indices"),
        (torch.full((2, 10, 12), -1, dtype=torch.long), ValueError, "class indices"),
    ],
)
@pytest.mark.parametrize("name", ["apro", "treeenergy", "pce"])
def test_bad_sparse_labels_are_rejected(labels, error, match, name):
    logits, _, image = random_sparse_batch()
    with pytest.raises(error, match=match):
        sparse_loss(name, logits.detach(), labels, image)


def test_bad_names_variants_and_settings_are_rejected():
    logits, box, image = random_box_batch()
    with pytest.raises(ValueError, match="unknown box mask loss"):
        box_mask_loss("boxinst", logits, box, image)
    with pytest.raises(ValueError, match="unknown sparse loss"):
        sparse_loss("crf-dense", *random_sparse_batch()[:3])
    with pytest.raises(ValueError, match="variant"):
        apro_box_loss(logits, box, image, variant="gp-lp")
    with pytest.raises(ValueError, match="zeta_gl"):
        apro_box_loss(logits, box, image, zeta_gl=0)
    with pytest.raises(ValueError, match="global_weight"):
        apro_box_loss(logits, box, image, global_weight=-1)
    with pytest.raises(ValueError, match="sigma"):
        tree_filter_box_loss(logits, box, image, sigma=-0.1)
    with pytest.raises(TypeError, match="tree"):
        apro_box_loss(logits, box, image, tree="not a tree")
    with pytest.raises(ValueError, match="unknown loss"):
        tree_guide("nope", image)
    with pytest.raises(TypeError, match="ignore_index"):
        partial_cross_entropy(*random_sparse_batch()[:2], ignore_index=255.0)


def test_package_exports_contract_names():
    import apro.losses as losses

    for name in [
        "box_projection_loss", "apro_box_loss", "pairwise_loss", "tree_filter_box_loss", "tree_filter_local_box_loss",
        "crf_loss", "BOX_MASK_LOSSES", "box_mask_loss", "partial_cross_entropy", "apro_sparse_loss",
        "tree_energy_loss", "SPARSE_LOSSES", "BoxProjectionLoss", "APRoBoxLoss", "PairwiseLoss", "TreeFilterBoxLoss",
        "CRFLoss", "PartialCrossEntropy", "APRoSparseLoss", "TreeEnergyLoss",
    ]:
        assert hasattr(losses, name), name
    assert set(BOX_MASK_LOSSES) == {
        "projection", "pairwise", "treefilter", "treefilter-local", "crf", "gp", "lp", "apro", "gp-lp-c", "lp-gp-c"
    }
    assert {"pce", "treeenergy", "gp", "lp", "apro", "gp-lp-c", "lp-gp-c"} <= set(SPARSE_LOSSES)
    assert apro.losses is losses


def _padded(x: torch.Tensor, size, fill: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, h, w)`` at the top left of ``fill`` ``(B, C, H, W)`` (the rest keeps ``fill``)."""
    out = fill.clone()
    out[..., :x.shape[-2], :x.shape[-1]] = x
    return out


@pytest.mark.parametrize("name", ["apro", "apro-cascade", "apro-features", "treeenergy", "treeenergy-features"])
def test_sparse_losses_leave_out_padding_exactly(name):
    """With ``valid``, a crop padded with arbitrary values scores exactly as the unpadded crop,
    gradient included (padding is neither in the loss nor a neighbour through trees or windows)."""
    g = torch.Generator().manual_seed(31)
    b, k, h, w, size = 2, 4, 9, 11, (14, 16)
    image = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    image[:, :, :, 6:] = 0.5 * image[:, :, :, 6:] + 0.1  # some structure for the trees
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64)
    labels = torch.full((b, h, w), 255)
    labels[:, 1, 1], labels[:, 7, 9], labels[0, 4, 5] = 0, 2, 3
    feats = torch.randn(b, 5, h, w, generator=g, dtype=torch.float64)
    p_image = _padded(image, size, torch.rand(b, 3, *size, generator=g, dtype=torch.float64))
    p_logits = _padded(logits, size, 3 * torch.randn(b, k, *size, generator=g, dtype=torch.float64))
    p_labels = _padded(labels[:, None], size, torch.full((b, 1) + size, 255))[:, 0]
    p_feats = _padded(feats, size, 4 * torch.randn(b, 5, *size, generator=g, dtype=torch.float64))
    valid = torch.zeros((b,) + size, dtype=torch.bool)
    valid[:, :h, :w] = True

    def loss(lg, lab, img, f, v):
        if name.startswith("apro"):
            return apro_sparse_loss(lg, lab, img, variant="gp-lp-c" if name == "apro-cascade" else "gp-lp-p",
                                    zeta_g=0.2, zeta_gh=0.2, iterations=6, valid=v,
                                    features=f if name == "apro-features" else None, zeta_f=3.0)
        return tree_energy_loss(lg, lab, img, valid=v, features=f if name == "treeenergy-features" else None)

    logits.requires_grad_(True)
    p_logits.requires_grad_(True)
    ref = loss(logits, labels, image, feats, None)
    cut = loss(p_logits, p_labels, p_image, p_feats, valid)
    torch.testing.assert_close(cut, ref, rtol=1e-9, atol=1e-12)
    ref.backward()
    cut.backward()
    torch.testing.assert_close(p_logits.grad[..., :h, :w], logits.grad, rtol=1e-7, atol=1e-12)
    assert float(p_logits.grad[..., h:, :].abs().max()) == 0.0 and float(p_logits.grad[..., :, w:].abs().max()) == 0.0
    # without ``valid`` the padding counts as unlabeled image and the loss differs
    assert abs(float(loss(p_logits.detach(), p_labels, p_image, p_feats, None)) - float(ref.detach())) > 1e-4


def test_sparse_losses_refuse_a_bad_valid_mask():
    logits, labels, image = random_sparse_batch(seed=3)
    with pytest.raises(TypeError, match="valid must be None or a bool tensor"):
        apro_sparse_loss(logits, labels, image, valid=torch.ones_like(labels))
    with pytest.raises(ValueError, match="valid has shape"):
        tree_energy_loss(logits, labels, image, valid=torch.ones(labels.shape[0], 3, 3, dtype=torch.bool))
    everywhere = torch.ones_like(labels, dtype=torch.bool)
    torch.testing.assert_close(apro_sparse_loss(logits, labels, image, valid=everywhere),
                               apro_sparse_loss(logits, labels, image))
    torch.testing.assert_close(TreeEnergyLoss()(logits, labels, image, valid=everywhere), tree_energy_loss(logits, labels, image))


@pytest.mark.parametrize("name", sorted(SPARSE_LOSSES))
def test_sparse_loss_registry_leaves_out_padding(name):
    """``sparse_loss(name, ..., valid=)`` and ``SparseLoss(name)(..., valid=)`` score a padded
    crop exactly as the unpadded one, for every registered sparse loss."""
    g = torch.Generator().manual_seed(5)
    b, k, h, w, size = 2, 3, 8, 10, (12, 13)
    image = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64)
    labels = torch.full((b, h, w), 255)
    labels[:, 2, 2], labels[:, 6, 8] = 0, 2
    p_image = _padded(image, size, torch.rand(b, 3, *size, generator=g, dtype=torch.float64))
    p_logits = _padded(logits, size, 3 * torch.randn(b, k, *size, generator=g, dtype=torch.float64))
    p_labels = _padded(labels[:, None], size, torch.full((b, 1) + size, 255))[:, 0]
    valid = torch.zeros((b,) + size, dtype=torch.bool)
    valid[:, :h, :w] = True
    ref = sparse_loss(name, logits, labels, image)
    torch.testing.assert_close(sparse_loss(name, p_logits, p_labels, p_image, valid=valid), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(SparseLoss(name)(p_logits, p_labels, p_image, valid=valid), ref, rtol=1e-9, atol=1e-12)
    if name != "pce":  # the pairwise terms read the padding unless told
        assert abs(float(sparse_loss(name, p_logits, p_labels, p_image)) - float(ref)) > 1e-6
    with pytest.raises(TypeError, match="valid must be None or a bool tensor"):
        sparse_loss(name, p_logits, p_labels, p_image, valid=valid.long())
