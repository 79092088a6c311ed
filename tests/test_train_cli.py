"""The thin CLI: flags fill TrainConfig; the original recipe; model overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sdetr
import train
from sdetr.checkpoints import CheckpointError
from sdetr.config import ConfigError
from sdetr.engine import BEFORE_THE_OPTION, TrainConfig
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
    # none of the quickstart's training aids: DETR's criterion, one-to-one matching, float32, StepLR
    assert (config.encoder_loss, config.one_to_many, config.one_to_many_epochs) == (0.0, 1, 0)
    assert (config.precision, config.schedule, config.warmup_steps, config.clip_max_norm) == ("fp32", "step", 0, 0.1)
    assert config.encoder_loss == 0.0  # the original criterion: no dense encoder losses
    assert (config.ema_decay, config.denoising_groups, config.augment, config.low_res_epochs) == (
        0.0,
        0,
        True,
        0,
    )  # raw weights, DETR's augmentation, every epoch at full size
    assert config.query_groups == 1 and not config.contrastive_denoising  # no extra query groups, no negatives


def test_quickstart_training_aids_can_be_switched_off() -> None:
    assert config_from_args([]).encoder_loss > 0 and config_from_args([]).synthetic_class_hues
    config = config_from_args(["--encoder_loss", "0", "--synthetic_any_colour"])
    assert config.encoder_loss == 0.0 and config.synthetic_class_hues is False
    assert config_from_args([]).query_groups == 1 and config_from_args(["--query_groups", "3"]).query_groups == 3
    assert not config_from_args([]).contrastive_denoising
    assert config_from_args(["--contrastive_denoising"]).contrastive_denoising
    with pytest.raises(ConfigError, match=r"--contrastive_denoising.*--denoising_groups is 0"):
        config_from_args(["--contrastive_denoising", "--denoising_groups", "0"])


def test_augmentation_is_off_on_the_synthetic_set_and_on_for_coco_unless_asked() -> None:
    assert config_from_args([]).augments() is False  # the quickstart underfits; augmenting halves its AP50
    assert config_from_args(["--coco_path", "/data/coco"]).augments() is True
    assert config_from_args(["--augment"]).augments() is True
    assert config_from_args(["--coco_path", "/data/coco", "--no-augment"]).augments() is False
    assert config_from_args(["--coco_path", "/data/coco", "--no_augment"]).augments() is False  # the old spelling


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs 0: use a positive integer"),
        (["--lr_drop", "0"], "--lr_drop 0: use a positive integer"),
        (["--low_res_epochs", "-1"], "--low_res_epochs -1: use 0 or more"),
        (["--low_res_factor", "0"], "--low_res_factor 0.0: use a factor in (0, 1]"),
        (["--low_res_factor", "1.5"], "--low_res_factor 1.5: use a factor in (0, 1]"),
        (["--epochs", "5"], "--low_res_epochs 12 with --epochs 5: the last epoch must train at full size"),
        (["--low_res_factor", "0.2"], "smallest size (128 px) would become 26 px, under 32 px"),
        (["--low_res_factor", "0.2"], "use a factor of at least 0.25"),
        (["--set", "hidden_dim=abc"], "--set hidden_dim=abc: hidden_dim: expected an integer, got 'abc'"),
        (["--set", "nonexistent_field=3"], "no field 'nonexistent_field'"),
        (["--preset", "yolo"], "unknown preset 'yolo'"),
        (["--eval"], "--eval needs --resume"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train, "Trainer", _NoTrainer)
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


class _NoTrainer:
    @classmethod
    def from_config(cls, config: TrainConfig) -> None:
        raise AssertionError("the config should have been refused")


def test_a_missing_resume_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--resume", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert err == f"train.py: error: checkpoint {str(tmp_path / 'nope.pth')!r} does not exist\n"


def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        @classmethod
        def from_config(cls, config: TrainConfig) -> None:
            raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "Trainer", Broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        train.main([])


def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Interrupted:
        def __init__(self) -> None:
            self.last_checkpoint, self.last_epoch = None, None

        @classmethod
        def from_config(cls, config: TrainConfig) -> Interrupted:
            return cls()

        def run(self) -> None:
            self.last_checkpoint, self.last_epoch = Path("runs/a/checkpoint.pth"), 3
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "Trainer", Interrupted)
    assert train.main(["--epochs", "15", "--output_dir", "runs/a", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "the last checkpoint is runs/a/checkpoint.pth (epoch 3 finished)" in err
    assert "python train.py --epochs 15 --resume runs/a/checkpoint.pth" in err and "Traceback" not in err


def test_ctrl_c_before_any_checkpoint_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Interrupted:
        last_checkpoint = None

        @classmethod
        def from_config(cls, config: TrainConfig) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "Trainer", Interrupted)
    assert train.main([]) == 130
    assert "interrupted before a checkpoint was written" in capsys.readouterr().err


def test_resume_takes_the_runs_options_and_explicit_flags_win(tmp_path: Path) -> None:
    """Issue 11: ``--resume`` silently ignored an explicit --lr."""
    stored = TrainConfig(
        epochs=5, low_res_epochs=2, lr=2e-4, batch_size=2, model_overrides={"hidden_dim": 32}, output_dir="elsewhere"
    )
    torch.save({"sdetr_format": 1, "train_config": stored.to_dict()}, tmp_path / "checkpoint.pth")
    config = config_from_args(["--resume", str(tmp_path / "checkpoint.pth"), "--lr", "1e-3", "--set", "ffn_dim=64"])
    assert (config.epochs, config.batch_size, config.lr, config.low_res_epochs) == (5, 2, 1e-3, 2)
    assert config.model_overrides == {"hidden_dim": 32, "ffn_dim": 64}
    assert config.output_dir == str(tmp_path)  # the checkpoint's folder, not the stored (maybe moved) path
    torch.save({"sdetr_format": 1, "train_config": {**stored.to_dict(), "lr": "fast"}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: its stored training options are not valid \(lr: expected"):
        config_from_args(["--resume", str(tmp_path / "bad.pth")])


def test_every_input_error_type_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for error in (
        sdetr.BadDataError,
        sdetr.CheckpointError,
        sdetr.ConfigError,
        sdetr.NonFiniteLossError,
        sdetr.PreflightError,
        sdetr.RecordingError,
    ):
        assert issubclass(error, sdetr.UserError), error
    assert train.main(["--resume", str(tmp_path)]) == 2  # a CheckpointError: one line, no traceback
    hint = f"pass the checkpoint file in it (e.g. {tmp_path / 'checkpoint.pth'})"
    assert capsys.readouterr().err == f"train.py: error: {tmp_path} is a folder; {hint}\n"


def test_resume_of_a_quickstart_run_from_before_the_resnet10_preset_keeps_its_resnet18(tmp_path: Path) -> None:
    """A checkpoint whose stored model differs from what its preset builds today (``sdetr-tiny`` was
    a ResNet-18) resumes with the stored backbone as an override; an explicit --set still wins."""
    old_model = sdetr.build_model("sdetr-tiny", num_classes=6, backbone="resnet18").config.to_dict()
    stored = TrainConfig(epochs=13, low_res_epochs=8, lr_drop=12).to_dict()
    torch.save({"sdetr_format": 1, "train_config": stored, "config": old_model}, tmp_path / "checkpoint.pth")
    config = config_from_args(["--resume", str(tmp_path / "checkpoint.pth")])
    assert config.model_overrides == {"backbone": "resnet18"}  # num_classes comes from the data, not here
    explicit = config_from_args(["--resume", str(tmp_path / "checkpoint.pth"), "--set", "backbone=resnet34"])
    assert explicit.model_overrides == {"backbone": "resnet34"}
    today = sdetr.build_model("sdetr-tiny", num_classes=6).config.to_dict()
    torch.save({"sdetr_format": 1, "train_config": stored, "config": today}, tmp_path / "new.pth")
    assert config_from_args(["--resume", str(tmp_path / "new.pth")]).model_overrides == {}


def test_resume_of_a_run_saved_before_an_option_existed_keeps_how_it_trained(tmp_path: Path) -> None:
    """A checkpoint written before EMA, denoising queries or the synthetic set's no-augmentation
    default resumes as it trained (not with today's defaults, whose extra denoiser parameters
    would not even fit its optimiser state); explicit flags still win."""
    stored = {k: v for k, v in TrainConfig(epochs=5, low_res_epochs=4).to_dict().items() if k not in BEFORE_THE_OPTION}
    torch.save({"sdetr_format": 1, "train_config": stored}, tmp_path / "checkpoint.pth")
    config = config_from_args(["--resume", str(tmp_path / "checkpoint.pth")])
    assert (config.ema_decay, config.denoising_groups, config.augments(), config.precision) == (0.0, 0, True, "fp32")
    assert (config.one_to_many, config.one_to_many_epochs, config.schedule, config.epochs) == (1, 0, "step", 5)
    assert config.low_res_epochs == 0 and config.query_groups == 1 and not config.contrastive_denoising
    later = config_from_args(["--resume", str(tmp_path / "checkpoint.pth"), "--denoising_groups", "5"])
    assert later.denoising_groups == 5
    current = TrainConfig(epochs=5, low_res_epochs=4).to_dict()  # a run that stored them keeps its own values
    torch.save({"sdetr_format": 1, "train_config": current}, tmp_path / "new.pth")
    kept = config_from_args(["--resume", str(tmp_path / "new.pth")])
    assert (kept.denoising_groups, kept.low_res_epochs) == (current["denoising_groups"], 4)
