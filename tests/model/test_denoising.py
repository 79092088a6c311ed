"""Denoising queries (DN-DETR): the mask by hand, the queries' layout and noise, the detector's
matching outputs untouched by them, their losses, and the box embedding against DETR's sine one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdetr import build_model
from sdetr.model import CriterionConfig, SetCriterion
from sdetr.model.denoising import IGNORE, Denoiser, denoising_mask, sine_box_embedding
from sdetr.model.position import SinePositionEmbedding

TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.3]])},
]


def test_mask_by_hand() -> None:
    # 2 matching queries (m), then 2 groups of 1 denoising query (g0, g1); True = blocked
    expected = torch.tensor(
        [
            # m  m  g0 g1
            [0, 0, 1, 1],  # m: sees no denoising query
            [0, 0, 1, 1],
            [0, 0, 0, 1],  # g0: the matching queries and itself
            [0, 0, 1, 0],  # g1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(denoising_mask(2, 2, 1, torch.device("cpu")), expected)


def test_queries_copy_each_object_per_group_with_padding() -> None:
    denoiser = Denoiser(num_classes=5, dim=16, num_queries=4, groups=3, label_noise=0.0, box_noise=0.0)
    batch = denoiser(TARGETS)
    assert batch.content.shape == batch.position.shape == (2, 6, 16)  # 3 groups x 2 slots
    assert batch.self_attn_mask.shape == (10, 10)
    assert batch.labels.tolist() == [[1, 3, 1, 3, 1, 3], [2, IGNORE, 2, IGNORE, 2, IGNORE]]
    assert torch.equal(batch.boxes[0, 2:4], TARGETS[0]["boxes"]) and torch.all(batch.boxes[1, 1] == 0)
    # without noise a query embeds its own label and box; padded slots are zeros
    torch.testing.assert_close(batch.content[0, 1], denoiser.label_embed.weight[3])
    expected_position = denoiser.box_embed(sine_box_embedding(TARGETS[1]["boxes"][0], 8))
    torch.testing.assert_close(batch.position[1, 2], expected_position)
    assert torch.all(batch.content[1, 1] == 0) and torch.all(batch.position[1, 1] == 0)
    empty = denoiser([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert empty.labels.tolist() == [[IGNORE] * 3]  # one padded slot per group: no loss, the same calls
    assert torch.all(empty.content == 0) and torch.all(empty.position == 0)
    output = {"pred_logits": torch.randn(1, 3, 6), "pred_boxes": torch.rand(1, 3, 4)}  # [B, D, ...]
    losses = SetCriterion(num_classes=5).denoising_losses(output, empty)
    assert {key: float(value) for key, value in losses.items()} == {"loss_ce": 0.0, "loss_bbox": 0.0, "loss_giou": 0.0}


@settings(max_examples=30, deadline=None)
@given(st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.02, 0.9), st.floats(0.02, 0.9), st.integers(0, 10**6))
def test_box_noise_stays_within_its_scale(cx: float, cy: float, w: float, h: float, seed: int) -> None:
    """Positive copies move by at most ``box_noise``; negative copies (the second 50) by ``box_noise``
    to ``2 * box_noise``, except where the image's border clamps them."""
    torch.manual_seed(seed)
    denoiser = Denoiser(num_classes=3, dim=16, num_queries=2, groups=1, box_noise=0.4)
    box = torch.tensor([[[cx, cy, w, h]]])
    negative = torch.arange(100) >= 50  # [D]
    noisy = denoiser._jitter(box.expand(1, 100, 4), negative)  # [1, 100, 4]
    half_sides = box[..., 2:] / 2  # [1, 1, 2]
    shift = (noisy[..., :2] - box[..., :2]).abs() / half_sides  # [1, 100, 2], in units of box_noise x half side
    ratio = noisy[..., 2:] / box[..., 2:]
    centre_clamped = (noisy[..., :2] == 0) | (noisy[..., :2] == 1)
    side_clamped = (noisy[..., 2:] == 1e-3) | (noisy[..., 2:] == 1)
    positive, negative = slice(0, 50), slice(50, 100)
    assert torch.all(shift[0, positive] <= 0.4 + 1e-5)
    assert torch.all((shift[0, negative] >= 0.4 - 1e-5) | centre_clamped[0, negative])
    assert torch.all(shift[0, negative] <= 0.8 + 1e-5)
    change = (ratio - 1).abs()  # [1, 100, 2]
    assert torch.all((change[0, positive] <= 0.4 + 1e-5) | side_clamped[0, positive])
    in_band = (change[0, negative] >= 0.4 - 1e-5) & (change[0, negative] <= 0.8 + 1e-5)
    assert torch.all(in_band | side_clamped[0, negative])


