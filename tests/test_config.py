"""Typed config and presets."""

from __future__ import annotations

import pytest

from sdetr.config import PRESETS, ModelConfig, StageConfig, get_config


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dict_round_trip(preset: str) -> None:
    config = get_config(preset)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_sdetr_preset_is_the_original_architecture() -> None:
    config = get_config("sdetr")
    s1, s2 = config.stages
    assert (s1.feature, s1.encoder_layers, s1.decoder_layers, s1.encoder_heads, s1.decoder_heads) == ("c5", 3, 3, 8, 8)
    assert (s2.feature, s2.encoder_layers, s2.decoder_layers, s2.encoder_heads, s2.decoder_heads) == ("c4", 3, 3, 1, 8)
    assert s2.from_previous and not s1.from_previous
    assert (config.backbone, config.hidden_dim, config.ffn_dim, config.num_queries) == ("resnet50", 256, 2048, 100)


def test_heads_per_layer_tuple() -> None:
    stage = StageConfig("c4", 3, 2, encoder_heads=(1, 2, 4), decoder_heads=8)
    assert stage.encoder_heads_per_layer() == (1, 2, 4)
    assert stage.decoder_heads_per_layer() == (8, 8)
    with pytest.raises(ValueError, match="3 layers"):
        StageConfig("c4", 3, 2, encoder_heads=(1, 2)).encoder_heads_per_layer()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone": "vgg16"}, "not supported"),
        ({"hidden_dim": 100}, "not divisible by heads=8"),
        ({"stages": ()}, "at least one stage"),
        ({"stages": (StageConfig(from_previous=True),)}, "stage 1 cannot"),
        ({"position": "rope"}, "use 'sine' or 'learned'"),
    ],
)
def test_invalid_configs_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_config("sdetr", **changes)


def test_unknown_preset_and_fields() -> None:
    with pytest.raises(KeyError, match="available: sdetr"):
        get_config("yolo")
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({"heads": 3})
