"""Detector forward: every preset, shapes, input validation, padding, post-processing."""

from __future__ import annotations

import pytest
import torch

from sdetr import PRESETS, build_model, count_parameters, postprocess
from sdetr.model.detector import Stage
from sdetr.model.images import ImageBatch


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    return build_model("sdetr-tiny").eval()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_and_runs(preset: str) -> None:
    model = build_model(preset).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    config = model.config
    layers = sum(s.decoder_layers for s in config.stages)
    assert out["pred_logits"].shape == (1, config.num_queries, config.num_classes + 1)
    assert out["pred_boxes"].shape == (1, config.num_queries, 4)
    assert len(out["aux_outputs"]) == layers - 1
    assert torch.all((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1))


def test_original_parameter_counts() -> None:
    # trainable parameters of the original code (../shared/reference/README.md)
    assert count_parameters(build_model("sdetr")) == 41_590_880
    assert count_parameters(build_model("detr")) == 41_302_368


def test_tiny_backbone_is_resnet18_at_half_depth_and_half_width() -> None:
    """ResNet-10: one basic block per stage, so each stage holds what ResNet-18's first block of it
    holds, and the stem (conv1 + GroupNorm) is shared: ResNet-18's count minus its second blocks,
    at half width (32..256 channels). The previous default, full width with the 7x7 stem, keeps
    its count."""
    tiny, r18 = build_model("sdetr-tiny"), build_model("sdetr-tiny", backbone="resnet18")
    second_blocks = sum(
        p.numel()
        for name, p in r18.backbone.body.named_parameters()
        if name.split(".")[0].startswith("layer") and name.split(".")[1] == "1"
    )
    by_hand = sum(9 * c * c + 9 * c * c + 4 * c for c in (32, 64, 128, 256))  # two 3x3 convs and two GroupNorms
    assert second_blocks == by_hand
    assert count_parameters(tiny) == count_parameters(r18) - by_hand == 1_604_000
    assert tiny.backbone.body.conv1.weight.shape == (32, 3, 4, 4)  # the patchify stem: 1536 weights (a 7x7 stem: 4704)
    previous = build_model("sdetr-tiny", backbone_width=1.0, backbone_stem="resnet")
    assert count_parameters(previous) == 5_307_296


def test_stage2_encoder_is_single_head_and_decoder_starts_from_stage1() -> None:
    model = build_model("sdetr")
    sites = model.attention_sites()
    assert len(sites) == 3 + 6 + 3 + 6
    assert all(sites[f"stage2.encoder.{i}.self_attn"].num_heads == 1 for i in range(3))
    assert all(sites[f"stage1.encoder.{i}.self_attn"].num_heads == 8 for i in range(3))
    assert model.stage2.from_previous and model.stage2.feature == "c4" and model.stage2.stride == 16
    assert build_model("sdetr-multihead").stage2.encoder.layers[0].self_attn.num_heads == 8


def test_config_overrides_reach_the_modules() -> None:
    model = build_model("sdetr-tiny", hidden_dim=32, ffn_dim=48, num_queries=7, position="learned", norm_first=True)
    assert model.stage1.query_embed.weight.shape == (7, 32)
    assert model.stage1.encoder.layers[0].linear1.out_features == 48
    assert model.stage1.encoder.norm is not None  # pre-norm adds the final encoder norm
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64))["pred_boxes"].shape == (1, 7, 4)


def test_encoder_outputs_are_the_shared_heads_on_every_cell() -> None:
    model = build_model("sdetr-tiny", num_classes=5).eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 64, 96)]
    with torch.no_grad():
        plain = model(images)
        out = model(images, encoder_outputs=True)
        torch.testing.assert_close(out["pred_boxes"], plain["pred_boxes"], atol=0, rtol=0)
        assert "encoder_outputs" not in plain and len(out["encoder_outputs"]) == 2
        batch_input = ImageBatch.from_input(images)
        features = model.backbone(batch_input.tensors, batch_input.mask)
        for stage, dense in zip(model.stages, out["encoder_outputs"], strict=True):
            level, mask = features[stage.feature]
            _, memory = stage(level, mask, None)  # [B, h*w, E]; the encoder does not depend on tgt
            batch, height, width = mask.shape
            assert torch.equal(dense["mask"], mask)
            assert dense["pred_logits"].shape == (batch, height, width, 6)
            torch.testing.assert_close(dense["pred_logits"].flatten(1, 2), model.class_embed(memory))
            torch.testing.assert_close(dense["pred_boxes"].flatten(1, 2), model.bbox_embed(memory).sigmoid())


def test_stage_ignores_features_under_the_mask() -> None:
    """Padded cells never change a stage's output: they are masked as attention keys."""
    model = build_model("sdetr-tiny").eval()
    stage: Stage = model.stage1
    channels = stage.input_proj.in_channels  # C5's
    features = torch.randn(1, channels, 4, 6)
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 4:] = True
    mask[:, 3:, :] = True
    changed = features.clone()
    changed[..., 4:] = torch.randn(1, channels, 4, 2) * 100
    changed[..., 3:, :] = -50
    with torch.no_grad():
        torch.testing.assert_close(stage(features, mask, None)[0], stage(changed, mask, None)[0], atol=1e-5, rtol=0)
        assert not torch.allclose(stage(features, mask, None)[0], stage(changed, ~mask & False, None)[0], atol=1e-3)


def test_batching_with_padding_is_per_image(tiny) -> None:  # type: ignore[no-untyped-def]
    """Images padded into one batch give the outputs their own (equally padded) batches give."""
    a, b = torch.randn(3, 64, 96), torch.randn(3, 96, 64)
    with torch.no_grad():
        together = tiny([a, b])
        alone_b = tiny([b, torch.zeros(3, 64, 96)])  # b padded to the same 96x96 canvas
    padded_b = torch.zeros(3, 96, 96)
    padded_b[:, :, :64] = b
    mask = torch.ones(1, 96, 96, dtype=torch.bool)
    mask[:, :, :64] = False
    with torch.no_grad():
        single = tiny(padded_b[None], mask)
    torch.testing.assert_close(together["pred_boxes"][1], single["pred_boxes"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone_b["pred_boxes"][0], single["pred_boxes"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.randn(3, 64, 64), r"\[B, 3, H, W\].*images\[None\]"),
        (torch.randn(1, 1, 64, 64), "1 channels; the backbone expects 3"),
        (torch.randn(0, 3, 64, 64), "empty batch"),
        ([], "empty list"),
        ([torch.randn(3, 64, 64), torch.randn(4, 64, 64)], r"images\[1\] has 4 channels"),
        ([torch.randn(64, 64)], r"images\[0\] has shape \(64, 64\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "normalize_image"),
        (torch.randn(1, 3, 8, 8), "at least 32x32"),
        ([torch.randn(3, 64, 64).numpy()], "expected a"),
    ],
)
def test_bad_input_is_a_clear_error(tiny, images, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=message):
        tiny(images)


def test_bad_mask_is_a_clear_error(tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        tiny(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool))


def test_postprocess_scales_to_absolute_xyxy() -> None:
    logits = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])  # 2 classes + no-object
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.1, 0.1]]])
    (result,) = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 400]]))
    torch.testing.assert_close(result["boxes"][0], torch.tensor([100.0, 75.0, 300.0, 125.0]))
    assert result["labels"].tolist() == [0, 0]
    p = torch.softmax(torch.tensor([3.0, 0.0, 0.0]), 0)[0]
    assert result["scores"][0].item() == pytest.approx(p.item())
    assert len(result["scores"]) == 2  # every query kept
