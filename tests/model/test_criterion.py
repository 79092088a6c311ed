"""Set criterion on a tiny case computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sdetr.model.criterion import SetCriterion


def _tiny_outputs() -> dict:
    # one class (+ no-object); q0 predicts the object, q1 predicts no-object
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])
    return {"pred_logits": logits, "pred_boxes": boxes}


TARGET = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}]


def test_hand_checked_losses() -> None:
    losses = SetCriterion(num_classes=1)(_tiny_outputs(), TARGET)
    ce_q0 = math.log(1 + math.exp(-1))  # target class 0 with logits (1, 0)
    ce_q1 = math.log(1 + math.exp(-2))  # no-object with logits (0, 2), weight 0.1
    expected_ce = (ce_q0 + 0.1 * ce_q1) / 1.1
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, abs=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.2, abs=1e-6)  # |0.2 - 0.4| on w
    # xyxy (0.4,0.4,0.6,0.6) vs (0.3,0.4,0.7,0.6): IoU 0.5, hull = union -> GIoU 0.5
    assert losses["loss_giou"].item() == pytest.approx(0.5, abs=1e-6)
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error"].item() == 0.0
    assert losses["total"].item() == pytest.approx(expected_ce + 5 * 0.2 + 2 * 0.5, abs=1e-5)


def test_aux_outputs_are_supervised_with_suffixes() -> None:
    outputs = _tiny_outputs()
    outputs["aux_outputs"] = [_tiny_outputs(), _tiny_outputs()]
    losses = SetCriterion(num_classes=1)(outputs, TARGET)
    assert {"loss_ce_0", "loss_bbox_1", "loss_giou_1"} <= set(losses)
    single = SetCriterion(num_classes=1)(_tiny_outputs(), TARGET)["total"]
    torch.testing.assert_close(losses["total"], 3 * single)


def test_empty_targets_only_push_towards_no_object() -> None:
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(num_classes=1)(_tiny_outputs(), empty)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    expected_ce = (math.log(1 + math.exp(1)) * 0.1 + math.log(1 + math.exp(-2)) * 0.1) / 0.2
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, abs=1e-6)
    assert losses["cardinality_error"].item() == 1.0


def test_gradients_flow_to_boxes_and_logits() -> None:
    outputs = _tiny_outputs()
    outputs["pred_logits"].requires_grad_(True)
    outputs["pred_boxes"].requires_grad_(True)
    SetCriterion(num_classes=1)(outputs, TARGET)["total"].backward()
    assert outputs["pred_boxes"].grad is not None and outputs["pred_boxes"].grad[0, 0].abs().sum() > 0
    assert outputs["pred_boxes"].grad[0, 1].abs().sum() == 0  # unmatched query: no box loss


def _dense_output() -> dict:
    mask = torch.zeros(1, 1, 2, dtype=torch.bool)  # 1x2 grid; the target covers the left cell's centre
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]]])  # [1, 1, 2, C + 1]
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]]]])
    return {"pred_logits": logits, "pred_boxes": boxes, "mask": mask}


def test_encoder_losses_are_added_with_their_weight() -> None:
    from sdetr.model.criterion import CriterionConfig

    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.25, 0.5, 0.4, 0.2]])}]
    outputs = _tiny_outputs()
    base = SetCriterion(num_classes=1)(outputs, target)
    assert not any("_enc" in key for key in base)
    outputs["encoder_outputs"] = [_dense_output(), _dense_output()]
    losses = SetCriterion(1, CriterionConfig(encoder_weight=2.0))(outputs, target)
    # left cell: class 0 with logits (2, 0); right cell: no-object (weight 0.1) with logits (0, 1)
    ce = (math.log(1 + math.exp(-2)) + 0.1 * math.log(1 + math.exp(-1))) / 1.1
    l1 = abs(0.5 - 0.25) + abs(0.2 - 0.4)  # the left cell's box against (0.25, 0.5, 0.4, 0.2)
    for stage in (1, 2):
        assert losses[f"loss_ce_enc{stage}"].item() == pytest.approx(ce, abs=1e-6)
        assert losses[f"loss_bbox_enc{stage}"].item() == pytest.approx(l1, abs=1e-6)
    giou = losses["loss_giou_enc1"].item()
    dense_total = 2 * 2.0 * (ce + 5 * l1 + 2 * giou)  # two stages, encoder_weight 2
    assert losses["total"].item() == pytest.approx(base["total"].item() + dense_total, abs=1e-5)


def test_encoder_weight_without_dense_outputs_is_a_clear_error() -> None:
    from sdetr.model.criterion import CriterionConfig

    with pytest.raises(ValueError, match="encoder_outputs=True"):
        SetCriterion(1, CriterionConfig(encoder_weight=1.0))(_tiny_outputs(), TARGET)


def test_one_to_many_matches_each_object_to_several_queries_by_hand() -> None:
    from sdetr.model.criterion import CriterionConfig

    losses = SetCriterion(num_classes=1, config=CriterionConfig(one_to_many=2))(_tiny_outputs(), TARGET)
    # both queries now stand for the one object (2 matched boxes): class 0 for both, no no-object
    expected_ce = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, abs=1e-6)
    # L1: q0 is off by 0.2 in w; q1 (0.2, 0.2, 0.1, 0.1) vs (0.5, 0.5, 0.4, 0.2): 0.3 + 0.3 + 0.3 + 0.1
    assert losses["loss_bbox"].item() == pytest.approx((0.2 + 1.0) / 2, abs=1e-6)


def test_one_to_many_repeats_only_as_far_as_the_queries_go() -> None:
    from sdetr.model.criterion import repeat_targets

    two = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4)},
        {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    repeated = repeat_targets(two, times=3, num_queries=5)  # 5 queries // 2 objects: 2 copies, not 3
    assert repeated[0]["labels"].tolist() == [1, 2, 1, 2]
    assert torch.equal(repeated[0]["boxes"], two[0]["boxes"].repeat(2, 1))
    assert len(repeated[1]["labels"]) == 0  # an empty image stays empty
    assert repeat_targets(two, times=1, num_queries=5) is two
