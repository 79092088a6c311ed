"""Dense encoder targets and losses, on grids small enough to check by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sdetr.model.encoder_loss import IGNORE, cell_targets, encoder_losses

NONE = 4  # num_classes in these tests: labels 0..3, 4 = no object


def _target(labels: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels), "boxes": torch.tensor(boxes).reshape(-1, 4)}


def test_cells_whose_centre_is_inside_a_box_take_its_class_and_box() -> None:
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    # right half of the image: x in [0.5, 1]; cell centres x = 1/8, 3/8, 5/8, 7/8
    labels, boxes = cell_targets(mask, [_target([2], [[0.75, 0.5, 0.5, 1.0]])], NONE)
    assert labels.tolist() == [[[4, 4, 2, 2], [4, 4, 2, 2]]]
    assert torch.equal(boxes[0, :, 2:], torch.tensor([0.75, 0.5, 0.5, 1.0]).expand(2, 2, 4))
    assert torch.equal(boxes[0, :, :2], torch.zeros(2, 2, 4))


def test_an_object_smaller_than_a_cell_gets_the_cell_holding_its_centre() -> None:
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    labels, _ = cell_targets(mask, [_target([3], [[0.6, 0.9, 0.04, 0.04]])], NONE)
    # centre (0.6, 0.9) -> row int(0.9 * 2) = 1, column int(0.6 * 4) = 2
    expected = torch.full((1, 2, 4), NONE)
    expected[0, 1, 2] = 3
    assert torch.equal(labels, expected)


def test_the_smallest_covering_object_wins() -> None:
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    target = _target([1, 0], [[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]])  # whole image, top-left quarter
    labels, boxes = cell_targets(mask, [target], NONE)
    assert labels.tolist() == [[[0, 1], [1, 1]]]
    assert boxes[0, 0, 0].tolist() == [0.25, 0.25, 0.5, 0.5]


def test_padded_cells_are_ignored_and_boxes_are_relative_to_the_unpadded_region() -> None:
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # 3 valid columns: centres x = 1/6, 3/6, 5/6
    labels, _ = cell_targets(mask, [_target([2], [[0.75, 0.5, 0.5, 1.0]])], NONE)
    assert labels.tolist() == [[[4, 2, 2, IGNORE], [4, 2, 2, IGNORE]]]


def test_an_image_without_objects_is_all_background() -> None:
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[1, 2, :] = True
    labels, boxes = cell_targets(mask, [_target([], []), _target([], [])], NONE)
    assert (labels[0] == NONE).all() and (labels[1, :2] == NONE).all() and (labels[1, 2] == IGNORE).all()
    assert not boxes.any()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    cx=st.floats(0.05, 0.95),
    cy=st.floats(0.05, 0.95),
    w=st.floats(0.01, 0.9),
    h=st.floats(0.01, 0.9),
)
def test_one_object_owns_its_centre_cell_and_only_cells_it_covers(
    rows: int, cols: int, cx: float, cy: float, w: float, h: float
) -> None:
    mask = torch.zeros(1, rows, cols, dtype=torch.bool)
    labels, _ = cell_targets(mask, [_target([1], [[cx, cy, w, h]])], NONE)
    assert labels[0, int(cy * rows), int(cx * cols)] == 1
    for r, c in (labels[0] == 1).nonzero().tolist():
        y, x = (r + 0.5) / rows, (c + 0.5) / cols
        inside = abs(y - cy) <= h / 2 + 1e-6 and abs(x - cx) <= w / 2 + 1e-6
        assert inside or (r, c) == (int(cy * rows), int(cx * cols))


def test_losses_compared_with_a_hand_computation() -> None:
    torch.manual_seed(0)
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[:, :, 3] = True
    target = [_target([2], [[0.75, 0.5, 0.5, 1.0]])]  # cells (r, 1) and (r, 2) -> class 2
    logits = torch.randn(1, 2, 4, NONE + 1)
    pred_boxes = torch.full((1, 2, 4, 4), 0.5)
    pred_boxes[0, :, 1:3] = torch.tensor([0.75, 0.5, 0.5, 1.0])  # exact on the covered cells
    weight = torch.ones(NONE + 1)
    weight[NONE] = 0.1
    losses = encoder_losses({"pred_logits": logits, "pred_boxes": pred_boxes, "mask": mask}, target, NONE, weight)

    valid_logits = logits[0, :, :3].reshape(-1, NONE + 1)  # 6 unpadded cells, row-major
    wanted = torch.tensor([NONE, 2, 2, NONE, 2, 2])
    log_p = F.log_softmax(valid_logits, -1)[torch.arange(6), wanted]
    w = weight[wanted]
    assert losses["loss_ce"].item() == pytest.approx(float(-(w * log_p).sum() / w.sum()), abs=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)

    pred_boxes[0, 0, 1, 2] = 0.3  # one covered cell's width off by 0.2; 4 covered cells
    losses = encoder_losses({"pred_logits": logits, "pred_boxes": pred_boxes, "mask": mask}, target, NONE, weight)
    assert losses["loss_bbox"].item() == pytest.approx(0.2 / 4, abs=1e-6)


def _cells_one_image(rows: int, cols: int, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of :func:`cell_targets` for one unpadded ``rows x cols`` grid, cell by cell in
    Python, in float32 as the batch computes it: a cell goes to the smallest object (the first of
    equal areas) among those covering its centre and the one whose centre it holds."""
    labels = torch.full((rows, cols), NONE, dtype=torch.int64)
    boxes = torch.zeros(rows, cols, 4)
    areas = [float(w * h) for _, _, w, h in target["boxes"]]  # float32 products
    for r in range(rows):
        for c in range(cols):
            y = torch.tensor(r + 0.5) / rows  # float32
            x = torch.tensor(c + 0.5) / cols
            best = None
            for i, (cx, cy, w, h) in enumerate(target["boxes"]):
                x0, y0, x1, y1 = cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h
                centre = (max(0, min(int(cy * rows), rows - 1)), max(0, min(int(cx * cols), cols - 1)))
                inside = bool(y0 <= y <= y1 and x0 <= x <= x1) or centre == (r, c)
                if inside and (best is None or areas[i] < areas[best]):
                    best = i
            if best is not None:
                labels[r, c] = int(target["labels"][best])
                boxes[r, c] = target["boxes"][best]
    return labels, boxes


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
)
def test_the_batch_equals_each_image_computed_alone(data: st.DataObject, batch: int, height: int, width: int) -> None:
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for b in range(batch):
        rows, cols = data.draw(st.integers(1, height)), data.draw(st.integers(1, width))
        mask[b, rows:] = True
        mask[b, :, cols:] = True
        count = data.draw(st.integers(0, 3))
        centre, side = st.floats(-0.5, 1.5, width=32), st.floats(0.0, 1.0, width=32)  # centres outside too
        cxcywh = [[data.draw(centre), data.draw(centre), data.draw(side), data.draw(side)] for _ in range(count)]
        classes = [data.draw(st.integers(0, NONE - 1)) for _ in range(count)]
        targets.append(
            {"labels": torch.tensor(classes, dtype=torch.int32), "boxes": torch.tensor(cxcywh).reshape(-1, 4)}
        )
    labels, boxes = cell_targets(mask, targets, NONE)
    assert labels.dtype == torch.int64
    for b, target in enumerate(targets):
        rows, cols = int((~mask[b]).any(1).sum()), int((~mask[b]).any(0).sum())
        expected_labels, expected_boxes = _cells_one_image(rows, cols, target)
        assert torch.equal(labels[b, :rows, :cols], expected_labels)
        assert torch.equal(boxes[b, :rows, :cols], expected_boxes)
        assert (labels[b, rows:] == IGNORE).all() and (labels[b, :, cols:] == IGNORE).all()
        assert not boxes[b, rows:].any() and not boxes[b, :, cols:].any()


def test_targets_that_do_not_fit_the_mask_are_refused_with_the_fix() -> None:
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    one = _target([1], [[0.5, 0.5, 0.2, 0.2]])
    with pytest.raises(ValueError, match="1 targets for a mask of 2 images; give one per image"):
        cell_targets(mask, [one], NONE)
    two_boxes = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}
    with pytest.raises(ValueError, match="target 1 has 2 boxes and 1 labels; give one label per box"):
        cell_targets(mask, [one, two_boxes], NONE)
