"""oneDNN blocked-layout inference: the dense alias, the in-place frozen batch norm, and when the
backbone keeps the blocked layout."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr import BackboneSpeed, build_model
from sdetr.model import blocked_layout, resnet_blocks
from sdetr.model.blocked_layout import blocked_alias, blocked_layout_available

pytestmark = pytest.mark.skipif(not blocked_layout_available(), reason="PyTorch built without oneDNN")


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``count`` inside, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _unblock(alias: torch.Tensor) -> torch.Tensor:
    """``[N, C / b, H, W, b]`` -> ``[N, C, H, W]``: channel ``c`` is ``(c // b, c % b)``."""
    n, outer, h, w, block = alias.shape
    return alias.permute(0, 1, 4, 2, 3).reshape(n, outer * block, h, w)


@settings(max_examples=12, deadline=None)
@given(
    channels_in=st.sampled_from([3, 16, 64]),
    channels_out=st.sampled_from([16, 48, 64, 256]),
    batch=st.integers(1, 2),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
    stride=st.integers(1, 2),
)
def test_alias_of_a_convolution_output_is_its_dense_tensor(
    channels_in: int, channels_out: int, batch: int, height: int, width: int, stride: int
) -> None:
    conv = torch.nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
    x = torch.randn(batch, channels_in, height, width)
    with torch.no_grad():
        out = conv(x.to_mkldnn())
        alias = blocked_alias(out)
        assert alias is not None
        assert alias.shape[-1] > 1  # oneDNN's blocked layout, not plain NCHW
        assert torch.equal(_unblock(alias), out.to_dense())


@settings(max_examples=20, deadline=None)
@given(
    channels_in=st.sampled_from([3, 16, 64]),
    channels_out=st.sampled_from([16, 64]),
    kernel=st.sampled_from([1, 3, 7]),
    batch=st.integers(1, 2),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    stride=st.integers(1, 2),
    threads=st.integers(1, 2),
)
def test_blocked_conv_norm_is_the_dense_paths_bit_for_bit(
    channels_in: int, channels_out: int, kernel: int, batch: int, height: int, width: int, stride: int, threads: int
) -> None:
    """Whatever kernel PyTorch picks for the dense input (oneDNN, or its own for small inputs
    and 1x1 convolutions on one thread), the blocked path gives the dense path's numbers."""
    conv = torch.nn.Conv2d(channels_in, channels_out, kernel, stride, kernel // 2, bias=False)
    norm = _norm(channels_out, seed=kernel)
    x = torch.randn(batch, channels_in, height, width)
    with _threads(threads), torch.no_grad():
        expected = norm(conv(x))
        computed = resnet_blocks.conv_norm(conv, norm, x.to_mkldnn(), fold=False, in_place=True)
    assert computed.is_mkldnn
    assert torch.equal(computed.to_dense(), expected)


def test_the_dense_kernel_choice_is_read_from_pytorch() -> None:
    conv = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    assert blocked_layout.dense_convolution_is_onednn(conv, torch.Size([2, 3, 1, 1]))  # a batch: oneDNN
    assert not blocked_layout.dense_convolution_is_onednn(conv, torch.Size([1, 3, 1, 1]))  # one tiny image: not


def test_alias_of_a_plain_tensor_and_writes_through_it() -> None:
    x = torch.randn(2, 5, 3, 4)
    plain = x.to_mkldnn()
    alias = blocked_alias(plain)
    assert alias is not None and alias.shape == (2, 5, 3, 4, 1)
    assert torch.equal(_unblock(alias), x)
    alias[1, 2, 0, 3, 0] = 7.0
    assert plain.to_dense()[1, 2, 0, 3] == 7.0


def test_no_alias_where_the_layout_cannot_be_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 16, 3, 4)
    assert blocked_alias(x) is None  # dense
    assert blocked_alias(torch.randn(4, 16).to_mkldnn()) is None  # not 4-D
    assert blocked_alias(x.to(torch.bfloat16).to_mkldnn()) is None  # not float32
    real = torch.ops.mkldnn._get_mkldnn_serialized_md
    blob = real(x.to_mkldnn())

    def tampered(offset: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def serialized(_: torch.Tensor) -> torch.Tensor:
            changed = blob.clone()
            changed[offset] += 1
            return changed

        return serialized

    assert blocked_alias(x.to_mkldnn()) is not None
    for offset in (
        blocked_layout._DIMS,
        blocked_layout._DATA_TYPE,
        blocked_layout._PADDED_DIMS + 8,
        blocked_layout._FORMAT_KIND,
        blocked_layout._STRIDES + 16,
        blocked_layout._INNER_NBLKS,
    ):
        monkeypatch.setattr(torch.ops.mkldnn, "_get_mkldnn_serialized_md", tampered(offset))
        assert blocked_alias(x.to_mkldnn()) is None, offset


def _norm(channels: int, seed: int) -> FrozenBatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    norm = FrozenBatchNorm2d(channels)
    norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
    norm.bias.copy_(torch.randn(channels, generator=generator))
    norm.running_mean.copy_(torch.randn(channels, generator=generator))
    norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.1)
    return norm


@pytest.mark.parametrize("detour", [False, True], ids=["alias", "dense detour"])
def test_frozen_norm_in_the_blocked_layout_is_torchvisions_bit_for_bit(
    detour: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if detour:  # a layout the alias does not accept: the same numbers through a dense copy
        monkeypatch.setattr(resnet_blocks, "blocked_alias", lambda _: None)
    conv, norm = torch.nn.Conv2d(16, 64, 3, padding=1, bias=False), _norm(64, seed=3)
    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        expected = norm(conv(x))
        computed = resnet_blocks.frozen_norm_(norm, conv(x.to_mkldnn()))
    assert computed.is_mkldnn
    assert torch.equal(computed.to_dense(), expected)


def _frozen_bn_model(preset: str, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(preset, backbone_norm="frozen_bn", dropout=0.0, **overrides).eval()
    for index, module in enumerate(model.modules()):
        if isinstance(module, FrozenBatchNorm2d):
            module.load_state_dict(_norm(module.weight.numel(), seed=index).state_dict())
    return model


def _blocked_forwards(run: Callable[[], object]) -> int:
    """How many tensors entered oneDNN's layout during ``run()``: the images once per blocked
    forward, plus one per convolution that took PyTorch's own kernel on a dense copy."""
    with torch.profiler.profile() as profile:
        run()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::to_mkldnn")


@pytest.mark.parametrize(
    ("overrides", "images_kept", "threads", "blocked"),
    [({}, 2, 2, True), ({"dilation": True}, 2, 2, True), ({}, 1, 2, True), ({}, 2, 1, False)],
    ids=["detr", "dilated C5", "one image", "one thread"],
)
def test_default_inference_is_blocked_where_it_pays_and_bit_for_bit_torchvisions(
    overrides: dict[str, object], images_kept: int, threads: int, blocked: bool, padded_batch
) -> None:  # type: ignore[no-untyped-def]
    """On one small image PyTorch gives layer4's small convolutions its own kernel, not oneDNN:
    the blocked path follows on dense copies. On one thread it gives every 1x1 convolution its
    own kernel: the backbone then stays NCHW."""
    images, mask = padded_batch
    images, mask = images[-images_kept:], mask[-images_kept:]
    backbone = _frozen_bn_model("detr", **overrides).backbone
    with _threads(threads):
        entries = _compare_blocked_with_exact(backbone, images, mask)
    if not blocked:
        assert entries == 0
    elif images_kept == 1:
        assert entries > 1  # the images, then a dense detour per small late convolution
    else:
        assert entries == 1  # the images, once


def _compare_blocked_with_exact(backbone: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> int:
    """Checks the default's blocked inference against ``exact``; returns its oneDNN entries."""
    with torch.no_grad():
        backbone.set_speed("exact")
        exact = backbone(images, mask)
        assert _blocked_forwards(lambda: backbone(images, mask)) == 0
        backbone.set_speed("default")
        computed = backbone(images, mask)
        entries = _blocked_forwards(lambda: backbone(images, mask))
        backbone.set_speed(BackboneSpeed(blocked_inference=False))
        assert _blocked_forwards(lambda: backbone(images, mask)) == 0
    for level, (features, level_mask) in computed.items():
        assert features.layout == torch.strided and features.is_contiguous()
        assert torch.equal(features, exact[level][0]), level
        assert torch.equal(level_mask, exact[level][1])
    return entries


def test_blocked_only_where_it_is_exact_and_nothing_watches(padded_batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = padded_batch
    backbone = _frozen_bn_model("detr").backbone

    def forward() -> object:
        return backbone(images, mask)

    with _threads(2), torch.no_grad():  # on one thread the backbone stays NCHW anyway (above)
        assert _blocked_forwards(forward) == 1
        handle = backbone.body.layer4[2].conv3.register_forward_hook(lambda *_: None)  # any module of the body
        try:
            assert _blocked_forwards(forward) == 0
        finally:
            handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _blocked_forwards(forward) == 0
        backbone.set_speed("fast")  # folded: not torchvision's numbers to begin with
        assert _blocked_forwards(forward) == 0
        group_norm = build_model("sdetr-tiny").eval().backbone
        assert _blocked_forwards(lambda: group_norm(images, mask)) == 0
    backbone.set_speed("default")
    with _threads(2):
        assert _blocked_forwards(forward) == 0  # autograd on
