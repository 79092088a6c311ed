"""Box conversions and GIoU: property tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdetr.model.boxes import cxcywh_to_xyxy, pairwise_giou, xyxy_to_cxcywh

coord = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)
size = st.floats(min_value=0.0009765625, max_value=1.0, allow_nan=False, width=32)
box = st.tuples(coord, coord, size, size)


@settings(max_examples=200, deadline=None)
@given(st.lists(box, min_size=1, max_size=8))
def test_cxcywh_round_trip(boxes: list[tuple[float, float, float, float]]) -> None:
    b = torch.tensor(boxes)
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b, atol=1e-6, rtol=0)
    xyxy = cxcywh_to_xyxy(b)
    torch.testing.assert_close(xyxy[:, 2] - xyxy[:, 0], b[:, 2], atol=1e-6, rtol=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(box, min_size=1, max_size=6), st.lists(box, min_size=1, max_size=6))
def test_giou_range_symmetry_and_self(a: list, b: list) -> None:
    xa, xb = cxcywh_to_xyxy(torch.tensor(a)), cxcywh_to_xyxy(torch.tensor(b))
    g = pairwise_giou(xa, xb)
    assert g.shape == (len(a), len(b))
    assert torch.all(g <= 1 + 1e-6) and torch.all(g >= -1 - 1e-6)
    torch.testing.assert_close(g, pairwise_giou(xb, xa).T)
    torch.testing.assert_close(pairwise_giou(xa, xa).diagonal(), torch.ones(len(a)), atol=1e-5, rtol=0)


def test_giou_hand_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0]])
    # overlap: IoU 1/7, hull 9 -> 1/7 - (9 - 7)/9 ; disjoint: IoU 0, hull 8, union 5 -> -3/8
    torch.testing.assert_close(pairwise_giou(a, b), torch.tensor([[1 / 7 - 2 / 9, -3 / 8]]))


def test_degenerate_boxes_are_rejected() -> None:
    with pytest.raises(ValueError, match="x1 < x0"):
        pairwise_giou(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
