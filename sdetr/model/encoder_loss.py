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
from torch.nn.utils.rnn import pad_sequence

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
    """Per-cell targets of one feature grid, for the whole batch at once.

    Args:
        mask: ``[B, h, w]`` True on padded cells.
        targets: per image, ``labels [N]`` and ``boxes [N, 4]`` (cx, cy, w, h in [0, 1] of the
            unpadded image).
        num_classes: the no-object label.
    Returns:
        ``labels [B, h, w]`` (class, ``num_classes`` for none, ``IGNORE`` on padding) and
        ``boxes [B, h, w, 4]`` (the covering object's box; zeros where there is none).

    The images' objects are padded to the batch's largest count ``N`` (padding covers no cell),
    so the work is a few operations on ``[B, N, h, w]`` instead of a loop over the images (on a
    CPU the same targets as that loop, tested; on CUDA the loop's division by a Python int could
    put a cell centre one unit in the last place off, this division is correctly rounded).

    Raises:
        ValueError: ``targets`` is not one per image, or a target's boxes and labels differ in number.
    """
    batch, height, width = mask.shape
    if len(targets) != batch:
        raise ValueError(f"cell_targets: {len(targets)} targets for a mask of {batch} images; give one per image")
    for index, target in enumerate(targets):
        if len(target["boxes"]) != len(target["labels"]):
            raise ValueError(
                f"cell_targets: target {index} has {len(target['boxes'])} boxes and {len(target['labels'])} labels; "
                "give one label per box"
            )
    device = mask.device
    extent = valid_extent(mask)  # [B, 2] unpadded rows and columns
    rows, cols = extent[:, :1], extent[:, 1:]  # each [B, 1]
    row_index = torch.arange(height, device=device)  # [h]
    col_index = torch.arange(width, device=device)  # [w]
    padded = (row_index[None, :, None] >= rows[..., None]) | (col_index[None, None, :] >= cols[..., None])  # [B, h, w]
    gt = pad_sequence(
        [t["boxes"].to(device, torch.float32).reshape(-1, 4) for t in targets], batch_first=True
    )  # [B, N, 4]
    if gt.shape[1] == 0:  # no image has objects
        labels = torch.full((batch, height, width), num_classes, dtype=torch.int64, device=device)
        return labels.masked_fill_(padded, IGNORE), gt.new_zeros(batch, height, width, 4)
    classes = pad_sequence([t["labels"].to(device, torch.int64) for t in targets], batch_first=True)  # [B, N]
    counts = torch.tensor([len(t["labels"]) for t in targets], device=device)  # [B]
    real = torch.arange(gt.shape[1], device=device) < counts[:, None]  # [B, N]: not padding
    y = (row_index + 0.5) / rows  # [B, h] cell centres in [0, 1] of the unpadded rows
    x = (col_index + 0.5) / cols  # [B, w]
    x0, y0, x1, y1 = (c[..., None] for c in cxcywh_to_xyxy(gt).unbind(-1))  # each [B, N, 1]
    inside_y = (y[:, None] >= y0) & (y[:, None] <= y1)  # [B, N, h]
    inside_x = (x[:, None] >= x0) & (x[:, None] <= x1)  # [B, N, w]
    covers = inside_y[..., None] & inside_x[:, :, None, :] & real[..., None, None]  # [B, N, h, w]
    centre_row = torch.minimum((gt[..., 1] * rows).long(), rows - 1).clamp(min=0)  # [B, N]
    centre_col = torch.minimum((gt[..., 0] * cols).long(), cols - 1).clamp(min=0)
    image, obj = real.nonzero(as_tuple=True)  # the real objects, [M] each
    covers[image, obj, centre_row[image, obj], centre_col[image, obj]] = True
    area = (gt[..., 2] * gt[..., 3])[..., None, None]  # [B, N, 1, 1]
    owner = torch.where(covers, area, torch.inf).argmin(1).flatten(1)  # [B, h*w] smallest covering object
    covered = covers.any(1) & ~padded  # [B, h, w]
    owned_labels = classes.gather(1, owner).view(batch, height, width)  # [B, h, w]
    owned_boxes = gt.gather(1, owner[..., None].expand(-1, -1, 4)).view(batch, height, width, 4)
    labels = torch.where(covered, owned_labels, num_classes).masked_fill_(padded, IGNORE)
    return labels, torch.where(covered[..., None], owned_boxes, 0.0)


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
