"""The stem's max pool: the fast paths give PyTorch's values and gradients bit for bit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sdetr import BACKBONE_SPEEDS, build_model
from sdetr.model.max_pool import is_stem_pool, separable_max_pool, stem_max_pool

STEM_POOL = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def _with_ties(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A ReLU output on a coarse grid: many windows tie, at zero and elsewhere."""
    return (torch.randint(-3, 4, shape, generator=generator).float() / 2).relu()


def test_separable_pool_by_hand() -> None:
    rows = [[1.0, 5.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 9.0, 0.0], [4.0, 0.0, 0.0, 0.0, 7.0]]
    x = torch.tensor([[rows]])  # [1, 1, 3, 5]
    # Output (i, j) is the maximum over rows 2i-1..2i+1 and columns 2j-1..2j+1 that exist.
    expected = torch.tensor([[[[5.0, 9.0, 9.0], [4.0, 9.0, 9.0]]]])  # [1, 1, 2, 3]
    assert torch.equal(separable_max_pool(x), expected)
    assert torch.equal(F.max_pool2d(x, 3, 2, 1), expected)
    # One image, one channel, two rows: the even rows' view is already contiguous, and must not be
    # returned (or written) in place of a copy.
    two_rows = x[:, :, :2]  # [1, 1, 2, 5]
    assert torch.equal(separable_max_pool(two_rows.contiguous()), torch.tensor([[[[5.0, 9.0, 9.0]]]]))


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 3),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    specials=st.sampled_from(["none", "nan", "inf"]),
)
def test_separable_pool_is_torchs_bit_for_bit(
    batch: int, channels: int, height: int, width: int, seed: int, specials: str
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator)
    if specials != "none":
        x[0, channels - 1, height // 2, width // 2] = float("nan") if specials == "nan" else -float("inf")
        x[batch - 1, 0, 0, width - 1] = float("inf")
    computed, expected = separable_max_pool(x), F.max_pool2d(x, 3, 2, 1)
    assert computed.shape == expected.shape and computed.is_contiguous()
    assert torch.equal(computed.isnan(), expected.isnan())
    assert torch.equal(computed.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stem_pool_gives_torchs_values_and_gradient_with_ties(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = _with_ties((2, 8, 13, 10), generator).to(dtype)
    grad_out = torch.randn(2, 8, 7, 5, generator=generator).to(dtype)
    results = []
    for pool in (STEM_POOL, lambda t: stem_max_pool(STEM_POOL, t)):
        leaf = x.clone().requires_grad_()
        values = pool(leaf)
        values.backward(grad_out)
        assert leaf.grad is not None
        results.append((values.detach(), leaf.grad))
    (expected, expected_grad), (values, grad) = results
    assert torch.equal(values, expected) and torch.equal(grad, expected_grad)
    assert values.is_contiguous() and grad.is_contiguous()  # NCHW, like the input
    assert (expected_grad != 0).sum() < x.numel() / 2  # ties: each window passes its gradient to one input
    with torch.no_grad():
        assert torch.equal(stem_max_pool(STEM_POOL, x), expected)


def test_stem_pool_falls_back_to_the_module_where_it_could_differ() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 9, 9, generator=generator)
    calls: list[int] = []
    hooked = torch.nn.MaxPool2d(3, 2, 1)
    handle = hooked.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert torch.equal(stem_max_pool(hooked, x), F.max_pool2d(x, 3, 2, 1))
    finally:
        handle.remove()
    assert calls == [1]  # the hook saw the module's own call
    assert not is_stem_pool(torch.nn.MaxPool2d(2, 2)) and not is_stem_pool(torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert is_stem_pool(torch.nn.MaxPool2d((3, 3), (2, 2), (1, 1)))
    other = torch.nn.MaxPool2d(2, 2)
    assert torch.equal(stem_max_pool(other, x), F.max_pool2d(x, 2, 2))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(stem_max_pool(STEM_POOL, nhwc), F.max_pool2d(x, 3, 2, 1))


def test_group_norm_training_step_gradients_equal_torchvisions_pool(padded_batch) -> None:  # type: ignore[no-untyped-def]
    """A GroupNorm backbone with the ResNet stem, trained (the quickstart's until the patchify
    stem), with and without the fast pool."""
    images, mask = padded_batch
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", dropout=0.0, backbone_stem="resnet").train()  # a patchify stem has no pool
    grads = []
    for fast in (False, True):
        model.set_speed(dataclasses.replace(BACKBONE_SPEEDS["default"], fast_max_pool=fast))
        model.zero_grad()
        sum(features.mean() for features, _ in model.backbone(images, mask).values()).backward()
        grads.append([p.grad.clone() for p in model.backbone.parameters() if p.grad is not None])
    assert len(grads[1]) == len(grads[0]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))
    assert model.backbone.body.conv1.weight.grad is not None  # the gradient went through the pool
    assert model.backbone.body.conv1.weight.grad.abs().max() > 0


def _ops(run: Callable[[], object]) -> dict[str, int]:
    """How often each aten operation ran during ``run()``."""
    with torch.profiler.profile() as profile:
        run()
    return {event.key: event.count for event in profile.key_averages()}


def test_each_speed_takes_its_pool_path(padded_batch) -> None:  # type: ignore[no-untyped-def]
    """The fast paths really run (the value tests alone would pass on a fallback)."""
    images, mask = padded_batch
    model = build_model("sdetr-tiny", dropout=0.0, backbone_stem="resnet")  # the stem with the max pool
    with torch.no_grad():
        model.set_speed("exact")
        exact = _ops(lambda: model.backbone(images, mask))
        model.set_speed("default")
        default = _ops(lambda: model.backbone(images, mask))
    assert exact.get("aten::max_pool2d_with_indices") == 1 and "aten::maximum" not in exact
    assert "aten::max_pool2d_with_indices" not in default and default.get("aten::maximum") == 4  # 2 per axis
    model.train()
    training = _ops(lambda: sum(f.mean() for f, _ in model.backbone(images, mask).values()).backward())
    assert training.get("_ChannelsLastPool") == 1
    assert training.get("aten::max_pool2d_with_indices_backward") == 1
