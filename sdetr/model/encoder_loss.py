"""Dense supervision of each stage's encoder output (a training aid; off in the original recipe).

Every unpadded cell of a stage's feature grid is asked, through the *shared* class and box
heads, for the object that covers the cell's centre: its class and its absolute box. Cells
covered by no object target "no object"; where objects overlap, the smallest wins; an object
too small to cover any cell centre is given the cell that holds its own centre. The losses are
DETR's (CE with the no-object weight, L1 and GIoU), so the model gains no parameters and its
inference is unchanged.

Why it exists: DETR adds position embeddings to queries and keys only, so a decoder query can
report *where* an object is only once the backbone encodes objectness and absolute position in
its features. With a pretrained backbone that comes for free; from scratch (the CPU quickstart)
the decoder otherwise waits thousands of steps on its initial plateau. This loss gives the
backbone and encoders that signal directly, the way two-stage DETR variants supervise encoder
proposals.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sdetr.model.boxes import box_losses, cxcywh_to_xyxy
from sdetr.model.images import valid_extent
from sdetr.model.matcher import Target

#: Label of padded cells: ignored by the losses.
IGNORE = -1


def global_mean(value: Tensor) -> Tensor:
    """``value`` averaged over the processes of the default group (itself without one).

    For tensors inside the loss (logged floats are averaged by ``sdetr.engine.distributed``).
    Loss normalisers are averaged like this so that, with gradients averaged by DDP, P processes
    give the same loss and gradients as one process on the combined batch.
    """
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def cell_targets(mask: Tensor, targets: list[Target], num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-cell targets of one feature grid.

    Args:
        mask: ``[B, h, w]`` True on padded cells.
        targets: per image, ``labels [N]`` and ``boxes [N, 4]`` (cx, cy, w, h in [0, 1] of the
            unpadded image).
        num_classes: the no-object label.
    Returns:
        ``labels [B, h, w]`` (class, ``num_classes`` for none, ``IGNORE`` on padding) and
        ``boxes [B, h, w, 4]`` (the covering object's box; zeros where there is none).
    """
    batch, height, width = mask.shape
    labels = torch.full((batch, height, width), num_classes, dtype=torch.int64, device=mask.device)
    boxes = torch.zeros(batch, height, width, 4, device=mask.device)
    extent = valid_extent(mask)  # [B, 2] unpadded rows and columns
    for b, target in enumerate(targets):
        rows, cols = int(extent[b, 0]), int(extent[b, 1])
        labels[b, rows:, :] = IGNORE
        labels[b, :, cols:] = IGNORE
        gt = target["boxes"].to(mask.device, torch.float32)  # [N, 4]
        if len(gt) == 0:
            continue
        y = (torch.arange(rows, device=mask.device) + 0.5) / rows  # [rows] cell centres
        x = (torch.arange(cols, device=mask.device) + 0.5) / cols  # [cols]
        x0, y0, x1, y1 = cxcywh_to_xyxy(gt).unbind(-1)  # each [N]
        inside_y = (y[None] >= y0[:, None]) & (y[None] <= y1[:, None])  # [N, rows]
        inside_x = (x[None] >= x0[:, None]) & (x[None] <= x1[:, None])  # [N, cols]
        covers = inside_y[:, :, None] & inside_x[:, None, :]  # [N, rows, cols]
        centre_row = (gt[:, 1] * rows).long().clamp(0, rows - 1)  # [N]
        centre_col = (gt[:, 0] * cols).long().clamp(0, cols - 1)
        covers[torch.arange(len(gt)), centre_row, centre_col] = True
        area = (gt[:, 2] * gt[:, 3])[:, None, None].expand_as(covers)  # [N, rows, cols]
        owner = torch.where(covers, area, torch.inf).argmin(0)  # [rows, cols] smallest covering object
        covered = covers.any(0)  # [rows, cols]
        labels[b, :rows, :cols] = torch.where(covered, target["labels"].to(mask.device)[owner], num_classes)
        boxes[b, :rows, :cols] = torch.where(covered[..., None], gt[owner], 0.0)
    return labels, boxes


def encoder_losses(
    output: dict[str, Tensor], targets: list[Target], num_classes: int, empty_weight: Tensor
) -> dict[str, Tensor]:
    """``loss_ce``, ``loss_bbox``, ``loss_giou`` of one stage's dense prediction.

    Args:
        output: ``pred_logits [B, h, w, C + 1]``, ``pred_boxes [B, h, w, 4]``, ``mask [B, h, w]``.
        empty_weight: ``[C + 1]`` class weights of the cross-entropy (no-object down-weighted).
    CE is the weighted mean over unpadded cells; L1 and GIoU are means over covered cells (at
    least 1). Under torch.distributed both denominators are averaged over processes.
    """
    labels, boxes = cell_targets(output["mask"], targets, num_classes)
    logits = output["pred_logits"]
    flat_labels = labels.flatten()  # [B*h*w]
    valid = flat_labels != IGNORE
    ce_sum = F.cross_entropy(logits.flatten(0, 2), flat_labels, empty_weight, ignore_index=IGNORE, reduction="sum")
    weight_sum = global_mean(empty_weight[flat_labels[valid]].sum())
    loss_ce = ce_sum / weight_sum.clamp(min=1e-6)
    positive = (labels >= 0) & (labels < num_classes)  # [B, h, w]
    count = global_mean(positive.sum().float()).clamp(min=1.0)
    predicted, wanted = output["pred_boxes"][positive], boxes[positive]  # [P, 4]
    loss_bbox, loss_giou = box_losses(predicted, wanted, count)
    return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
