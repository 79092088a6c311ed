"""Typed config and presets."""

from __future__ import annotations

import pytest

from sdetr.config import PRESETS, ConfigError, ModelConfig, StageConfig, get_config
from sdetr.typed_fields import parse_assignments


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
        (
            {"backbone": "vgg16"},
            "backbone: expected one of 'resnet10', 'resnet18', 'resnet34', 'resnet50', 'resnet101'",
        ),
        ({"hidden_dim": 100}, "not divisible by heads=8"),
        ({"stages": ()}, "at least one stage"),
        ({"stages": (StageConfig(from_previous=True),)}, "stage 1 cannot"),
        ({"position": "rope"}, "position: expected one of 'sine', 'learned', got 'rope'"),
        ({"norm_first": "false"}, r"norm_first: expected true or false, got 'false' \(str\)"),
        ({"hidden_dim": 64.0}, "hidden_dim: expected an integer, got 64.0"),
        ({"hidden_dim": True}, "hidden_dim: expected an integer, got True"),
        ({"hidden_dim": 0}, "hidden_dim=0; use a positive integer"),
        ({"dropout": float("nan")}, "dropout: expected a finite number"),
        ({"dropout": 1.0}, r"dropout=1.0; use a probability in \[0, 1\)"),
        ({"num_queries": -1}, "num_queries=-1"),
    ],
)
def test_invalid_configs_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_config("sdetr", **changes)


def test_unknown_preset_and_fields() -> None:
    with pytest.raises(KeyError, match="available: sdetr"):
        get_config("yolo")
    with pytest.raises(ConfigError, match=r"unknown preset 'sdetr_tiny' \(did you mean 'sdetr-tiny'\?\)"):
        get_config("sdetr_tiny")
    with pytest.raises(ConfigError, match="ModelConfig has no field 'heads'; valid fields: name, backbone"):
        ModelConfig.from_dict({"heads": 3})
    with pytest.raises(ConfigError, match=r"no field 'hiden_dim' \(did you mean 'hidden_dim'\?\)"):
        get_config("sdetr-tiny", hiden_dim=3)


def test_stage_heads_and_layers_are_checked() -> None:
    with pytest.raises(ConfigError, match="3 layers"):
        StageConfig("c4", 3, 2, encoder_heads=(1, 2))
    with pytest.raises(ConfigError, match="decoder_layers=0"):
        StageConfig("c4", 3, 0)
    with pytest.raises(ConfigError, match="heads=0"):
        StageConfig("c4", 1, 1, encoder_heads=0)
    assert StageConfig("c4", 0, 1).encoder_heads_per_layer() == ()  # an encoder-less stage is allowed


@pytest.mark.parametrize("word", ["false", "False", "FALSE", "0", "no", "No", "off"])
def test_set_false_in_any_spelling_is_false(word: str) -> None:
    """Issue 11: ``--set norm_first=false`` used to give the truthy string 'false'."""
    parsed = parse_assignments(ModelConfig, [f"norm_first={word}", f"freeze_stem={word}"])
    assert parsed == {"norm_first": False, "freeze_stem": False}
    config = get_config("sdetr-tiny", **parsed)
    assert config.norm_first is False and config.freeze_stem is False


@pytest.mark.parametrize("word", ["true", "TRUE", "1", "yes", "on"])
def test_set_true_in_any_spelling_is_true(word: str) -> None:
    assert parse_assignments(ModelConfig, [f"dilation={word}"]) == {"dilation": True}


def test_set_values_are_parsed_by_the_field_type() -> None:
    parsed = parse_assignments(
        ModelConfig,
        [
            "hidden_dim=128",
            "dropout=0",
            "position=learned",
            "name='mine'",
            "backbone_weights=none",
            "num_queries= 7 ",
            "backbone_width=0.5",
        ],
    )
    assert parsed == {
        "hidden_dim": 128,
        "dropout": 0.0,
        "position": "learned",
        "name": "mine",
        "backbone_weights": None,
        "num_queries": 7,
        "backbone_width": 0.5,
    }
    assert isinstance(parsed["dropout"], float)
    item = "stages=[{'feature': 'c4', 'encoder_layers': 2, 'encoder_heads': [1, 2]}]"
    assert parse_assignments(ModelConfig, [item])["stages"] == (StageConfig("c4", 2, encoder_heads=(1, 2)),)
    assert parse_assignments(StageConfig, ["encoder_heads=1,2,4"]) == {"encoder_heads": (1, 2, 4)}
    assert parse_assignments(StageConfig, ["encoder_heads=(1, 2)"]) == {"encoder_heads": (1, 2)}
    assert parse_assignments(StageConfig, ["encoder_heads=8"]) == {"encoder_heads": 8}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("hidden_dim=abc", r"--set hidden_dim=abc: hidden_dim: expected an integer, got 'abc'"),
        ("hidden_dim=1.5", "expected an integer, got '1.5'"),
        ("norm_first=maybe", "norm_first: expected true or false, got 'maybe'"),
        ("dropout=nan", "dropout: expected a finite number"),
        ("dropout=x", "dropout: expected a finite number, got 'x'"),
        ("position=rope", "position: expected one of 'sine', 'learned', got 'rope'"),
        ("backbone_weights=3", None),
        ("nonexistent_field=3", "ModelConfig has no field 'nonexistent_field'; valid fields: name, backbone"),
        ("num_query=3", r"did you mean 'num_queries'\?"),
        ("hidden_dim", "expected FIELD=VALUE"),
        ("=3", "expected FIELD=VALUE"),
        ("stages=[1, 2]", r"stages\[0\]: expected a StageConfig"),
        ("stages=[{'feture': 'c4'}]", r"did you mean 'feature'"),
        ("stages=[(", "stages: expected a tuple of StageConfigs"),
    ],
)
def test_bad_set_values_are_one_clear_error(item: str, message: str | None) -> None:
    if message is None:  # a bare string is a valid path
        assert parse_assignments(ModelConfig, [item]) == {"backbone_weights": "3"}
        return
    with pytest.raises(ConfigError, match=message):
        parse_assignments(ModelConfig, [item])


def test_config_from_a_checkpoint_is_type_checked() -> None:
    """The same checks as for overrides, for a config dict read back from a file."""
    good = get_config("sdetr-tiny").to_dict()
    assert ModelConfig.from_dict(good) == get_config("sdetr-tiny")
    for change, message in [
        ({"norm_first": "false"}, "model config.norm_first: expected true or false"),
        ({"hidden_dim": "64"}, "model config.hidden_dim: expected an integer, got '64'"),
        ({"stages": [{"feature": "c3"}]}, r"model config.stages\[0\].feature: expected one of 'c4', 'c5'"),
        ({"stages": [{"encoder_layers": 2, "encoder_heads": [4, "x"]}]}, r"encoder_heads\[1\]"),
        ({"stages": {"a": 1}}, "model config.stages: expected a tuple of StageConfigs"),
        ({"stages": [{"nope": 1}]}, "StageConfig has no field 'nope'"),
        ({"dropout": None}, "model config.dropout: expected a finite number, got None"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict({**good, **change})
    with pytest.raises(ConfigError, match="expected a dict of ModelConfig fields, got list"):
        ModelConfig.from_dict([1, 2])  # type: ignore[arg-type]
