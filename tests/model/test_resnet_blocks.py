"""The scaled ResNet: torchvision's model at width 1, channels in proportion otherwise."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr import build_model, load_model, save_model
from sdetr.checkpoints import infer_config
from sdetr.config import ConfigError, get_config
from sdetr.model.images import ImageBatch
from sdetr.model.resnet_blocks import ARCHITECTURES, build_resnet


@pytest.mark.parametrize(
    ("name", "norm_layer", "dilation"),
    [
        ("resnet10", partial(nn.GroupNorm, 32), None),
        ("resnet18", FrozenBatchNorm2d, None),
        ("resnet50", FrozenBatchNorm2d, [False, False, True]),
    ],
)
def test_width_one_is_torchvisions_model_parameter_for_parameter(name, norm_layer, dilation) -> None:  # type: ignore[no-untyped-def]
    kwargs = {"norm_layer": norm_layer, "replace_stride_with_dilation": dilation}
    torch.manual_seed(0)
    ours = build_resnet(name, 1.0, **kwargs)
    torch.manual_seed(0)
    block, layers = ARCHITECTURES[name]
    theirs = torchvision.models.ResNet(block, layers, **kwargs)
    assert [type(m) for m in ours.modules()][1:] == [type(m) for m in theirs.modules()][1:]  # below the root
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        assert torch.equal(ours_state[key], value), key
    assert ours.layer4[0].conv2.dilation == theirs.layer4[0].conv2.dilation
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(ours.eval()(images), theirs.eval()(images))


def _conv_weights(model: nn.Module) -> tuple[int, int]:
    """(stem convolution's weights, every other convolution's weights)."""
    stem = model.conv1.weight.numel()  # type: ignore[union-attr]
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
    return stem, convs - stem


def test_half_width_halves_every_stage_and_quarters_the_convolutions() -> None:
    narrow = build_resnet("resnet10", 0.5, norm_layer=partial(nn.GroupNorm, 16))
    wide = build_resnet("resnet10", 1.0, norm_layer=partial(nn.GroupNorm, 32))
    outputs = [narrow.conv1.out_channels] + [getattr(narrow, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)]
    assert outputs == [32, 32, 64, 128, 256]
    assert narrow.layer2[0].downsample[0].in_channels == 32
    # The stem's input stays RGB: its weights halve; every other convolution has half the inputs
    # and half the outputs: a quarter of the weights.
    (narrow_stem, narrow_rest), (wide_stem, wide_rest) = _conv_weights(narrow), _conv_weights(wide)
    assert (narrow_stem * 2, narrow_rest * 4) == (wide_stem, wide_rest)
    bottleneck = build_resnet("resnet50", 0.5, norm_layer=FrozenBatchNorm2d)
    assert (bottleneck.layer3[-1].conv3.out_channels, bottleneck.layer4[-1].conv3.out_channels) == (512, 1024)


def test_a_half_width_detector_keeps_group_channels_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", backbone_width=0.5, backbone_stem="resnet", num_classes=5).eval()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert {m.num_groups for m in norms} == {16}
    assert min(m.num_channels // m.num_groups for m in norms) == 2  # as ResNet-10's stem at width 1
    assert model.stages[1].input_proj.in_channels == 128  # C4 of the half-width ResNet-10
    images = [torch.rand(3, 96, 128), torch.rand(3, 64, 96)]
    batch = ImageBatch.from_input(images)
    features = model.backbone(batch.tensors, batch.mask)
    assert features["c4"][0].shape == (2, 128, 6, 8) and features["c5"][0].shape == (2, 256, 3, 4)
    with torch.no_grad():
        expected = model(images)
    path = save_model(model, tmp_path / "narrow.pth")
    loaded = load_model(path)
    assert loaded.config.backbone_width == 0.5
    with torch.no_grad():
        got = loaded(images)
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])
    assert torch.equal(got["pred_logits"], expected["pred_logits"])


def test_a_patchify_stem_sees_each_4x4_patch_once_and_keeps_the_strides(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", backbone_width=0.5, backbone_stem="patchify", num_classes=5).eval()
    body = model.backbone.body
    assert (body.conv1.kernel_size, body.conv1.stride, body.conv1.padding) == ((4, 4), (4, 4), (0, 0))
    assert isinstance(body.maxpool, nn.Identity)
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        stem = body.relu(body.bn1(body.conv1(images)))  # [2, 32, 24, 32]
        # one output cell is the norm of one patch's dot products: recompute cell (5, 7) by hand
        patch = images[:, :, 20:24, 28:32]  # [2, 3, 4, 4]
        by_hand = torch.einsum("bchw,ochw->bo", patch, body.conv1.weight)  # [2, 32]
        conv = body.conv1(images)
        torch.testing.assert_close(conv[:, :, 5, 7], by_hand, rtol=1e-5, atol=1e-5)
        features = model.backbone(images, torch.zeros(2, 96, 128, dtype=torch.bool))
    assert stem.shape == (2, 32, 24, 32)  # stride 4, as the 7x7 convolution and the pool give
    assert features["c4"][0].shape == (2, 128, 6, 8) and features["c5"][0].shape == (2, 256, 3, 4)
    with torch.no_grad():
        expected = model([images[0]])
    loaded = load_model(save_model(model, tmp_path / "patchify.pth"))
    bare = load_model(dict(model.state_dict()), preset="sdetr-tiny")  # no stored config: read from conv1
    assert loaded.config.backbone_stem == bare.config.backbone_stem == "patchify"
    from_resnet_base = infer_config(model.state_dict(), base=get_config("sdetr-tiny", backbone_stem="resnet"))
    assert from_resnet_base.backbone_stem == "patchify"  # read from conv1's kernel, not the base
    with torch.no_grad():
        for other in (loaded, bare):
            assert torch.equal(other([images[0]])["pred_logits"], expected["pred_logits"])
    usual = build_model("sdetr-tiny", backbone_stem="resnet", num_classes=5)
    resnet_stem = load_model(dict(usual.state_dict()), preset="sdetr-tiny")
    assert resnet_stem.config.backbone_stem == "resnet"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone_width": 0.3}, r"backbone_width=0.3; use a positive multiple of 1/32"),
        ({"backbone_width": 0.0}, r"backbone_width=0.0; use a positive multiple of 1/32"),
        ({"backbone_width": -0.5}, r"backbone_width=-0.5"),
        (
            {"backbone_width": 0.5, "backbone_stem": "resnet", "backbone_weights": "resnet10.pth"},
            r"backbone_width=0.5: ImageNet weights fit the ResNet at width 1 only; set backbone_width=1 \(or",
        ),
        (
            {"backbone_width": 1.0, "backbone_weights": "resnet10.pth"},  # sdetr-tiny's patchify stem
            r"backbone_weights='resnet10.pth' with backbone_stem='patchify': ImageNet weights have the ResNet's "
            r"7x7 stem; set backbone_stem=resnet \(or leave the weights out\)",
        ),
        (
            {"backbone_width": 0.5, "backbone_weights": "resnet10.pth"},  # both wrong: both named
            r"backbone_width=0.5: .* set backbone_width=1; and backbone_stem='patchify': .* set backbone_stem=resnet",
        ),
        ({"backbone_stem": "convnext"}, r"backbone_stem"),
    ],
)
def test_bad_widths_and_stems_are_refused_with_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_config("sdetr-tiny", **changes)
