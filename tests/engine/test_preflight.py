"""Issue 11: everything that can be checked before the first training step is, and divergence
stops with NonFiniteLossError before the matcher, never saving non-finite weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from sdetr.config import ConfigError
from sdetr.data import BadDataError
from sdetr.engine import NonFiniteLossError, TrainConfig, Trainer
from sdetr.engine.preflight import PreflightError
from sdetr.engine.trainer import CHECKPOINT_NAME

SMALL_MODEL = {"hidden_dim": 32, "ffn_dim": 32, "num_queries": 6}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def config(output: Path, **changes: Any) -> TrainConfig:
    """4 training images in one step of 4 per epoch: the cheapest run that trains."""
    values: dict[str, Any] = dict(
        model_overrides=SMALL_MODEL,
        synthetic_train=6,
        synthetic_val=2,
        max_train_images=4,
        batch_size=4,
        epochs=1,
        lr_drop=1,
        lr=5e-4,  # fixed rates without warm-up, whatever the quickstart's defaults
        lr_backbone=5e-4,
        warmup_steps=0,
        low_res_epochs=0,  # full-size epochs, whatever the quickstart's progressive resizing
        eval_every=0,
        augment=False,
        output_dir=str(output),
        device="cpu",
    )
    values.update(changes)
    return TrainConfig(**values)


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training step a test failure: the checks must all come before it."""

    def fail(self: Trainer, epoch: int) -> dict[str, float]:
        raise AssertionError("a training step ran before the error was found")

    monkeypatch.setattr(Trainer, "train_one_epoch", fail)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "--epochs 0: use a positive integer"),
        ({"epochs": -1}, "--epochs -1: use a positive integer"),
        ({"lr_drop": 0}, "--lr_drop 0: use a positive integer"),
        ({"max_train_images": 0}, "--max_train_images 0: use a positive integer"),
        ({"probe_images": 0}, "--probe_images 0: use a positive integer"),
        ({"batch_size": 0}, "--batch_size 0"),
        ({"lr": 0.0}, "--lr 0.0: use a positive learning rate"),
        ({"lr": float("nan")}, "lr: expected a finite number, got nan"),
        ({"scale": "huge"}, "--scale 'huge': use one of full, tiny, synthetic"),
        ({"device": "gpu"}, "--device 'gpu'"),
        ({"eval_only": True}, "--eval needs --resume"),
        ({"model_overrides": {"norm_first": "false"}}, "norm_first: expected true or false"),
        ({"model_overrides": {"hiden_dim": 8}}, "did you mean 'hidden_dim'"),
    ],
)
def test_options_that_cannot_work_are_refused_at_once(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **changes)


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: a second run in the same folder overwrote the checkpoint and appended to log.txt."""
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n')
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"earlier run")
    no_training(monkeypatch)
    with pytest.raises(
        PreflightError, match=r"already holds a run \(checkpoint.pth, log.txt\); .*--resume .*--overwrite"
    ):
        Trainer.from_config(config(tmp_path))
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == b"earlier run"
    Trainer.from_config(config(tmp_path, overwrite=True))
    assert not (tmp_path / "log.txt").exists() and not (tmp_path / CHECKPOINT_NAME).exists()


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(PreflightError, match=r"--output_dir .*file is a file, not a folder"):
        Trainer.from_config(config(tmp_path / "file"))
    with pytest.raises(PreflightError, match=r"--output_dir .*file/run is not writable \(Not a directory\)"):
        Trainer.from_config(config(tmp_path / "file" / "run"))


def test_probe_sites_and_steps_are_checked_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: an unknown probe site failed after a whole epoch; batch > data trained 0 steps and exited 0."""
    no_training(monkeypatch)
    with pytest.raises(
        PreflightError, match=r"--probe_sites 'stage3.\*': .*matches no attention site; available: stage1"
    ):
        Trainer.from_config(config(tmp_path / "a", probe_sites="stage3.*"))
    with pytest.raises(
        PreflightError,
        match=r"0 training steps: 4 training image\(s\) \(--max_train_images 4\) .* --batch_size 5"
        r".*use --batch_size 4 or less",
    ):
        Trainer.from_config(config(tmp_path / "b", batch_size=5))
    with pytest.raises(PreflightError, match=r"0 training steps: 6 training image\(s\) over 1 .*--batch_size 7"):
        Trainer.from_config(config(tmp_path / "c", batch_size=7, max_train_images=None))


def write_coco(root: Path, count: int = 4) -> None:
    """A COCO folder with ``count`` plain 96x64 images per split, one box each."""
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        images, annotations = [], []
        for i in range(1, count + 1):
            Image.new("RGB", (96, 64), (40 * i, 90, 20)).save(root / f"{split}2017" / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 96, "height": 64})
            annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600})
        (root / "annotations").mkdir(exist_ok=True)
        payload = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))


