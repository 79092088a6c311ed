"""The EMA of the weights: its decay warm-up by hand, and the trainer evaluating and saving it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sdetr.engine import TrainConfig, Trainer
from sdetr.engine.averaging import ramped_decay, weight_average
from sdetr.engine.trainer import AVERAGE_UPDATES_KEY, CHECKPOINT_NAME, TRAINING_WEIGHTS_KEY
from tests.engine.test_trainer import small_config


def test_ramped_decay_by_hand() -> None:
    assert ramped_decay(0.998, 0) == pytest.approx(1 / 10)
    assert ramped_decay(0.998, 1) == pytest.approx(2 / 11)
    assert ramped_decay(0.998, 90) == pytest.approx(91 / 100)
    assert ramped_decay(0.998, 10_000) == 0.998  # (10001 / 10010) = 0.9991 > 0.998: capped
    assert ramped_decay(0.5, 3) == pytest.approx(4 / 13)  # warm-up below the cap
    assert ramped_decay(0.5, 20) == 0.5  # 21 / 30 > 0.5: capped


@given(st.floats(0.01, 0.9999), st.integers(0, 10**6))
def test_ramped_decay_stays_below_the_decay_and_never_falls(decay: float, updates: int) -> None:
    assert 0.0 < ramped_decay(decay, updates) <= decay
    assert ramped_decay(decay, updates + 1) >= ramped_decay(decay, updates)


def test_weight_average_by_hand() -> None:
    layer = nn.Linear(1, 1, bias=False)
    average = weight_average(layer, decay=0.9)
    for value in (2.0, 4.0, 10.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update_parameters(layer)
    # first update copies 2; then d = 2/11 with 4, then d = 3/12 with 10
    after_two = 2 / 11 * 2.0 + 9 / 11 * 4.0
    expected = 3 / 12 * after_two + 9 / 12 * 10.0
    assert float(average.module.weight.detach()) == pytest.approx(expected, rel=1e-6)
    assert int(average.n_averaged) == 3


def test_bad_decay_is_refused() -> None:
    with pytest.raises(ValueError, match=r"EMA decay 1\.0"):
        weight_average(nn.Linear(1, 1), 1.0)
    with pytest.raises(ValueError, match=r"--ema_decay 1\.5"):
        TrainConfig(ema_decay=1.5)


def test_the_trainer_evaluates_and_saves_the_average_of_its_steps(tmp_path: Path) -> None:
    config = small_config(tmp_path, epochs=2, ema_decay=0.9, eval_every=1)
    trainer = Trainer.from_config(config)
    assert trainer.evaluated_model is trainer.model  # nothing averaged yet
    steps: list[dict[str, torch.Tensor]] = []
    trainer.optimizer.register_step_post_hook(
        lambda *_: steps.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    )
    entries = trainer.run()
    assert len(steps) == 4  # 2 epochs x 2 steps
    expected = dict(steps[0])
    for n, state in enumerate(steps[1:], start=1):
        d = ramped_decay(0.9, n)
        expected = {k: d * expected[k] + (1 - d) * state[k] if v.is_floating_point() else v for k, v in state.items()}
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved[AVERAGE_UPDATES_KEY] == 4
    for key, value in saved[TRAINING_WEIGHTS_KEY].items():
        assert torch.equal(value, steps[-1][key]), key  # the raw weights, for --resume
    for key, value in saved["model"].items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)  # what load_model reads
    assert not torch.equal(saved["model"]["class_embed.weight"], steps[-1]["class_embed.weight"])
    # the logged evaluation is the saved model's: --eval of the checkpoint gives the same stats
    evaluated = Trainer.from_config(
        small_config(tmp_path / "eval", eval_only=True, resume=str(tmp_path / CHECKPOINT_NAME))
    ).run()[0]
    assert evaluated["test_coco_eval_bbox"] == entries[-1]["test_coco_eval_bbox"]
    assert evaluated["test_loss"] == pytest.approx(entries[-1]["test_loss"], rel=1e-6)
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert log[-1]["test_coco_eval_bbox"] == entries[-1]["test_coco_eval_bbox"]


def test_without_an_average_the_checkpoint_holds_the_trained_weights(tmp_path: Path) -> None:
    trainer = Trainer.from_config(small_config(tmp_path, epochs=1, ema_decay=0.0))
    trainer.run()
    assert trainer.average is None and trainer.evaluated_model is trainer.model
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert TRAINING_WEIGHTS_KEY not in saved and AVERAGE_UPDATES_KEY not in saved
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][key], value), key


def test_resume_restores_the_average(tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch + resume + 1 epoch, for the average and for the raw weights."""
    Trainer.from_config(small_config(tmp_path / "straight", ema_decay=0.9)).run()
    Trainer.from_config(small_config(tmp_path / "split", epochs=1, ema_decay=0.9)).run()
    resumed = Trainer.from_config(
        small_config(tmp_path / "split", ema_decay=0.9, resume=str(tmp_path / "split" / CHECKPOINT_NAME))
    )
    assert resumed.average is not None and int(resumed.average.n_averaged) == 2
    resumed.run()
    straight = torch.load(tmp_path / "straight" / CHECKPOINT_NAME, weights_only=True)
    split = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=True)
    for entry in ("model", TRAINING_WEIGHTS_KEY):
        for key, value in straight[entry].items():
            assert torch.equal(value, split[entry][key]), (entry, key)