def test_positive_noise_is_dn_detrs_uniform_draw() -> None:
    """Without negatives the noise is DN-DETR's: one uniform draw in [-1, 1) per coordinate times
    ``box_noise`` (a centre in half sides, a side as a scale), in this order of draws."""
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]]).expand(1, 3, 4)
    denoiser = Denoiser(num_classes=3, dim=16, num_queries=2, groups=1, box_noise=0.4)
    torch.manual_seed(7)
    noisy = denoiser._jitter(box, torch.zeros(3, dtype=torch.bool))
    torch.manual_seed(7)
    centre_draw, side_draw = torch.rand(1, 3, 2) * 2 - 1, torch.rand(1, 3, 2) * 2 - 1
    expected_centre = box[..., :2] + centre_draw * box[..., 2:] / 2 * 0.4
    expected_sides = box[..., 2:] * (1 + side_draw * 0.4)
    assert torch.equal(noisy, torch.cat((expected_centre, expected_sides), -1))


def test_forward_draws_in_dn_detrs_order_without_negatives() -> None:
    """The whole batch, bit for bit, from the draws in order: label flips (``rand``, then ``randint``),
    then the centres' and the sides' box draws (one object, one group: no padding)."""
    denoiser = Denoiser(num_classes=5, dim=16, num_queries=2, groups=1, label_noise=0.5, box_noise=0.4)
    target = [{"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4]])}]
    torch.manual_seed(3)
    batch = denoiser(target)
    torch.manual_seed(3)
    flip, random_label = torch.rand(1, 1) < 0.5, torch.randint(0, 5, (1, 1))
    centre_draw, side_draw = torch.rand(1, 1, 2) * 2 - 1, torch.rand(1, 1, 2) * 2 - 1
    box = target[0]["boxes"][None]  # [1, 1, 4]
    noisy = torch.cat((box[..., :2] + centre_draw * box[..., 2:] / 2 * 0.4, box[..., 2:] * (1 + side_draw * 0.4)), -1)
    label = torch.where(flip, random_label, torch.tensor([[3]]))
    assert torch.equal(batch.content, denoiser.label_embed(label))
    assert torch.equal(batch.position, denoiser.box_embed(sine_box_embedding(noisy, 8)))


def test_contrastive_groups_hold_a_negative_copy_of_each_object() -> None:
    """Each group: the positive copies, then as many negative copies labelled "no object" (class
    ``num_classes``) with the same true box; padding stays ``IGNORE`` in both halves; the mask treats
    the two halves as one group."""
    denoiser = Denoiser(num_classes=5, dim=16, num_queries=4, groups=2, label_noise=0.0, box_noise=0.4, negatives=True)
    torch.manual_seed(0)
    batch = denoiser(TARGETS)
    assert batch.content.shape == batch.position.shape == (2, 8, 16)  # 2 groups x (2 positive + 2 negative)
    assert batch.labels.tolist() == [[1, 3, 5, 5, 1, 3, 5, 5], [2, IGNORE, 5, IGNORE, 2, IGNORE, 5, IGNORE]]
    assert torch.equal(batch.boxes[0, 2:4], TARGETS[0]["boxes"])  # the negatives keep their object's box
    assert torch.equal(batch.boxes[0, 4:6], TARGETS[0]["boxes"])
    assert torch.equal(batch.self_attn_mask, denoising_mask(4, 2, 4, torch.device("cpu")))
    # a negative copy embeds its object's true label (the label noise is 0) and a box moved further
    torch.testing.assert_close(batch.content[0, 3], denoiser.label_embed.weight[3])
    assert torch.all(batch.content[1, 3] == 0) and torch.all(batch.position[1, 3] == 0)
    seen: list[torch.Tensor] = []
    jitter = denoiser._jitter

    def spy(boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        seen.append(negative)
        return jitter(boxes, negative)

    denoiser._jitter = spy  # type: ignore[method-assign]
    denoiser(TARGETS)
    assert seen[0].tolist() == [False, False, True, True] * 2  # the groups' second halves are pushed out
    empty = denoiser([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}])
    assert empty.labels.tolist() == [[IGNORE] * 4]  # two padded slots per group: no loss, the same calls


def test_contrastive_denoising_losses_by_hand() -> None:
    """One object, one group: a positive (class 2) and a negative ("no object", class 3) copy. CE
    sums both at weight 1 (not ``eos_coef``) over the one positive; the box losses see the positive only."""
    criterion = SetCriterion(num_classes=3, config=CriterionConfig())
    batch = Denoiser(3, 16, 2, groups=1, negatives=True)(TARGETS[1:])  # [positive, negative]
    assert batch.labels.tolist() == [[2, 3]]
    logits = torch.tensor([[[0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.5]]])  # [B, D, C + 1]
    boxes = torch.tensor([[[0.5, 0.6, 0.3, 0.3], [0.9, 0.1, 0.05, 0.05]]])  # the negative's box is far off: no loss
    losses = criterion.denoising_losses({"pred_logits": logits, "pred_boxes": boxes}, batch)
    expected_ce = -torch.log_softmax(logits[0, 0], -1)[2] - torch.log_softmax(logits[0, 1], -1)[3]
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.1))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(1 - 0.06 / 0.12))


