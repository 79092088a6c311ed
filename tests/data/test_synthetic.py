from __future__ import annotations

import torch

from sdetr.data import synthetic_image


def test_deterministic_and_in_range() -> None:
    a, b = synthetic_image(64, 96, seed=5), synthetic_image(64, 96, seed=5)
    assert a.shape == (3, 64, 96) and torch.equal(a, b)
    assert not torch.equal(a, synthetic_image(64, 96, seed=6))
    assert a.min() >= 0 and a.max() <= 1
