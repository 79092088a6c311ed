"""Backbone speeds: folded batch norm, channels-last, and torchvision's path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr import BACKBONE_SPEEDS, BackboneSpeed, build_model, load_model
from sdetr.model.resnet_blocks import conv_norm


def _frozen_bn_model(preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(preset, backbone_norm="frozen_bn", dropout=0.0).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # non-trivial statistics, so folding has something to fold
        if isinstance(module, FrozenBatchNorm2d):
            size = module.running_var.shape
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
            module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return model


def test_conv_norm_folding_by_hand() -> None:
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=True)
    norm = FrozenBatchNorm2d(3)
    norm.weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
    norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    norm.running_mean.copy_(torch.tensor([1.0, 0.0, -1.0]))
    norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    x = torch.randn(2, 2, 5, 5)
    expected = norm(conv(x))  # (conv - mean) / sqrt(var + eps) * weight + bias
    torch.testing.assert_close(conv_norm(conv, norm, x, fold=True), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(conv_norm(conv, norm, x, fold=False), expected)


def _norms_run(model: torch.nn.Module, run: Callable[[], object]) -> tuple[bool, bool]:
    """Whether the stem's and a block's batch norm modules were called during ``run()``
    (a folded pair calls neither: its convolution applies the folded weights). The hooks
    themselves send unfolded inference in those two places through torchvision's forward."""
    body = model.backbone.body
    called = {"stem": False, "block": False}
    handles = [
        body.bn1.register_forward_hook(lambda *_: called.__setitem__("stem", True)),
        body.layer3[0].bn1.register_forward_hook(lambda *_: called.__setitem__("block", True)),
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return called["stem"], called["block"]


def _runs_channels_last(model: torch.nn.Module, run: Callable[[], object]) -> bool:
    """Whether layer1 received an NHWC (channels-last) tensor during ``run()``."""
    seen: list[bool] = []

    def check(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    handle = model.backbone.body.layer1.register_forward_pre_hook(check)
    try:
        run()
    finally:
        handle.remove()
    assert seen
    return all(seen)


SPEEDS = ["default", "fast", BackboneSpeed(fold_inference=True)]


@pytest.mark.parametrize("speed", SPEEDS, ids=["default", "fast", "folded-dense"])
@pytest.mark.parametrize("preset", ["sdetr-tiny", "detr"])
def test_every_speed_equals_torchvision_on_a_padded_batch(
    preset: str, speed: str | BackboneSpeed, padded_batch
) -> None:  # type: ignore[no-untyped-def]
    images, mask = padded_batch
    model = _frozen_bn_model(preset)
    with torch.no_grad():
        model.set_speed("exact")
        exact = model(images, mask)
        model.set_speed(speed)
        computed = model(images, mask)
        norms_run = _norms_run(model, lambda: model(images, mask))
        model.set_speed("exact")
        again = model(images, mask)
    folded = speed != "default"  # the default folds in training steps only
    assert norms_run == (not folded, not folded)
    with torch.no_grad():
        assert _runs_channels_last(model.set_speed(speed), lambda: model(images, mask)) == (speed == "fast")
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(computed[key], exact[key], atol=1e-5, rtol=0)
        assert torch.equal(again[key], exact[key])  # "exact" is torchvision's path, whatever ran before
        if not folded:
            assert torch.equal(computed[key], exact[key])


def _in_place_norms(run: Callable[[], object]) -> int:
    """How many in-place multiplications ran during ``run()``: one per batch norm applied in place."""
    with torch.profiler.profile() as profile:
        run()
    return sum(event.count for event in profile.key_averages() if event.key == "aten::mul_")


def test_default_inference_runs_in_place_unless_a_hook_or_autograd_is_watching(padded_batch) -> None:  # type: ignore[no-untyped-def]
    """ResNet-50 has 53 frozen batch norms (stem, 3 per block x 16, 4 downsamples): the default
    applies each in place in inference, bit for bit torchvision's result; a forward hook on a
    block's module sends that block (4 norms in layer2[0]) through torchvision's forward, a global
    hook or autograd every block."""
    images, mask = padded_batch
    model = _frozen_bn_model("detr")
    backbone = model.backbone

    def features() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return backbone(images, mask)

    with torch.no_grad():
        model.set_speed("exact")
        exact, exact_count = features(), _in_place_norms(features)
        model.set_speed("default")
        assert _in_place_norms(features) - exact_count == 53
        for level, (computed, _) in features().items():
            assert torch.equal(computed, exact[level][0]), level

        conv = backbone.body.layer2[0].conv1
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = conv.register_forward_hook(lambda _, args, out: seen.append((args[0], out)))
        try:
            assert _in_place_norms(features) - exact_count == 53 - 4
        finally:
            handle.remove()
        assert torch.equal(seen[0][1], conv(seen[0][0]))  # the hook's output was not overwritten

        body = backbone.body
        for module, falls_back in [
            (body.bn1, 1),  # the stem's pair
            (body.layer2[0].downsample, 4),  # the Sequential is one of the block's modules
            (body.layer3[1].bn2, 3),  # a forward pre-hook counts too
        ]:
            register = (
                module.register_forward_pre_hook if module is body.layer3[1].bn2 else module.register_forward_hook
            )
            handle = register(lambda *_: None)
            try:
                assert _in_place_norms(features) - exact_count == 53 - falls_back, module
            finally:
                handle.remove()

        handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
        try:
            assert _in_place_norms(features) == exact_count
        finally:
            handle.remove()
    assert _in_place_norms(features) == exact_count  # eval mode, autograd on: torchvision's forward


def test_in_place_inference_under_autocast_is_torchvisions_result(padded_batch) -> None:  # type: ignore[no-untyped-def]
    """Under bf16 autocast torchvision's batch norm promotes the convolution's bf16 output to
    float32; the in-place path must give that float32 result too, not a bf16 one."""
    images, mask = padded_batch
    backbone = _frozen_bn_model("detr").backbone
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.set_speed("exact")
        exact = backbone(images, mask)
        backbone.set_speed("default")
        computed = backbone(images, mask)
    for level, (features, _) in computed.items():
        assert features.dtype == exact[level][0].dtype == torch.float32
        assert torch.equal(features, exact[level][0]), level


def test_unknown_speed_names_the_choices() -> None:
    with pytest.raises(ValueError, match="default, fast, exact"):
        build_model("sdetr-tiny").set_speed("fastest")


@pytest.mark.parametrize("preset", ["sdetr-tiny", "detr"])  # BasicBlock and Bottleneck
def test_folded_training_steps_give_torchvisions_gradients(preset: str, padded_batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = padded_batch
    # One thread, as under xdist: at 2 threads oneDNN's backward kernels differ, and detr's
    # gradient moves by more than this tolerance between thread counts on the exact path alone.
    torch.set_num_threads(1)  # the autouse fixture restores the count
    model = _frozen_bn_model(preset).train()
    weight = model.backbone.body.layer3[0].conv1.weight

    def grad() -> torch.Tensor:
        """d(mean of every returned feature map) / d(a layer3 weight). The backbone's own output:
        through the random stages the gradient would be ill-conditioned (detr's differs by 1.5 %
        between 1 and 2 threads on the exact path alone)."""
        model.zero_grad()
        sum(features.mean() for features, _ in model.backbone(images, mask).values()).backward()
        assert weight.grad is not None
        return weight.grad.clone()

    model.set_speed("exact")
    assert _norms_run(model, grad) == (True, True) and not _runs_channels_last(model, grad)
    exact = grad()
    assert exact.abs().max() > 0
    for speed in ("default", "fast"):
        model.set_speed(speed)
        assert _norms_run(model, grad) == (False, False)  # folded in the training step
        assert _runs_channels_last(model, grad)
        torch.testing.assert_close(grad(), exact, atol=1e-5 * float(exact.abs().max()), rtol=1e-4)
    model.set_speed("default").eval()  # eval mode with autograd on (attributions): torchvision's
    assert _norms_run(model, grad) == (True, True) and not _runs_channels_last(model, grad)


def test_group_norm_backbones_always_run_torchvisions_blocks(padded_batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = padded_batch
    model = build_model("sdetr-tiny").train()  # GroupNorm: nothing to fold, and NHWC is slower
    body = model.backbone.body
    blocks = [block for layer in (body.layer1, body.layer2, body.layer3, body.layer4) for block in layer]
    for speed in BACKBONE_SPEEDS:
        model.set_speed(speed)
        assert not any(block.fold_training or block.fold_inference for block in blocks)
        assert not _runs_channels_last(model, lambda: model.backbone(images, mask))


def test_load_model_sets_the_speed_and_compiles_only_when_asked() -> None:
    state = _frozen_bn_model("sdetr-tiny").state_dict()
    config = build_model("sdetr-tiny", backbone_norm="frozen_bn", dropout=0.0).config
    plain = load_model(state, config=config)
    assert plain.backbone.speed == BACKBONE_SPEEDS["default"] and not plain.backbone.speed.fold_inference
    assert load_model(state, config=config, speed="fast").backbone.speed.channels_last_inference
    assert not load_model(state, config=config, speed="exact").backbone.speed.fold_training
    assert plain.backbone._compiled_call_impl is None  # nn.Module.compile() sets it
    compiled = load_model(state, config=config, compile=True)  # compiling itself happens at the first call
    parts = [compiled.backbone, *compiled.stages]
    assert all(part._compiled_call_impl is not None for part in parts)
    assert compiled.class_embed._compiled_call_impl is None  # the heads and input checks stay eager
    assert set(compiled.state_dict()) == set(state)  # in-place compiling keeps the checkpoint's names


@pytest.mark.parametrize(("speed", "training"), [("default", False), ("fast", True)])
def test_compiled_parts_trace_whole_and_compute_the_same(speed: str, training: bool, padded_batch) -> None:  # type: ignore[no-untyped-def]
    """Dynamo captures the backbone and every stage in one graph each (``fullgraph``: a graph break
    would raise), and the captured graphs give the eager outputs: the default's inference and fast
    mode's folded, channels-last training step. The ``eager`` backend runs the captured graph
    without inductor's code generation, which keeps this test to seconds."""
    images, mask = padded_batch
    model = _frozen_bn_model("sdetr-tiny").set_speed(speed).train(training)
    try:
        with torch.set_grad_enabled(training):
            eager = model(images, mask)
            model.compile_parts(backend="eager", fullgraph=True, dynamic=True)
            compiled = model(images, mask)
    finally:
        torch._dynamo.reset()  # no captured graphs or guards left for the other tests
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-6, rtol=0)
    if training:
        compiled["pred_boxes"].sum().backward()  # the compiled training step differentiates
        assert model.backbone.body.layer3[0].conv1.weight.grad is not None
