"""Encoder and decoder layers (one forward each, post- or pre-norm) and a transformer stage."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sdetr.model.attention import Attention


def _sublayer(x: Tensor, norm: nn.LayerNorm, norm_first: bool, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Residual sub-layer: ``x + fn(norm(x))`` (pre-norm) or ``norm(x + fn(x))`` (post-norm)."""
    if norm_first:
        return x + fn(norm(x))
    return norm(x + fn(x))


class _FFNMixin(nn.Module):
    """Shared ReLU feed-forward block with the original parameter names ``linear1``/``linear2``."""

    linear1: nn.Linear
    linear2: nn.Linear
    ffn_dropout: nn.Dropout
    out_dropout: nn.Dropout

    def _init_ffn(self, dim: int, ffn_dim: int, dropout: float) -> None:
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.out_dropout = nn.Dropout(dropout)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.out_dropout(self.linear2(self.ffn_dropout(torch.relu(self.linear1(x)))))


class EncoderLayer(_FFNMixin):
    """Self-attention (query = key = x + pos, value = x) then FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(dim, heads, dropout, kind="encoder_self")
        self._init_ffn(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """``x, pos [B, HW, E]``, ``key_padding_mask [B, HW]`` -> ``[B, HW, E]``."""

        def attend(h: Tensor) -> Tensor:
            return self.attn_dropout(self.self_attn(h + pos, h + pos, h, key_padding_mask))

        x = _sublayer(x, self.norm1, self.norm_first, attend)
        return _sublayer(x, self.norm2, self.norm_first, self._ffn)


class DecoderLayer(_FFNMixin):
    """Self-attention over queries, cross-attention to the encoder memory, then FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(dim, heads, dropout, kind="decoder_self")
        self.cross_attn = Attention(dim, heads, dropout, kind="decoder_cross")
        self._init_ffn(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.self_dropout = nn.Dropout(dropout)
        self.cross_dropout = nn.Dropout(dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        pos: Tensor,
        memory_mask: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """``tgt, query_pos [B, Q, E]``; ``memory, pos [B, HW, E]``; ``memory_mask [B, HW]``;
        ``self_attn_mask [Q, Q]`` (True = query i may not see query j; training-only denoising)."""

        def self_attend(h: Tensor) -> Tensor:
            return self.self_dropout(self.self_attn(h + query_pos, h + query_pos, h, attn_mask=self_attn_mask))

        def cross_attend(h: Tensor) -> Tensor:
            return self.cross_dropout(self.cross_attn(h + query_pos, memory + pos, memory, memory_mask))

        tgt = _sublayer(tgt, self.norm1, self.norm_first, self_attend)
        tgt = _sublayer(tgt, self.norm2, self.norm_first, cross_attend)
        return _sublayer(tgt, self.norm3, self.norm_first, self._ffn)


class Encoder(nn.Module):
    """A stack of encoder layers; a final LayerNorm only for pre-norm (as DETR)."""

    def __init__(self, layers: list[EncoderLayer], dim: int, norm_first: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim) if norm_first else None

    def forward(self, x: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    """A stack of decoder layers; one shared LayerNorm applied to every layer's output."""

    def __init__(self, layers: list[DecoderLayer], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        pos: Tensor,
        memory_mask: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Returns the normed output of every layer, ``[L, B, Q, E]``."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, pos, memory_mask, self_attn_mask)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)