def test_every_bad_image_of_both_splits_is_reported_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: a corrupt validation image was found only after a training epoch."""
    write_coco(tmp_path / "coco")
    (tmp_path / "coco" / "val2017" / "2.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "coco" / "train2017" / "3.png").write_bytes(b"")
    no_training(monkeypatch)
    with pytest.raises(BadDataError, match=r"2 image file\(s\) cannot be used") as caught:
        Trainer.from_config(config(tmp_path / "out", coco_path=str(tmp_path / "coco"), scale="synthetic"))
    assert str(tmp_path / "coco" / "train2017" / "3.png") in str(caught.value)
    assert str(tmp_path / "coco" / "val2017" / "2.png") in str(caught.value)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        trainer = Trainer.from_config(
            config(
                tmp_path / "out", coco_path=str(tmp_path / "coco"), scale="synthetic", skip_bad_data=True, batch_size=2
            )
        )
    assert trainer.data.train.ids == [1, 2, 4] and trainer.data.val.ids == [1, 3, 4]
    assert trainer.data.val.skipped == {"unreadable images": 1}


def test_skipped_images_are_never_replaced_by_images_outside_the_subset(tmp_path: Path) -> None:
    """Issue 11: --skip_bad_data substituted the next image, even one outside --max_train_images."""
    write_coco(tmp_path / "coco", count=6)
    (tmp_path / "coco" / "train2017" / "2.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        trainer = Trainer.from_config(
            config(
                tmp_path / "out", coco_path=str(tmp_path / "coco"), scale="synthetic", skip_bad_data=True, batch_size=1
            )
        )
    loader = trainer._loader(trainer.data.train, train=True)
    seen = sorted(int(t["image_id"]) for _, targets in loader for t in targets)
    assert seen == [1, 3, 4, 5]  # the first 4 readable images; image 6 never stands in for 2


def test_non_finite_weights_stop_before_the_matcher_and_are_never_saved(tmp_path: Path) -> None:
    """Issue 11: NaN weights died in the matcher ('matrix contains invalid numeric entries')."""
    trainer = Trainer.from_config(config(tmp_path))
    with torch.no_grad():
        trainer.model.class_embed.weight[0, 0] = float("nan")
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite predictions at epoch 0, step 0 \(pred_logits.*no checkpoint was written yet",
    ):
        trainer.run()
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_a_diverging_learning_rate_stops_with_non_finite_loss_error(tmp_path: Path) -> None:
    """Issue 11: with --lr 1e9 the run died in the matcher (``boxes1 has boxes with x1 < x0``)."""
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite predictions at epoch 1, step 0 \(pred_logits, .*before the losses.*"
        r"the last good checkpoint is .*checkpoint.pth \(epoch 0\)\. Lower --lr",
    ):
        Trainer.from_config(config(tmp_path, lr=1e9, epochs=2)).run()
    kept = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert kept["epoch"] == 0 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_a_nan_from_the_last_update_of_an_epoch_is_not_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: a NaN injected in the last step of an epoch was saved in the checkpoint."""
    trainer = Trainer.from_config(config(tmp_path, epochs=2))
    train_one_epoch = trainer.train_one_epoch

    def poisoned(epoch: int) -> dict[str, float]:
        stats = train_one_epoch(epoch)
        if epoch == 1:  # as if the last update of epoch 1 had produced an infinite weight
            with torch.no_grad():
                trainer.model.bbox_embed.layers[0].bias[3] = float("inf")
        return stats

    monkeypatch.setattr(trainer, "train_one_epoch", poisoned)
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite weights at the end of epoch 1 \(bbox_embed.layers.0.bias\); no checkpoint was written"
        r".*checkpoint.pth \(epoch 0\)",
    ):
        trainer.run()
    kept = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert kept["epoch"] == 0 and torch.isfinite(kept["model"]["bbox_embed.layers.0.bias"]).all()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the cheapest run (its checkpoint and log)."""
    output = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDETR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        Trainer.from_config(config(output, epochs=1)).run()
    return output


def test_resuming_a_finished_run_is_refused(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: resuming a finished run exited 0 having done nothing."""
    no_training(monkeypatch)
    checkpoint = str(finished_run / CHECKPOINT_NAME)
    with pytest.raises(
        PreflightError, match=r"finished epoch 0 \(1 epoch\(s\)\) and --epochs is 1.*--epochs N with N > 1"
    ):
        Trainer.from_config(config(finished_run, resume=checkpoint))


def test_resume_flags_win_over_the_checkpoint_and_are_noted(
    finished_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11: --resume silently ignored an explicit --lr / --lr_backbone."""
    no_training(monkeypatch)
    checkpoint = str(finished_run / CHECKPOINT_NAME)
    trainer = Trainer.from_config(
        config(finished_run, resume=checkpoint, epochs=3, lr=1e-3, lr_backbone=2e-5, lr_drop=2)
    )
    assert trainer.start_epoch == 1
    # the schedule reached epoch 1 of step decay every 2 epochs: no decay yet
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 2e-5]
    assert trainer.schedule.lr_drop == 2 and trainer.scheduler.base_lrs == [1e-3, 2e-5]
    steps_per_epoch = trainer.schedule.steps_per_epoch
    assert trainer.scheduler.last_epoch == steps_per_epoch  # one epoch of optimiser steps taken
    epoch_2 = trainer.schedule.factor(2 * steps_per_epoch)  # the first step of epoch 2: decayed by 0.1
    assert [base * epoch_2 for base in trainer.scheduler.base_lrs] == pytest.approx([1e-4, 2e-6])
    out = capsys.readouterr().out
    assert "--resume: --lr 0.001 (the checkpoint's run had 0.0005); this run's value wins" in out
    assert "--resume: --epochs 3 (the checkpoint's run had 1)" in out


def test_resume_into_another_architecture_is_refused_with_the_list(
    finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_training(monkeypatch)
    checkpoint = str(finished_run / CHECKPOINT_NAME)
    with pytest.raises(
        PreflightError,
        match=r"model differs.*\n  hidden_dim: checkpoint 32, this run 64\n  ffn_dim: checkpoint 32, this run 64",
    ):
        Trainer.from_config(
            config(
                finished_run,
                resume=checkpoint,
                epochs=2,
                model_overrides={"hidden_dim": 64, "ffn_dim": 64, "num_queries": 6},
            )
        )
