from __future__ import annotations

import pytest
import torch

from sdetr import Detector, build_model


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, 3, 96, 128]``; the second image is 64x96 with padding below and to the right."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    mask[1, :, 96:] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask
