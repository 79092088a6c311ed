"""Extra query groups (Group DETR): the mask by hand, the model's outputs untouched by them, each
group blind to the others, and their losses by hand and inside the criterion."""

from __future__ import annotations

import pytest
import torch

from sdetr import build_model
from sdetr.model import CriterionConfig, SetCriterion
from sdetr.model.denoising import IGNORE, Denoiser, denoising_mask
from sdetr.model.query_groups import QueryGroups, group_mask

TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.3]])},
]


def test_mask_by_hand_with_denoising_queries() -> None:
    # 1 model query (m), 2 extra groups of 1 (a, b), then 2 denoising groups of 1 (d0, d1); True = blocked
    expected = torch.tensor(
        [
            # m  a  b  d0 d1
            [0, 1, 1, 1, 1],  # m: only itself
            [1, 0, 1, 1, 1],  # a: only itself
            [1, 1, 0, 1, 1],  # b
            [0, 1, 1, 0, 1],  # d0: the model's queries and its own group, as without extra groups
            [0, 1, 1, 1, 0],  # d1
        ],
        dtype=torch.bool,
    )
    dn = denoising_mask(1, 2, 1, torch.device("cpu"))
    assert torch.equal(group_mask(1, 2, dn), expected)


def test_mask_without_denoising_queries_is_block_diagonal() -> None:
    mask = group_mask(2, 2, None)
    expected = ~torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 3)  # [6, 6]: 3 groups of 2
    assert torch.equal(mask, expected)


def test_batch_layout_groups_first_then_denoising() -> None:
    groups = QueryGroups(num_queries=4, dim=16, groups=3)
    denoising = Denoiser(5, 16, 4, groups=2, label_noise=0.0, box_noise=0.0)(TARGETS)
    batch = groups(2, denoising)
    assert batch.query_groups == 2
    assert batch.content.shape == batch.position.shape == (2, 8 + 4, 16)  # 2 x 4 group queries, 2 x 2 denoising
    assert batch.self_attn_mask.shape == (16, 16)
    assert torch.all(batch.content[:, :8] == 0)  # the groups start from zeros, as the model's queries
    torch.testing.assert_close(batch.position[1, 4:8], groups.position[1])  # group 2's positional queries
    assert torch.all(batch.labels[:, :8] == IGNORE) and torch.equal(batch.labels[:, 8:], denoising.labels)
    torch.testing.assert_close(batch.position[:, 8:], denoising.position)
    alone = groups(2, None)
    assert alone.content.shape == (2, 8, 16) and alone.labels.shape == (2, 8)
    with pytest.raises(ValueError, match="groups=1"):
        QueryGroups(4, 16, groups=1)


@pytest.mark.parametrize("train", [False, True])
def test_model_outputs_do_not_change_and_groups_do_not_see_each_other(train: bool) -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=5).train(train)  # dropout 0: train mode is deterministic
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 128)]
    groups = QueryGroups(20, 64, groups=3)
    denoising = Denoiser(5, 64, 20, groups=2)(TARGETS)
    batch = groups(2, denoising)
    plain = model(images)
    grouped = model(images, denoising=batch)
    # the mask hides the extra queries exactly; what remains is the rounding of matrix products over
    # more rows (another blocking of the same sums: 5e-7 here, as with 10 or more denoising groups)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(grouped[key], plain[key], rtol=0, atol=2e-6)
        for index, aux in enumerate(plain["aux_outputs"]):
            torch.testing.assert_close(grouped["aux_outputs"][index][key], aux[key], rtol=0, atol=2e-6)
    assert len(grouped["denoising"]) == 4 and grouped["denoising"][0]["pred_boxes"].shape == (2, 40 + 4, 4)
    with torch.no_grad():
        groups.position[1] += 1.0  # the second extra group moves ...
    moved = model(images, denoising=groups(2, denoising))
    for layer, before in enumerate(grouped["denoising"]):
        after = moved["denoising"][layer]["pred_boxes"]
        assert torch.equal(before["pred_boxes"][:, :20], after[:, :20]), layer  # ... the first does not see it
        assert torch.equal(before["pred_boxes"][:, 40:], after[:, 40:]), layer  # nor do the denoising queries
        assert not torch.equal(before["pred_boxes"][:, 20:40], after[:, 20:40]), layer


def test_group_losses_by_hand() -> None:
    """Two groups of two queries, one object: each group is matched within its own slice."""
    criterion = SetCriterion(num_classes=3, config=CriterionConfig())  # no-object weight 0.1
    target = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.3]])}]
    # group 0: [right class with cx off by 0.1, exact box with its class behind] -> the exact box wins
    # group 1: [far away, same centre but a third of the side] -> the smaller box wins
    logits = torch.tensor([[[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, 1.0]]])
    boxes = torch.tensor(
        [[[0.5, 0.6, 0.3, 0.3], [0.4, 0.6, 0.3, 0.3], [0.9, 0.1, 0.05, 0.05], [0.4, 0.6, 0.1, 0.1]]]
    )  # [B, 2 groups x 2, 4]
    losses = criterion.group_losses({"pred_logits": logits, "pred_boxes": boxes}, target, 2, 2, num_boxes=1.0)
    nll = -torch.log_softmax(logits[0], -1)  # [4 queries, C + 1]
    # CE per group: the weighted mean over its 2 queries, the matched one (weight 1) targeting class
    # 2 and the other (weight 0.1) "no object"; matched: query 1 in group 0, query 3 in group 1
    expected_ce = (nll[1, 2] + 0.1 * nll[0, 3]) / 1.1 + (nll[3, 2] + 0.1 * nll[2, 3]) / 1.1
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.0 + 0.4))  # exact; w and h 0.2 short
    # query 3 [0.35, 0.55, 0.45, 0.65] inside the object [0.25, 0.45, 0.55, 0.75]: IoU = GIoU = 1/9
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.0 + 8 / 9))
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert criterion.loss_weight("loss_giou_group3") == 2.0 and criterion.loss_weight("loss_bbox_group0") == 5.0


def test_criterion_adds_group_losses_per_decoder_layer_and_counts_them_in_the_total() -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=5)
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 128)]
    criterion = SetCriterion(num_classes=5)
    for denoiser in (None, Denoiser(5, 64, 20, groups=2)):
        batch = QueryGroups(20, 64, groups=3)(2, None if denoiser is None else denoiser(TARGETS))
        outputs = model(images, denoising=batch)
        losses = criterion(outputs, TARGETS, denoising=batch)
        assert {f"loss_ce_group{i}" for i in range(4)} <= set(losses)
        assert any("_dn" in key for key in losses) == (denoiser is not None)
        weighted = [value * w for key, value in losses.items() if key != "total" and (w := criterion.loss_weight(key))]
        torch.testing.assert_close(losses["total"], torch.stack(weighted).sum())
        # the last layer's two extra groups, each scored as the model's own queries are (3 objects)
        last = outputs["denoising"][-1]
        each = [
            criterion.single_output_losses({k: v[:, part] for k, v in last.items()}, TARGETS, 3.0)
            for part in (slice(0, 20), slice(20, 40))
        ]
        torch.testing.assert_close(losses["loss_giou_group3"], each[0]["loss_giou"] + each[1]["loss_giou"])
