"""Hungarian matching of queries to boxes (apro/modeling/matcher.py) against brute force."""
from __future__ import annotations

import itertools

import pytest
import torch

from apro.losses import box_projection_loss
from apro.modeling.matcher import (
    HungarianMatcher,
    classification_cost,
    hungarian_assignment,
    projection_cost,
)


def _brute_force(cost: torch.Tensor) -> float:
    """Smallest total cost of a one-to-one assignment of min(Q, K) pairs, by enumeration."""
    q, k = cost.shape
    if q >= k:
        return min(sum(float(cost[r, c]) for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), k))
    return min(sum(float(cost[r, c]) for r, c in enumerate(cols)) for cols in itertools.permutations(range(k), q))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 3), (6, 2), (2, 5), (4, 4), (7, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assignment_is_the_brute_force_optimum(shape, seed):
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 10 - 3
    rows, cols = hungarian_assignment(cost)
    n = min(shape)
    assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == n
    assert len(set(rows.tolist())) == n and len(set(cols.tolist())) == n  # one-to-one
    assert rows.tolist() == sorted(rows.tolist())
    assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost), abs=1e-5)


def test_assignment_with_ties_and_integers_reaches_the_optimum():
    cost = torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [0.0, 5.0, 5.0], [3.0, 0.0, 3.0]])
    rows, cols = hungarian_assignment(cost)
    assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost))


def test_assignment_edge_cases_and_bad_input():
    rows, cols = hungarian_assignment(torch.zeros(4, 0))
    assert rows.numel() == 0 and cols.numel() == 0
    with pytest.raises(ValueError, match="cost must be a"):
        hungarian_assignment(torch.zeros(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        hungarian_assignment(torch.tensor([[0.0, float("nan")]]))


def test_projection_cost_is_the_projection_loss_of_each_pair():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, 10, generator=g) * 3
    boxes = torch.zeros(3, 12, 10)
    boxes[0, 2:7, 1:5] = 1
    boxes[1, 5:12, 4:10] = 1
    boxes[2, 0:3, 0:10] = 1
    cost = projection_cost(logits, boxes)
    assert cost.shape == (4, 3)
    for q in range(4):
        for k in range(3):
            expected = box_projection_loss(logits[q:q + 1, None], boxes[k:k + 1, None])
            assert float(cost[q, k]) == pytest.approx(float(expected), abs=1e-5)


def test_classification_cost_is_minus_the_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    cost = classification_cost(logits, torch.tensor([1, 0, 1]))
    p = logits.softmax(-1)
    torch.testing.assert_close(cost, -p[:, [1, 0, 1]])


def test_matcher_matches_each_box_to_the_query_that_fits_it():
    """Queries 3 and 1 predict exactly the two boxes (query 0 a wrong box, 2 nothing): the
    matcher must pick them, per image, and give images without boxes no match."""
    h = w = 16
    boxes = torch.zeros(2, h, w)
    boxes[0, 2:8, 3:9] = 1
    boxes[1, 9:15, 8:15] = 1
    wrong = torch.zeros(h, w)
    wrong[0:4, 0:16] = 1
    mask_logits = torch.stack([wrong, boxes[1], torch.zeros(h, w), boxes[0]]) * 16 - 8  # (Q=4, h, w)
    class_logits = torch.zeros(4, 3)  # uninformative classes: the mask cost decides
    matcher = HungarianMatcher()
    out = matcher(torch.stack([class_logits, class_logits]), torch.stack([mask_logits, mask_logits]),
                  [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.int64)], [boxes, boxes[:0]])
    (query, obj), (q2, o2) = out
    assert dict(zip(obj.tolist(), query.tolist())) == {0: 3, 1: 1}
    assert q2.numel() == 0 and o2.numel() == 0
    # the class cost alone moves the match when the masks are uninformative
    flat = torch.zeros(4, h, w)
    cls = torch.full((4, 3), -5.0)
    cls[2, 1] = 5.0
    (query, obj), = matcher(cls[None], flat[None], [torch.tensor([1])], [boxes[:1]])
    assert query.tolist() == [2] and obj.tolist() == [0]


def test_matcher_rejects_mismatched_inputs():
    matcher = HungarianMatcher()
    with pytest.raises(ValueError, match="must agree"):
        matcher(torch.zeros(1, 4, 3), torch.zeros(1, 5, 8, 8), [torch.tensor([0])], [torch.zeros(1, 8, 8)])
    with pytest.raises(ValueError, match="one entry per image"):
        matcher(torch.zeros(2, 4, 3), torch.zeros(2, 4, 8, 8), [torch.tensor([0])], [torch.zeros(1, 8, 8)])
    with pytest.raises(ValueError, match="share the grid"):
        projection_cost(torch.zeros(2, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ValueError, match=">= 0"):
        HungarianMatcher(class_weight=-1.0)
