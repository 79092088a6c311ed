"""Hungarian matching between predictions and targets (DETR's cost, scipy's solver)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sdetr.model.boxes import cxcywh_to_xyxy, pairwise_giou

Target = dict[str, Tensor]


@dataclass(frozen=True)
class HungarianMatcher:
    """Cost = ``cost_class * (-p[class]) + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``."""

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0

    def cost_matrix(self, logits: Tensor, boxes: Tensor, target: Target) -> Tensor:
        """One image: ``logits [Q, C+1]``, ``boxes [Q, 4]`` cxcywh -> cost ``[Q, N targets]``."""
        prob = logits.softmax(-1)  # [Q, C+1]
        labels, target_boxes = target["labels"], target["boxes"]
        cost_class = -prob[:, labels]  # [Q, N]
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)  # [Q, N]
        cost_giou = -pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: list[Target]) -> list[tuple[Tensor, Tensor]]:
        """Args:
            outputs: ``pred_logits [B, Q, C+1]`` and ``pred_boxes [B, Q, 4]``.
            targets: per image, ``labels [N]`` and ``boxes [N, 4]`` (cxcywh, normalised).
        Returns:
            per image, ``(prediction indices, target indices)``, each ``[min(Q, N)]`` int64.
        """
        matches = []
        for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets, strict=True):
            if len(target["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits.float(), boxes.float(), target).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
