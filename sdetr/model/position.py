"""Position embeddings for feature maps: fixed sine (DETR) or learned row/column tables."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sine_waves(values: Tensor, channels: int, temperature: float = 10000.0) -> Tensor:
    """DETR's sine encoding of scalars: ``values [...]`` -> ``[..., channels]``, each value divided by
    ``temperature ** (2 * (i // 2) / channels)``, sin on even and cos on odd channels."""
    i = torch.arange(channels, dtype=torch.float32, device=values.device)
    dim_t = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / channels)  # [channels]
    angles = values[..., None] / dim_t  # [..., channels]
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEmbedding(nn.Module):
    """DETR's sine embedding, normalised to the unpadded region of each image.

    Running sums of the not-padded mask give y and x in ``(0, 1]`` of the valid region, scaled
    by 2*pi; each axis gets ``dim // 2`` interleaved sin/cos channels; y comes before x.
    """

    def __init__(self, dim: int = 256, temperature: float = 10000.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"sine position embedding needs dim divisible by 4, got {dim}")
        self.num_pos_feats = dim // 2
        self.temperature = temperature

    def forward(self, mask: Tensor) -> Tensor:
        """``mask [B, H, W]`` (True = padded) -> ``pos [B, dim, H, W]``."""
        not_mask = (~mask).to(torch.float32)
        eps, scale = 1e-6, 2 * math.pi
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
        pos_x = sine_waves(x_embed, self.num_pos_feats, self.temperature)  # [B, H, W, F]
        pos_y = sine_waves(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, H, W]


class LearnedPositionEmbedding(nn.Module):
    """Learned absolute embeddings: a row table and a column table of 50 entries each."""

    def __init__(self, dim: int = 256, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, dim // 2)
        self.col_embed = nn.Embedding(max_size, dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask [B, H, W]`` -> ``pos [B, dim, H, W]`` (x part first, as DETR)."""
        batch, height, width = mask.shape
        limit = self.row_embed.num_embeddings
        if height > limit or width > limit:
            raise ValueError(
                f"learned position embedding covers at most {limit}x{limit} cells, "
                f"got a {height}x{width} feature map; use position='sine' or smaller inputs"
            )
        x_emb = self.col_embed(torch.arange(width, device=mask.device))  # [W, F]
        y_emb = self.row_embed(torch.arange(height, device=mask.device))  # [H, F]
        pos = torch.cat(
            (x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)), dim=-1
        )  # [H, W, 2F]
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def build_position_embedding(kind: str, dim: int) -> nn.Module:
    if kind == "sine":
        return SinePositionEmbedding(dim)
    if kind == "learned":
        return LearnedPositionEmbedding(dim)
    raise ValueError(f"position={kind!r}; use 'sine' or 'learned'")
