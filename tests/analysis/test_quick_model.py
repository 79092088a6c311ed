"""``quick_checkpoint`` trains once per run description and then only reads the cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import analysis.quick_model as quick_model
from analysis.quick_model import QuickRun, quick_checkpoint, quick_dataset
from sdetr import get_config, load_model


def test_trains_once_then_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path))
    run = QuickRun(epochs=1, lr_drop=1, batch_size=2, train_images=2, val_images=2)
    path = quick_checkpoint(run)
    assert path.is_file() and path.parent.parent == tmp_path / "models"
    model = load_model(path)
    assert model.config.name == "sdetr-tiny" and model.config.num_classes == 5  # 4 shapes, ids 1..4
    assert not [p for p in path.parent.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("trained again although the checkpoint is cached")

    monkeypatch.setattr(quick_model, "Trainer", fail)
    assert quick_checkpoint(run) == path
    assert QuickRun(epochs=2).key() != QuickRun(epochs=1).key()
    defaults = QuickRun().key()
    shipped = QuickRun.train_config
    monkeypatch.setattr(QuickRun, "train_config", lambda self, out: replace(shipped(self, out), ema_decay=0.5))
    assert QuickRun().key() != defaults  # another trainer default: a new model, not an old default's
    monkeypatch.undo()
    monkeypatch.setattr(quick_model, "get_config", lambda preset, **kw: get_config(preset, backbone="resnet18", **kw))
    assert QuickRun().key() != defaults  # the preset builds another model (sdetr-tiny's backbone changed)
    assert len(quick_dataset(run)) == 2
