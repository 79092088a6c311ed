"""DETR post-processing: best class per query and absolute xyxy boxes."""

from __future__ import annotations

import torch
from torch import Tensor

from sdetr.model.boxes import cxcywh_to_xyxy


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
    """Turn model outputs into detections (every query kept, as for COCO evaluation).

    Args:
        outputs: ``pred_logits [B, Q, C+1]``, ``pred_boxes [B, Q, 4]`` (cxcywh in [0, 1]).
        target_sizes: ``[B, 2]`` (height, width) of each original image.
    Returns:
        per image ``scores [Q]``, ``labels [Q]`` (int64) and ``boxes [Q, 4]`` absolute xyxy.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if target_sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"target_sizes must be [B, 2] = {(logits.shape[0], 2)}, got {tuple(target_sizes.shape)}")
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)  # [B, Q]
    height, width = target_sizes.to(boxes.dtype).unbind(1)
    scale = torch.stack((width, height, width, height), dim=1)[:, None, :]  # [B, 1, 4]
    absolute = cxcywh_to_xyxy(boxes) * scale  # [B, Q, 4]
    return [{"scores": s, "labels": lb, "boxes": b} for s, lb, b in zip(scores, labels, absolute, strict=True)]
