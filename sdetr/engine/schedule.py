"""The learning-rate schedule: a factor of the base rates for every optimiser step.

The factor is a pure function of the step count and the run's options, so a resumed run needs
only the number of steps taken (the run's own ``lr``, ``lr_drop`` ... apply from there on).

- ``step`` (the original recipe): x0.1 after every ``lr_drop`` epochs.
- ``cosine``: from 1 down to 0 over the whole run, half a cosine period.

Either starts with ``warmup_steps`` of linear warm-up (0: none, as in the original recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: The schedules by name (``TrainConfig.schedule``).
ScheduleName = Literal["step", "cosine"]
#: The ``step`` schedule's factor per ``lr_drop`` epochs (DETR's StepLR gamma).
STEP_DECAY = 0.1


@dataclass(frozen=True)
class LearningRateSchedule:
    """The factor of the base learning rates at each optimiser step (0-based)."""

    name: ScheduleName
    steps_per_epoch: int
    epochs: int
    lr_drop: int = 1  # epochs between x0.1 decays (``step`` only)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.epochs < 1 or self.lr_drop < 1 or self.warmup_steps < 0:
            raise ValueError(f"a schedule needs positive steps_per_epoch, epochs and lr_drop: {self}")

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def factor(self, step: int) -> float:
        """The factor of the base rates for the optimiser step ``step`` (0-based)."""
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.name == "step":
            return warmup * STEP_DECAY ** (step // self.steps_per_epoch // self.lr_drop)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / decay_steps))
        return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))
