"""benchmarks/gpu.py's inputs: the original recipe's image sizes and padded batches, and the
reference's freezing, which decides that both sides of the benchmark train the same parameters."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdetr import load_model
from tests import reference_impl
from tests.benchmarks import load_benchmark

gpu = load_benchmark("gpu")


@settings(max_examples=200, deadline=None)
@given(short=st.sampled_from(gpu.RECIPE_SHORT_SIDES), seed=st.integers(0, 2**16))
def test_recipe_sizes_keep_the_short_side_or_cap_the_long_side(short: int, seed: int) -> None:
    height, width = gpu.image_size(short, random.Random(seed))
    small, large = min(height, width), max(height, width)
    assert large <= gpu.MAX_LONG_SIDE
    if large < gpu.MAX_LONG_SIDE:  # not capped: the short side is the drawn one
        assert small == short
    else:  # capped: the short side shrank with it, never grew
        assert small <= short
    assert 1.33 <= large / small <= 1.52  # the drawn ratios, 4:3 to 1/0.66, give or take rounding


def test_batches_are_padded_bottom_right_with_the_mask_on_the_padding() -> None:
    images, mask, targets = gpu.make_batch([(40, 60), (50, 30)], torch.Generator().manual_seed(0), torch.device("cpu"))
    assert images.shape == (2, 3, 50, 60) and mask.shape == (2, 50, 60)
    assert int((~mask[0]).sum()) == 40 * 60 and bool((~mask[0, :40, :60]).all())
    assert int((~mask[1]).sum()) == 50 * 30 and bool((~mask[1, :50, :30]).all())
    assert bool((images[0, :, 40:] == 0).all()) and bool((images[1, :, :, 30:] == 0).all())
    assert [t["boxes"].shape for t in targets] == [(7, 4), (7, 4)]
    assert all(bool(((t["labels"] >= 1) & (t["labels"] <= 90)).all()) for t in targets)


@pytest.mark.parametrize("make", [reference_impl.RefSDETR, reference_impl.RefDETR], ids=["sdetr", "detr"])
def test_the_reference_freezes_what_the_project_freezes(make: type[torch.nn.Module]) -> None:
    """The original trained layer2-4 of the backbone only; so do the project's models."""
    reference = reference_impl.freeze_like_original_(make())
    ours = load_model(reference.state_dict())
    trainable_ref = {n for n, p in reference.named_parameters() if p.requires_grad}
    trainable_ours = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in reference.parameters() if not p.requires_grad) == sum(
        p.numel() for p in ours.parameters() if not p.requires_grad
    )
    backbone = [n for n in trainable_ref if n.startswith("backbone")]
    assert backbone and all(any(f".layer{i}." in n for i in (2, 3, 4)) for n in backbone)
    assert len(trainable_ref) == len(trainable_ours)
