"""DETR's set criterion over every decoder output: CE (with a no-object weight), L1 and GIoU."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdetr.model.boxes import box_losses
from sdetr.model.denoising import IGNORE, DenoisingBatch
from sdetr.model.encoder_loss import encoder_losses, global_mean
from sdetr.model.matcher import HungarianMatcher, Target

#: Weight of each loss in the total (auxiliary outputs use the same, with suffix ``_{i}``).
DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


@dataclass
class CriterionConfig:
    """Loss weights, the no-object class weight and the weight of the dense encoder losses.

    ``encoder_weight`` > 0 adds :mod:`sdetr.model.encoder_loss` for every stage (keys
    ``loss_ce_enc1`` ...), each scaled by its base weight times ``encoder_weight``; the model must
    then be called with ``encoder_outputs=True``. 0 (the default) is the original criterion.

    ``one_to_many`` > 1 matches every ground-truth object to up to that many queries of each
    decoder output (the targets repeated, as in H-DETR's one-to-many matching; fewer where the
    queries run out), a training aid for early epochs; 1 (the default) is DETR's one-to-one.
    """

    eos_coef: float = 0.1
    encoder_weight: float = 0.0
    one_to_many: int = 1
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    matcher: HungarianMatcher = field(default_factory=HungarianMatcher)


class SetCriterion(nn.Module):
    """Hungarian-matched losses for the final and every auxiliary output.

    Returns a dict with ``loss_ce``, ``loss_bbox``, ``loss_giou`` (weighted into ``total``) and
    ``class_error``, ``cardinality_error`` for logging; auxiliary outputs add ``_{i}`` keys.
    """

    empty_weight: Tensor

    def __init__(self, num_classes: int, config: CriterionConfig | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.config = config or CriterionConfig()
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.config.eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def num_boxes(self, targets: list[Target], device: torch.device) -> float:
        """Target boxes per process averaged over processes, at least 1."""
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return max(global_mean(count).item(), 1.0)

    def single_output_losses(self, outputs: dict, targets: list[Target], num_boxes: float) -> dict[str, Tensor]:
        """Losses of one decoder output (``pred_logits [B, Q, C+1]``, ``pred_boxes [B, Q, 4]``)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        matches = self.config.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        src_idx = torch.cat([src for src, _ in matches])
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, matches, strict=True)])
        matched_target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, matches, strict=True)])

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = matched_labels.to(logits.device)  # [B, Q]
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)

        src_boxes = boxes[batch_idx, src_idx]  # [M, 4]
        target_boxes = matched_target_boxes.to(boxes.device)
        loss_bbox, loss_giou = box_losses(src_boxes, target_boxes, num_boxes)
        with torch.no_grad():
            if len(matched_labels):
                correct = (logits[batch_idx, src_idx].argmax(-1) == target_classes[batch_idx, src_idx]).float()
                class_error = 100.0 - 100.0 * correct.mean()
            else:
                class_error = torch.tensor(100.0, device=logits.device)
            predicted_objects = (logits.argmax(-1) != self.num_classes).sum(1).float()  # [B]
            target_counts = torch.tensor([float(len(t["labels"])) for t in targets], device=logits.device)
            cardinality_error = F.l1_loss(predicted_objects, target_counts)
        return {
            "loss_ce": loss_ce,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
            "class_error": class_error,
            "cardinality_error": cardinality_error,
        }

    def denoising_losses(self, output: dict, denoising: DenoisingBatch) -> dict[str, Tensor]:
        """Losses of one decoder layer's denoising predictions (``pred_logits [B, D, C+1]``,
        ``pred_boxes [B, D, 4]``): each query against the object it was made from, no matching.
        CE covers every copy (a negative copy's class is "no object", at weight 1, not
        ``eos_coef``); L1 and GIoU cover the positive copies. All three are divided by the number of
        positive copies, so CE is their mean without negatives and the box losses are per object,
        as DETR's."""
        valid = denoising.labels != IGNORE  # [B, D]
        positive = valid & (denoising.labels < self.num_classes)  # [B, D]: not padding, not a negative copy
        count = global_mean(positive.sum().float()).clamp(min=1.0)
        logits, labels = output["pred_logits"][valid], denoising.labels[valid]  # [P, C+1], [P]
        predicted, wanted = output["pred_boxes"][positive], denoising.boxes[positive]  # [P+, 4]
        loss_bbox, loss_giou = box_losses(predicted, wanted, count)
        return {
            "loss_ce": F.cross_entropy(logits, labels, reduction="sum") / count,
            "loss_bbox": loss_bbox,
            "loss_giou": loss_giou,
        }

    def group_losses(
        self, output: dict, targets: list[Target], num_queries: int, groups: int, num_boxes: float
    ) -> dict[str, Tensor]:
        """Losses of one decoder layer's extra query groups (Group DETR), the first ``groups *
        num_queries`` of its ``pred_logits [B, D, C+1]`` and ``pred_boxes [B, D, 4]``: each group
        matched one-to-one to ``targets`` on its own and given DETR's losses, summed over the groups
        (each group is trained as the model's own queries are)."""
        summed: dict[str, Tensor] = {}
        for group in range(groups):
            part = slice(group * num_queries, (group + 1) * num_queries)
            predictions = {key: output[key][:, part] for key in ("pred_logits", "pred_boxes")}  # [B, Q, ...]
            for key, value in self.single_output_losses(predictions, targets, num_boxes).items():
                if key in self.config.weights:
                    summed[key] = summed[key] + value if key in summed else value
        return summed

    def loss_weight(self, key: str) -> float | None:
        """Weight of a loss key (``loss_giou_3`` -> weight of ``loss_giou``, ``loss_ce_dn2`` and
        ``loss_ce_group2`` -> weight of ``loss_ce``, ``loss_ce_enc2`` -> weight of ``loss_ce`` times
        ``encoder_weight``); None for metrics."""
        weight = self.config.weights.get(re.sub(r"_(enc|dn|group)?\d+$", "", key))
        if weight is not None and re.search(r"_enc\d+$", key):
            weight *= self.config.encoder_weight
        return weight

    def forward(
        self,
        outputs: dict,
        targets: list[Target],
        one_to_many: int | None = None,
        denoising: DenoisingBatch | None = None,
    ) -> dict[str, Tensor]:
        """The losses of every decoder output (and of the encoders with ``encoder_weight``).

        ``one_to_many`` overrides the config's for this call (the trainer's early epochs).
        ``denoising``: the batch's training-only queries, whose predictions are
        ``outputs["denoising"]``: its denoising queries add ``loss_ce_dn{i}``, ``loss_bbox_dn{i}``,
        ``loss_giou_dn{i}`` for decoder layer ``i``, its extra query groups (``query_groups`` > 0)
        ``loss_ce_group{i}``, ``loss_bbox_group{i}``, ``loss_giou_group{i}`` (summed over the groups).
        """
        times = self.config.one_to_many if one_to_many is None else one_to_many
        matched = repeat_targets(targets, times, outputs["pred_logits"].shape[1])
        num_boxes = self.num_boxes(matched, outputs["pred_logits"].device)
        losses = self.single_output_losses(outputs, matched, num_boxes)
        for index, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self.single_output_losses(aux, matched, num_boxes)
            losses.update({f"{k}_{index}": v for k, v in aux_losses.items() if k in self.config.weights})
        if self.config.encoder_weight > 0:
            dense_outputs = outputs.get("encoder_outputs")
            if dense_outputs is None:
                raise ValueError(
                    "CriterionConfig.encoder_weight > 0 needs the encoders' dense predictions: "
                    "call the model with encoder_outputs=True"
                )
            for stage, dense in enumerate(dense_outputs, start=1):
                stage_losses = encoder_losses(dense, targets, self.num_classes, self.empty_weight)
                losses.update({f"{k}_enc{stage}": v for k, v in stage_losses.items()})
        if denoising is not None:
            queries = outputs["pred_logits"].shape[1]
            groups = denoising.query_groups
            has_denoising_queries = denoising.labels.shape[1] > groups * queries  # after the extra groups
            num_plain = num_boxes  # the groups are matched one-to-one to the targets themselves
            if groups and matched is not targets:  # (one-to-many epochs: count the targets once)
                num_plain = self.num_boxes(targets, outputs["pred_logits"].device)
            for index, output in enumerate(outputs["denoising"]):
                if has_denoising_queries:
                    dn = self.denoising_losses(output, denoising)
                    losses.update({f"{k}_dn{index}": v for k, v in dn.items()})
                if groups:
                    grouped = self.group_losses(output, targets, queries, groups, num_plain)
                    losses.update({f"{k}_group{index}": v for k, v in grouped.items()})
        weighted = [value * w for key, value in losses.items() if (w := self.loss_weight(key)) is not None]
        losses["total"] = torch.stack(weighted).sum()
        return losses


def repeat_targets(targets: list[Target], times: int, num_queries: int) -> list[Target]:
    """Each image's objects repeated ``times`` times for one-to-many matching (``targets`` itself for 1).

    An image with ``N`` objects gets ``min(times, num_queries // N)`` copies (at least one), so
    the Hungarian matcher can still give every copy its own query.
    """
    if times == 1:
        return targets
    repeated = []
    for target in targets:
        copies = max(1, min(times, num_queries // max(len(target["labels"]), 1)))
        repeated.append(
            {**target, "labels": target["labels"].repeat(copies), "boxes": target["boxes"].repeat(copies, 1)}
        )
    return repeated