def test_matching_outputs_do_not_change_with_contrastive_denoising_queries() -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=5)
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 128)]
    plain = model(images)
    noisy = model(images, denoising=Denoiser(5, 64, 20, groups=3, negatives=True)(TARGETS))
    for key in ("pred_logits", "pred_boxes"):  # the mask hides them; more rows round the products differently
        torch.testing.assert_close(plain[key], noisy[key], rtol=0, atol=2e-6, msg=key)
    assert noisy["denoising"][0]["pred_boxes"].shape == (2, 12, 4)  # 3 groups x (2 + 2)


def test_box_embedding_of_a_centre_is_detrs_sine_embedding_of_that_cell() -> None:
    """A cell's x in DETR's embedding is (col + 1) / W * 2 pi; the same x as a box's cx embeds alike."""
    dim = 16
    grid = SinePositionEmbedding(dim)(torch.zeros(1, 3, 4, dtype=torch.bool))  # [1, dim, 3, 4]
    row, col = 1, 2
    box = torch.tensor([(col + 1) / 4, (row + 1) / 3, 0.5, 0.5])
    embedded = sine_box_embedding(box, dim // 2)  # [4 * dim/2]: cx, cy, w, h channels
    torch.testing.assert_close(embedded[: dim // 2], grid[0, dim // 2 :, row, col])  # x channels
    torch.testing.assert_close(embedded[dim // 2 : dim], grid[0, : dim // 2, row, col])  # y channels


@pytest.mark.parametrize("train", [False, True])
def test_matching_outputs_do_not_change_with_denoising_queries(train: bool) -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=5).train(train)  # dropout 0: train mode is deterministic
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 128)]
    batch = Denoiser(5, 64, 20, groups=3)(TARGETS)
    plain = model(images)
    noisy = model(images, denoising=batch)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(plain[key], noisy[key]), key
        for index, aux in enumerate(plain["aux_outputs"]):
            assert torch.equal(aux[key], noisy["aux_outputs"][index][key]), (key, index)
    assert len(noisy["denoising"]) == 4  # every decoder layer of both stages
    assert noisy["denoising"][0]["pred_boxes"].shape == (2, 6, 4) and "denoising" not in plain


def test_denoising_losses_by_hand() -> None:
    criterion = SetCriterion(num_classes=3, config=CriterionConfig())
    batch = Denoiser(3, 16, 2, groups=1)(TARGETS[1:])  # one query: class 2, box [0.4, 0.6, 0.3, 0.3]
    logits = torch.tensor([[[0.0, 0.0, 2.0, 0.0]]])  # [B, D, C + 1]
    boxes = torch.tensor([[[0.5, 0.6, 0.3, 0.3]]])  # cx off by 0.1
    losses = criterion.denoising_losses({"pred_logits": logits, "pred_boxes": boxes}, batch)
    expected_ce = -torch.log_softmax(logits[0, 0], -1)[2]
    torch.testing.assert_close(losses["loss_ce"], expected_ce)
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.1))
    # boxes [0.35, 0.45, 0.65, 0.75] vs [0.25, 0.45, 0.55, 0.75]: intersection 0.2 x 0.3, union 0.12
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(1 - 0.06 / 0.12))
    assert criterion.loss_weight("loss_giou_dn3") == 2.0 and criterion.loss_weight("loss_bbox_dn0") == 5.0
