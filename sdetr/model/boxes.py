"""Box formats and generalised IoU (thin wrappers over ``torchvision.ops``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def box_losses(predicted: Tensor, wanted: Tensor, count: Tensor | float) -> tuple[Tensor, Tensor]:
    """DETR's box losses of matched pairs, ``[P, 4]`` cxcywh each: the L1 and the GIoU loss, each
    summed and divided by ``count`` (the number of objects)."""
    l1 = F.l1_loss(predicted, wanted, reduction="sum") / count
    giou = generalized_box_iou_loss(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(wanted), reduction="sum") / count
    return l1, giou


def pairwise_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of every pair: ``[N, 4]``, ``[M, 4]`` xyxy -> ``[N, M]``.

    Raises a clear error on degenerate boxes (x1 < x0 or y1 < y0, or a NaN coordinate), which would give NaN.
    An infinite coordinate is not caught here (predicted boxes are sigmoid outputs, in [0, 1]).
    """
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if not (boxes[:, 2:] >= boxes[:, :2]).all():
            raise ValueError(f"{name} has NaN boxes or boxes with x1 < x0 or y1 < y0; GIoU needs valid xyxy boxes")
    return generalized_box_iou(boxes1, boxes2)
