"""Denoising queries (DN-DETR, Li et al. 2022), a training aid that leaves inference unchanged.

During training, each image's ground-truth objects are copied into ``groups`` groups of extra
decoder queries with noise added: a label flipped to a random class with probability
``label_noise`` and a box whose centre moves by up to ``box_noise`` half-sides and whose sides
scale by up to ``1 +- box_noise``. A query's content (its stage-1 decoder start) embeds the noisy
label; its positional query embeds the noisy box. The decoder is asked to reconstruct each
query's true object, with no Hungarian matching, which gives the decoder a stable localisation
target from the first step.

With ``negatives=True`` (contrastive denoising, DINO, Zhang et al. 2022) each group also holds a
negative copy of every object, its box moved by ``box_noise`` to ``2 * box_noise`` (centre
shifts of one to two times the positive's largest, side scales likewise), which must predict
"no object": the decoder learns to reject a second query near an object it already has.

The extra queries are appended after the ``Q`` matching queries of every stage (stage 2 starts
them from stage 1's output, as it does the matching queries). A decoder self-attention mask
keeps the matching queries from seeing any denoising query, and each group from seeing the
others, so the matching queries' predictions do not depend on the ground truth. The embeddings
live in :class:`Denoiser`, owned by the trainer: the detector gains no parameters, and with
``denoising=None`` (always in inference) its forward is the plain one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdetr.model.matcher import Target
from sdetr.model.position import sine_waves

#: Label of padded denoising slots (images with fewer objects than the batch's most): no loss.
IGNORE = -1


@dataclass
class DenoisingBatch:
    """The training-only decoder queries of one batch: ``D = G * Q + groups * N`` of them, the
    ``query_groups`` extra groups of ``Q`` (none unless :mod:`sdetr.model.query_groups` added them),
    then the denoising queries (``N`` per group: the most objects in an image, at least 1, twice
    that with negatives: each group's positive copies, then its negative copies).

    Attributes:
        content: ``[B, D, E]`` stage-1 decoder start of each query (its noisy label's embedding).
        position: ``[B, D, E]`` positional query of each query (its noisy box's embedding), every stage.
        self_attn_mask: ``[Q + D, Q + D]`` True where query i may not see query j in the decoder's
            self-attention (the ``Q`` matching queries come first).
        labels: ``[B, D]`` class of the object each query must reconstruct, ``num_classes`` ("no
            object") on a negative copy, ``IGNORE`` on padding.
        boxes: ``[B, D, 4]`` its true box (cx, cy, w, h in [0, 1]), the box it was made from on a
            negative copy (no box loss); zeros on padding.
        query_groups: ``G``, extra groups of ``Q`` matched queries placed before the denoising
            queries (Group DETR, :mod:`sdetr.model.query_groups`); their labels are ``IGNORE``.
    """

    content: Tensor
    position: Tensor
    self_attn_mask: Tensor
    labels: Tensor
    boxes: Tensor
    query_groups: int = 0


def sine_box_embedding(boxes: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """``boxes [..., 4]`` in [0, 1] -> ``[..., 4 * channels]``: each coordinate scaled by 2*pi and
    embedded as DETR's sine position embedding does a cell's x or y (interleaved sin/cos)."""
    waves = sine_waves(boxes.float() * (2 * math.pi), channels, temperature)  # [..., 4, channels]
    return waves.flatten(-2)  # [..., 4 * channels]


def denoising_mask(num_queries: int, groups: int, group_size: int, device: torch.device) -> Tensor:
    """``[Q + D, Q + D]`` bool, True = blocked: matching queries see no denoising query, and each
    denoising group sees only itself and the matching queries."""
    total = num_queries + groups * group_size
    blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
    blocked[:num_queries, num_queries:] = True
    group_of = torch.arange(groups * group_size, device=device) // group_size  # [D]
    blocked[num_queries:, num_queries:] = group_of[:, None] != group_of[None, :]
    return blocked


class Denoiser(nn.Module):
    """Makes the denoising queries of a batch from its targets (training only).

    Args:
        num_classes: the detector's ``num_classes`` (labels are in ``[0, num_classes)``).
        dim: the detector's ``hidden_dim``.
        num_queries: the detector's matching queries per stage.
        groups: noisy copies of every object.
        label_noise: probability that a copy's label is replaced by a random class.
        box_noise: the box noise scale (DN-DETR's lambda).
        negatives: also make a negative copy of every object in each group (contrastive
            denoising), its noise between ``box_noise`` and ``2 * box_noise``, labelled "no object";
            needs ``box_noise < 0.5`` (a side scaled by ``1 - 2 * box_noise`` must stay positive).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        num_queries: int,
        groups: int = 5,
        label_noise: float = 0.2,
        box_noise: float = 0.4,
        negatives: bool = False,
    ) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups={groups}; use at least 1 group of denoising queries")
        if dim % 8:
            raise ValueError(f"dim={dim}; the box embedding needs hidden_dim divisible by 8")
        if negatives and not 0 < box_noise < 0.5:
            raise ValueError(
                f"box_noise={box_noise} with negatives=True; use 0 < box_noise < 0.5, so that a negative copy's "
                "side, scaled by down to 1 - 2 * box_noise, stays positive"
            )
        self.num_classes, self.num_queries, self.groups = num_classes, num_queries, groups
        self.label_noise, self.box_noise, self.negatives = label_noise, box_noise, negatives
        self.label_embed = nn.Embedding(num_classes, dim)
        self.box_embed = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, targets: list[Target]) -> DenoisingBatch:
        """The batch's denoising queries.

        A batch with no object at all still gets one padded slot per group, two with negatives
        (label ``IGNORE``, no loss), so that every process of a multi-process run calls the embeddings and the
        denoising losses alike (DDP and the losses' cross-process means need that).
        """
        size = max(1, max(len(t["labels"]) for t in targets))
        device = self.label_embed.weight.device
        copies = 2 if self.negatives else 1  # per object and group: positive (then negative)
        batch, group_size = len(targets), copies * size
        count = self.groups * group_size
        labels = torch.full((batch, size), IGNORE, dtype=torch.int64, device=device)
        boxes = torch.zeros(batch, size, 4, device=device)
        for b, target in enumerate(targets):
            n = len(target["labels"])
            labels[b, :n] = target["labels"].to(device)
            boxes[b, :n] = target["boxes"].to(device, torch.float32)
        source = labels.repeat(1, copies * self.groups)  # [B, D]: the label each copy is made from
        boxes = boxes.repeat(1, copies * self.groups, 1)  # [B, D, 4]
        negative = (torch.arange(count, device=device) % group_size) >= size  # [D]: the groups' second halves
        labels = torch.where(negative & (source != IGNORE), self.num_classes, source)  # [B, D]: what to predict
        valid = source != IGNORE
        noisy_labels = torch.where(
            torch.rand(batch, count, device=device) < self.label_noise,
            torch.randint(0, self.num_classes, (batch, count), device=device),
            source,
        ).clamp(min=0)  # padding embeds class 0 (its loss is ignored)
        noisy_boxes = self._jitter(boxes, negative)
        content = self.label_embed(noisy_labels) * valid[..., None]  # [B, D, E]
        channels = self.label_embed.embedding_dim // 2  # 4 coordinates x E/2 channels -> 2E
        position = self.box_embed(sine_box_embedding(noisy_boxes, channels)) * valid[..., None]  # [B, D, E]
        mask = denoising_mask(self.num_queries, self.groups, group_size, device)
        return DenoisingBatch(content, position, mask, labels, boxes)

    def _jitter(self, boxes: Tensor, negative: Tensor) -> Tensor:
        """``boxes [B, D, 4]`` cxcywh -> noisy copies: centres moved by up to ``box_noise`` half
        sides, sides scaled by ``1 +- box_noise``; where ``negative [D]``, by ``1`` to ``2`` times
        as much; clamped to the image."""
        centre, sides = boxes[..., :2], boxes[..., 2:]
        push = negative.to(boxes.dtype)[:, None]  # [D, 1]: 1 moves a draw in [-1, 1) out to +-[1, 2)
        shift = torch.rand_like(centre) * 2 - 1  # [B, D, 2], in [-1, 1)
        shift = (shift + torch.where(shift >= 0, push, -push)) * sides / 2 * self.box_noise
        scale = torch.rand_like(sides) * 2 - 1  # [B, D, 2]
        scale = 1 + (scale + torch.where(scale >= 0, push, -push)) * self.box_noise
        return torch.cat(((centre + shift).clamp(0, 1), (sides * scale).clamp(1e-3, 1)), dim=-1)
