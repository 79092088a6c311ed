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
from sdetr.model.blocked_layout import _blocked_alias, blocked_layout_available

pytestmark = pytest.mark.skipif(
    not blocked_layout_available(), reason="no oneDNN here, or its convolution outputs cannot be aliased"
)


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
        alias = _blocked_alias(out)
        assert alias is not None
        assert alias.shape[-1] > 1  # oneDNN's blocked layout, not plain NCHW
        assert torch.equal(_unblock(alias), out.to_dense())


@settings(max_examples=30, deadline=None)
@given(
    channels_in=st.sampled_from([3, 16, 64]),
    channels_out=st.sampled_from([16, 20, 64]),
    kernel=st.sampled_from([1, 3, 7]),
    batch=st.integers(1, 2),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    threads=st.integers(1, 2),
)
def test_blocked_conv_norm_is_the_dense_paths_bit_for_bit(
    channels_in: int,
    channels_out: int,
    kernel: int,
    batch: int,
    height: int,
    width: int,
    stride: int,
    dilation: int,
    bias: bool,
    threads: int,
) -> None:
    """Whatever kernel PyTorch picks for the dense input (oneDNN, or its own for small inputs
    and 1x1 convolutions on one thread), and whatever the layout (20 channels: padded, through
    the dense detour), the blocked path gives the dense path's numbers."""
    padding = dilation * (kernel // 2)
    conv = torch.nn.Conv2d(channels_in, channels_out, kernel, stride, padding, dilation, bias=bias)
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
    for shape in ([1, 3, 50, 50], [1, 3, 100, 100], [2, 3, 7, 9]):  # as PyTorch decides for a real input
        real = torch._C._select_conv_backend(  # type: ignore[attr-defined]
            torch.randn(shape), conv.weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None
        )
        assert blocked_layout.dense_convolution_is_onednn(conv, torch.Size(shape)) == (
            real == torch._C._ConvBackend.Mkldnn  # type: ignore[attr-defined]
        )


def test_alias_of_a_plain_tensor_and_writes_through_it() -> None:
    x = torch.randn(2, 5, 3, 4)
    plain = x.to_mkldnn()
    alias = _blocked_alias(plain)
    assert alias is not None and alias.shape == (2, 5, 3, 4, 1)
    assert torch.equal(_unblock(alias), x)
    alias[1, 2, 0, 3, 0] = 7.0
    assert plain.to_dense()[1, 2, 0, 3] == 7.0


def _tampered(blob: torch.Tensor, offset: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stand-in for the descriptor reader that returns ``blob`` with the byte at ``offset``
    changed."""

    def serialized(_: torch.Tensor) -> torch.Tensor:
        changed = blob.clone()
        changed[offset] += 1
        return changed

    return serialized


def test_no_alias_where_the_layout_cannot_be_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 16, 3, 4)
    assert _blocked_alias(x) is None  # dense
    assert _blocked_alias(torch.randn(4, 16).to_mkldnn()) is None  # not 4-D
    assert _blocked_alias(x.to(torch.bfloat16).to_mkldnn()) is None  # not float32
    with torch.no_grad():
        blocked = torch.nn.Conv2d(16, 32, 3, padding=1)(x.to_mkldnn())  # nChw16c (or another block)
        padded = torch.nn.Conv2d(16, 20, 3, padding=1)(x.to_mkldnn())  # 20 channels padded to a block
    assert _blocked_alias(padded) is None
    layout = blocked_layout
    for tensor, offsets in [
        (x.to_mkldnn(), [layout._DIMS, layout._DATA_TYPE, layout._PADDED_DIMS + 8, layout._FORMAT_KIND]),
        (x.to_mkldnn(), [layout._STRIDES + 16, layout._INNER_NBLKS, layout._OFFSET0, layout._PADDED_OFFSETS + 24]),
        (blocked, [layout._INNER_BLKS, layout._INNER_IDXS, layout._STRIDES + 8, layout._INNER_NBLKS]),
    ]:
        assert _blocked_alias(tensor) is not None
        blob = torch.ops.mkldnn._get_mkldnn_serialized_md(tensor)
        for offset in offsets:
            monkeypatch.setattr(torch.ops.mkldnn, "_get_mkldnn_serialized_md", _tampered(blob, offset))
            assert _blocked_alias(tensor) is None, offset
        monkeypatch.undo()


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
        monkeypatch.setattr(blocked_layout, "_blocked_alias", lambda _: None)
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
    forward, plus one per dense detour (a convolution given PyTorch's own kernel, or a batch
    norm on a layout that cannot be aliased)."""
    with torch.profiler.profile() as profile:
        run()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::to_mkldnn")


@pytest.mark.parametrize(
    ("preset", "overrides", "images_kept", "size", "threads", "blocked"),
    [
        ("detr", {}, 2, None, 2, True),
        ("detr", {"dilation": True}, 2, None, 2, True),
        ("sdetr", {}, 2, (101, 141), 2, True),
        ("detr", {"backbone": "resnet18"}, 2, (101, 141), 2, True),
        ("detr", {}, 1, None, 2, True),
        ("detr", {}, 2, None, 1, False),
    ],
    ids=["detr", "dilated C5", "sdetr C4 and C5, odd size", "ResNet-18", "one image", "one thread"],
)
def test_default_inference_is_blocked_where_it_pays_and_bit_for_bit_torchvisions(
    preset: str,
    overrides: dict[str, object],
    images_kept: int,
    size: tuple[int, int] | None,
    threads: int,
    blocked: bool,
    padded_batch,  # type: ignore[no-untyped-def]
) -> None:
    """On one small image PyTorch gives layer4's small convolutions its own kernel, not oneDNN:
    the blocked path follows on dense copies. On one thread it gives every 1x1 convolution its
    own kernel: the backbone then stays NCHW."""
    images, mask = padded_batch
    images, mask = images[-images_kept:], mask[-images_kept:]
    if size is not None:
        images, mask = images[..., : size[0], : size[1]].contiguous(), mask[..., : size[0], : size[1]]
    backbone = _frozen_bn_model(preset, **overrides).backbone
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
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: None)  # global
        try:
            assert _blocked_forwards(forward) == 0
        finally:
            handle.remove()
        channels_last = images.contiguous(memory_format=torch.channels_last)  # NHWC: other kernels
        assert _blocked_forwards(lambda: backbone(channels_last, mask)) == 0
        assert _blocked_forwards(forward) == 1
        backbone.set_speed("fast")  # folded: not torchvision's numbers to begin with
        assert _blocked_forwards(forward) == 0
        group_norm = build_model("sdetr-tiny").eval().backbone
        assert _blocked_forwards(lambda: group_norm(images, mask)) == 0
    backbone.set_speed("default")
    with _threads(2):
        assert _blocked_forwards(forward) == 0  # autograd on
