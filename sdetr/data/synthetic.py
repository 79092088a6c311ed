"""Synthetic images drawn on the fly (no data on disk, no download)."""

from __future__ import annotations

import torch
from torch import Tensor


def synthetic_image(height: int, width: int, seed: int = 0, shapes: int = 4) -> Tensor:
    """``[3, H, W]`` RGB in [0, 1]: a noisy background with a few flat-coloured rectangles."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 0.2 + 0.4
    for _ in range(shapes):
        h, w = (int(x) for x in torch.randint(16, max(17, height // 2), (2,), generator=g))
        h, w = min(h, height), min(w, width)
        y = int(torch.randint(0, height - h + 1, (1,), generator=g))
        x = int(torch.randint(0, width - w + 1, (1,), generator=g))
        image[:, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=g)
    return image
