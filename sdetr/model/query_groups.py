"""Extra groups of object queries (Group DETR, Chen et al. 2023), a training aid that leaves inference unchanged.

During training the decoder gets ``groups - 1`` more groups of ``Q`` object queries beside the
model's own ``Q``. Each group has its own learned positional queries and starts from zeros, as the
model's queries do (stage 2 starts them from stage 1's output, as it does the model's). Each group
sees only itself in the decoder's self-attention and is matched to the targets one-to-one on its
own, with DETR's Hungarian matching and losses. So every object gets one positive query per group
in every step. Unlike one-to-many matching of the same queries (H-DETR), this does not teach the
model's queries to make duplicates, since within each group the matching stays one-to-one.

The groups ride on the denoising queries' path through the detector (a
:class:`~sdetr.model.denoising.DenoisingBatch`): they are placed before the denoising queries, and
:attr:`DenoisingBatch.query_groups` says how many there are. The model's own queries see neither,
so their outputs do not change (tested). The embeddings live in :class:`QueryGroups`, owned by the
trainer, so the detector gains no parameters.

One simplification against the paper: the model's queries have one positional embedding per
stage, but a group's positional queries are shared by both stages, as the denoising queries' box
embeddings are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.model.denoising import IGNORE, DenoisingBatch


def group_mask(
    num_queries: int, extra_groups: int, denoising_mask: Tensor | None, device: torch.device | None = None
) -> Tensor:
    """The self-attention mask with ``extra_groups`` groups placed after the model's queries.

    Args:
        num_queries: ``Q``, the model's queries (first).
        extra_groups: ``G``, groups of ``Q`` queries each (next).
        denoising_mask: ``[Q + D, Q + D]`` the denoising queries' mask (last), or None without them.
        device: where to make the mask (default: ``denoising_mask``'s device, else the CPU).
    Returns:
        ``[Q + G*Q + D, Q + G*Q + D]`` bool, True = blocked. The model's queries and each group see
        only themselves. The denoising queries see what ``denoising_mask`` let them see (the
        model's queries and their own group), and no extra group.
    """
    if device is None and denoising_mask is not None:
        device = denoising_mask.device
    extra = extra_groups * num_queries
    denoising = 0 if denoising_mask is None else denoising_mask.shape[0] - num_queries
    total = num_queries + extra + denoising
    blocked = torch.ones(total, total, dtype=torch.bool, device=device)
    group_of = torch.arange(num_queries + extra, device=device) // num_queries  # [Q + G*Q], 0: the model's
    blocked[: num_queries + extra, : num_queries + extra] = group_of[:, None] != group_of[None, :]
    if denoising_mask is not None:
        q, dn = num_queries, num_queries + extra  # where the denoising queries start, before and after
        blocked[dn:, :q] = denoising_mask[q:, :q]
        blocked[dn:, dn:] = denoising_mask[q:, q:]
    return blocked


class QueryGroups(nn.Module):
    """Makes the extra query groups of a batch (training only).

    Args:
        num_queries: the detector's ``num_queries`` (``Q``, the size of every group).
        dim: the detector's ``hidden_dim``.
        groups: query groups in all, the model's own included (2 or more; 1 would be no extra group).
    """

    def __init__(self, num_queries: int, dim: int, groups: int) -> None:
        super().__init__()
        if groups < 2:
            raise ValueError(f"groups={groups}; use 2 or more (the model's own queries are the first group)")
        self.num_queries, self.extra_groups = num_queries, groups - 1
        # initialised as nn.Embedding (and the model's query_embed) are: N(0, 1)
        self.position = nn.Parameter(torch.randn(groups - 1, num_queries, dim))  # [G, Q, E]

    def forward(self, batch_size: int, denoising: DenoisingBatch | None) -> DenoisingBatch:
        """The extra groups, followed by ``denoising``'s queries when there are any.

        Returns a :class:`DenoisingBatch` with ``D' = G*Q + D`` queries and ``query_groups = G``;
        the groups' ``labels`` are ``IGNORE`` (the denoising losses skip them; the criterion
        matches each group instead) and their ``boxes`` zeros.
        """
        count = self.extra_groups * self.num_queries
        dim = self.position.shape[-1]
        position = self.position.reshape(count, dim)[None].expand(batch_size, -1, -1)  # [B, G*Q, E]
        content = position.new_zeros(batch_size, count, dim)  # [B, G*Q, E]: zeros, as the model's start
        labels = torch.full((batch_size, count), IGNORE, dtype=torch.int64, device=position.device)
        boxes = position.new_zeros(batch_size, count, 4)
        previous = None if denoising is None else denoising.self_attn_mask
        mask = group_mask(self.num_queries, self.extra_groups, previous, position.device)
        parts = [content, position, labels, boxes]  # then the denoising queries' along dim 1, if any
        if denoising is not None:
            after = (denoising.content, denoising.position, denoising.labels, denoising.boxes)
            parts = [torch.cat((part, more), dim=1) for part, more in zip(parts, after, strict=True)]
        content, position, labels, boxes = parts
        return DenoisingBatch(content, position, mask, labels, boxes, self.extra_groups)
