"""Hungarian matcher against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdetr.model.matcher import HungarianMatcher


def _random_case(seed: int, queries: int, targets: int, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, queries, classes + 1, generator=g)
    boxes = torch.rand(1, queries, 2, generator=g) * 0.6 + 0.2
    boxes = torch.cat([boxes, torch.rand(1, queries, 2, generator=g) * 0.3 + 0.05], -1)
    t_boxes = torch.cat(
        [torch.rand(targets, 2, generator=g) * 0.6 + 0.2, torch.rand(targets, 2, generator=g) * 0.3 + 0.05], -1
    )
    target = {"labels": torch.randint(0, classes, (targets,), generator=g), "boxes": t_boxes}
    return {"pred_logits": logits, "pred_boxes": boxes}, [target]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 4))
def test_matches_brute_force_minimum(seed: int, queries: int, targets: int) -> None:
    outputs, tgts = _random_case(seed, queries, targets)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_boxes"][0], tgts[0])
    rows, cols = matcher(outputs, tgts)[0]
    assert len(rows) == min(queries, targets)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    found = cost[rows, cols].sum().item()
    if queries >= targets:
        best = min(
            sum(cost[q, t].item() for t, q in enumerate(p)) for p in itertools.permutations(range(queries), targets)
        )
    else:
        best = min(
            sum(cost[q, t].item() for q, t in enumerate(p)) for p in itertools.permutations(range(targets), queries)
        )
    assert abs(found - best) < 1e-4


def test_empty_targets_give_empty_matches() -> None:
    outputs, _ = _random_case(0, 4, 1)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    rows, cols = HungarianMatcher()(outputs, [empty])[0]
    assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64


def test_obvious_assignment() -> None:
    """Two queries sitting exactly on two targets (in swapped order) are matched crosswise."""
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": boxes}
    target = {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}
    rows, cols = HungarianMatcher()(outputs, [target])[0]
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 8), st.lists(st.integers(0, 4), min_size=1, max_size=4)
)
def test_batched_costs_equal_per_image_costs_bit_for_bit(
    seed: int, batch: int, queries: int, counts: list[int]
) -> None:
    """The batch's one cost matrix, cut into images, is what each image alone gives, and so are the
    matches (the quickstart's training runs are unchanged by the batched matcher)."""
    counts = (counts * batch)[:batch]
    cases = [_random_case(seed + i, queries, count) for i, count in enumerate(counts)]
    outputs = {key: torch.cat([case[0][key] for case in cases]) for key in ("pred_logits", "pred_boxes")}
    targets = [case[1][0] for case in cases]
    matcher = HungarianMatcher()
    every = {key: torch.cat([t[key] for t in targets]) for key in ("labels", "boxes")}
    if sum(counts):
        batched = matcher.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1), every)
        columns = batched.view(batch, queries, -1).split(counts, dim=-1)  # per image [B, Q, N_i]
        for i, block in enumerate(columns):
            alone = matcher.cost_matrix(outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i])
            assert torch.equal(block[i], alone)
    matches = matcher(outputs, targets)
    for i, (rows, cols) in enumerate(matches):
        one = {key: value[i : i + 1] for key, value in outputs.items()}
        alone_rows, alone_cols = matcher(one, [targets[i]])[0]
        assert torch.equal(rows, alone_rows) and torch.equal(cols, alone_cols)
        assert len(rows) == min(queries, counts[i])


def test_a_target_list_of_another_length_is_refused() -> None:
    outputs, targets = _random_case(0, 3, 2)
    with pytest.raises(ValueError, match="1 images of predictions but 2 targets"):
        HungarianMatcher()(outputs, targets * 2)
