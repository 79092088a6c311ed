"""The detector really learns: it fits a small set far below the constant-prediction loss,
and the evaluation path scores what it learned."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdetr.data import CocoDetection, CocoPaths, build_transforms
from sdetr.engine import TrainConfig, Trainer


def test_fits_eight_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path / "cache"))
    config = TrainConfig(
        synthetic_train=8, synthetic_val=2, batch_size=4, epochs=60, lr_drop=1000, eval_every=0, augment=False,
        output_dir=str(tmp_path / "out"), device="cpu",
    )  # fmt: skip
    trainer = Trainer(config)
    first = trainer.train_one_epoch(0)
    for epoch in range(1, config.epochs):
        last = trainer.train_one_epoch(epoch)
    # predicting one constant class distribution for every query gives about 1.47 here
    assert first["loss_ce"] > 1.3
    assert last["loss_ce"] < 0.9 and last["loss_giou"] < 0.7 and last["class_error"] < 40
    assert last["loss"] < 0.6 * first["loss"]
    # the whole evaluation path (post-processing, original sizes, COCO results, COCOeval) sees it:
    trainer.data.val = CocoDetection(CocoPaths(trainer.data.root, "train"), build_transforms("synthetic", False))
    stats, _ = trainer.evaluate()
    assert stats[1] > 0.5, stats  # AP50 on the memorised images
