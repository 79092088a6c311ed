"""The one attention implementation of sdetr.

Parameters are packed exactly like ``torch.nn.MultiheadAttention`` (``in_proj_weight``
``[3E, E]`` ordered q, k, v, ``in_proj_bias [3E]``, ``out_proj``), so original checkpoints map
one to one. Tensors are batch-first.

Two paths, numerically the same:
- fused: ``F.scaled_dot_product_attention`` whenever no attached probe needs the map A (the
  normal path; head gates, which see only the per-head outputs, run on it too);
- explicit: ``softmax(q k^T / sqrt(d) + mask)`` materialised, used only while a probe that
  reads or replaces A (a recorder, an attention patch from ``sdetr.instrument``) is attached.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionProbe(Protocol):
    """Something that watches or edits one attention site.

    A probe may set ``needs_weights = False`` when it only acts on the per-head outputs
    (``on_heads``): the site then stays on the fused path. Without the attribute a probe is
    taken to need the map A, which forces the explicit path.
    """

    def on_weights(self, site: Attention, q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
        """See ``q, k, v [B, heads, L, d]`` and ``a [B, heads, Lq, Lk]``; return the ``a`` to use."""
        ...

    def on_heads(self, site: Attention, heads_out: Tensor) -> Tensor:
        """See the per-head outputs ``[B, heads, Lq, d]`` (before out_proj); return those to use."""
        ...


def blocked_pairs(key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """The query-key pairs that may not attend, ``[B or 1, 1, Lq or 1, Lk]`` (True = blocked), or None.

    Args:
        key_padding_mask: ``[B, Lk]``, True on padded keys, or None.
        attn_mask: ``[Lq, Lk]``, True where query i may not see key j, or None.
    """
    blocked = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk]
    if attn_mask is not None:
        pairs = attn_mask[None, None]  # [1, 1, Lq, Lk]
        blocked = pairs if blocked is None else blocked | pairs
    return blocked


def attention_weights(q: Tensor, k: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None = None) -> Tensor:
    """Explicit attention map.

    Args:
        q: ``[B, heads, Lq, d]`` (unscaled projections).
        k: ``[B, heads, Lk, d]``.
        key_padding_mask: ``[B, Lk]``, True on padded keys, or None.
        attn_mask: ``[Lq, Lk]``, True where query i may not see key j (training-only denoising
            queries, :mod:`sdetr.model.denoising`), or None.
    Returns:
        ``a [B, heads, Lq, Lk]``, each row summing to 1, zero on padded or blocked keys.
    """
    logits = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # [B, h, Lq, Lk]
    blocked = blocked_pairs(key_padding_mask, attn_mask)
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    return logits.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head attention, ``nn.MultiheadAttention``-compatible parameters, batch-first.

    Attributes:
        site: stable dotted name of this layer (``stage1.encoder.0.self_attn``), set by the model.
        kind: ``"encoder_self"``, ``"decoder_self"`` or ``"decoder_cross"``.
        probes: attached probes; empty on the normal (fused) path.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, kind: str = "") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.kind = kind
        self.site = ""
        self.probes: list[AttentionProbe] = []
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``query [B, Lq, E]``, ``key/value [B, Lk, E]`` -> q, k, v ``[B, heads, L, d]``."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        batch = query.shape[0]

        def split(x: Tensor) -> Tensor:  # [B, L, E] -> [B, heads, L, d]
            return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        return (
            split(F.linear(query, w_q, b_q)),
            split(F.linear(key, w_k, b_k)),
            split(F.linear(value, w_v, b_v)),
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Args:
            query: ``[B, Lq, E]``; key, value: ``[B, Lk, E]``.
            key_padding_mask: ``[B, Lk]`` bool, True on padded keys.
            attn_mask: ``[Lq, Lk]`` bool, True where a query may not see a key (only with
                training-only denoising queries; None in inference).
        Returns:
            ``[B, Lq, E]``.
        """
        q, k, v = self.project(query, key, value)  # [B, heads, L, d]
        dropout = self.dropout if self.training else 0.0
        if self.probes and any(getattr(probe, "needs_weights", True) for probe in self.probes):
            heads_out = self._explicit(q, k, v, key_padding_mask, attn_mask, dropout)
        else:
            blocked = blocked_pairs(key_padding_mask, attn_mask)
            allowed = None if blocked is None else ~blocked
            heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
            for probe in self.probes:  # head-only probes (gates) on the fused output
                heads_out = probe.on_heads(self, heads_out)  # [B, heads, Lq, d]
        batch, _, length, _ = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(batch, length, self.embed_dim)  # [B, Lq, E]
        return self.out_proj(merged)

    def _explicit(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None, dropout: float
    ) -> Tensor:
        a = attention_weights(q, k, key_padding_mask, attn_mask)  # [B, heads, Lq, Lk]
        for probe in self.probes:
            a = probe.on_weights(self, q, k, v, a)
        heads_out = F.dropout(a, p=dropout) @ v  # [B, heads, Lq, d]
        for probe in self.probes:
            heads_out = probe.on_heads(self, heads_out)
        return heads_out

    def extra_repr(self) -> str:
        return f"site={self.site!r}, embed_dim={self.embed_dim}, num_heads={self.num_heads}"
