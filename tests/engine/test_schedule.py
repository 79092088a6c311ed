"""The per-step learning-rate schedule: hand-computed factors, and old checkpoints' step counts."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdetr.checkpoints import CheckpointError
from sdetr.engine.schedule import LearningRateSchedule
from sdetr.engine.trainer import steps_taken


def test_step_schedule_decays_tenfold_every_lr_drop_epochs() -> None:
    schedule = LearningRateSchedule("step", steps_per_epoch=10, epochs=6, lr_drop=2)
    factors = [schedule.factor(step) for step in (0, 19, 20, 39, 40, 59)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_warmup_rises_linearly_then_hands_over() -> None:
    schedule = LearningRateSchedule("step", steps_per_epoch=10, epochs=2, lr_drop=1, warmup_steps=4)
    assert [schedule.factor(step) for step in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert schedule.factor(10) == pytest.approx(0.1)


def test_cosine_goes_from_one_to_zero_over_the_run() -> None:
    schedule = LearningRateSchedule("cosine", steps_per_epoch=5, epochs=2)
    assert schedule.factor(0) == 1.0
    assert schedule.factor(5) == pytest.approx(0.5)  # half-way: cos(pi / 2)
    assert schedule.factor(10) == pytest.approx(0.0, abs=1e-12)
    warm = LearningRateSchedule("cosine", steps_per_epoch=5, epochs=2, warmup_steps=2)
    assert warm.factor(0) == 0.5 and warm.factor(1) == 1.0  # decay starts after the warm-up
    assert warm.factor(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


@given(
    st.sampled_from(["step", "cosine"]),
    st.integers(1, 50),
    st.integers(1, 20),
    st.integers(1, 5),
    st.integers(0, 100),
)
def test_factors_stay_in_range_and_never_rise_after_warmup(
    name: str, steps_per_epoch: int, epochs: int, lr_drop: int, warmup: int
) -> None:
    schedule = LearningRateSchedule(name, steps_per_epoch, epochs, lr_drop, warmup)  # type: ignore[arg-type]
    factors = [schedule.factor(step) for step in range(schedule.total_steps)]
    assert all(0.0 <= f <= 1.0 for f in factors)
    after = factors[warmup:]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after))


def test_old_per_epoch_checkpoints_resume_at_the_next_epochs_first_step() -> None:
    path = Path("run/checkpoint.pth")
    assert steps_taken({"last_epoch": 42, "base_lrs": [1e-4]}, 10, path) == 42  # per-step: a step count
    assert steps_taken({"last_epoch": 3, "step_size": 7, "gamma": 0.1}, 10, path) == 30  # StepLR: epochs
    with pytest.raises(CheckpointError, match=r"run/checkpoint.pth: its 'lr_scheduler' entry has no step count"):
        steps_taken({}, 10, path)
