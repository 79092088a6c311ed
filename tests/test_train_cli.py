"""The thin CLI: flags fill TrainConfig; the original recipe; model overrides."""

from __future__ import annotations

import pytest

from sdetr.config import ConfigError
from train import config_from_args, parse_overrides


def test_defaults_are_the_cpu_quickstart() -> None:
    config = config_from_args([])
    assert config.preset == "sdetr-tiny" and config.coco_path is None and config.model_overrides == {}


def test_original_recipe_and_explicit_flags_win() -> None:
    config = config_from_args(["--recipe", "original", "--coco_path", "/data/coco", "--epochs", "3"])
    assert (config.preset, config.lr, config.lr_backbone, config.lr_drop, config.batch_size) == (
        "sdetr",
        1e-4,
        1e-5,
        100,
        4,
    )
    assert config.epochs == 3 and config.scale == "full" and config.coco_path == "/data/coco"
    assert config.encoder_loss == 0.0  # the original criterion: no dense encoder losses


def test_quickstart_training_aids_can_be_switched_off() -> None:
    assert config_from_args([]).encoder_loss > 0 and config_from_args([]).synthetic_class_hues
    config = config_from_args(["--encoder_loss", "0", "--synthetic_any_colour"])
    assert config.encoder_loss == 0.0 and config.synthetic_class_hues is False


def test_overrides_are_parsed_as_literals() -> None:
    assert parse_overrides(["hidden_dim=128", "position=learned", "dropout=0.0", "norm_first=True"]) == {
        "hidden_dim": 128,
        "position": "learned",
        "dropout": 0.0,
        "norm_first": True,
    }
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        parse_overrides(["hidden_dim"])


def test_overrides_false_is_false_and_bad_values_name_the_flag() -> None:
    """Issue 11: ``--set norm_first=false`` set True; ``hidden_dim=abc`` and unknown fields gave raw TypeErrors."""
    config = config_from_args(["--set", "norm_first=false", "--set", "freeze_stem=false"])
    assert config.model_overrides == {"norm_first": False, "freeze_stem": False}
    with pytest.raises(ConfigError, match="--set hidden_dim=abc: hidden_dim: expected an integer, got 'abc'"):
        config_from_args(["--set", "hidden_dim=abc"])
    with pytest.raises(ConfigError, match="no field 'nonexistent_field'; valid fields: name, backbone"):
        config_from_args(["--set", "nonexistent_field=3"])


def test_eval_and_flags_familiar_to_detr_users() -> None:
    config = config_from_args(
        ["--eval", "--resume", "c.pth", "--clip_max_norm", "0.0", "--weight_decay", "0.01", "--num_workers", "2"]
    )
    assert config.eval_only and config.resume == "c.pth" and config.clip_max_norm == 0.0
    assert config.weight_decay == 0.01 and config.num_workers == 2
