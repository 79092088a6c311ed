"""An exponential moving average (EMA) of the weights, evaluated and saved in place of the raw ones.

A training aid that leaves the model unchanged: the averaged weights are weights of the same
architecture. The averaging is ``torch.optim.swa_utils.AveragedModel``'s; this module supplies
its update rule with a warm-up of the decay (as in timm's and YOLO's model EMA), so that a short
run is not dominated by its random initial weights:

    decay_n = min(decay, (1 + n) / (10 + n))       n = updates already averaged

Early on the average spans about ``n / 9`` recent steps; later at most ``1 / (1 - decay)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

#: The warm-up's constant: ``decay_n = min(decay, (1 + n) / (WARMUP + n))``.
WARMUP = 10


def ramped_decay(decay: float, updates: int) -> float:
    """The decay of the update after ``updates`` earlier ones: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1 + updates) / (WARMUP + updates))


#: A list of tensors as ``AveragedModel`` hands them to its ``multi_avg_fn``.
Tensors = tuple[Tensor, ...] | list[Tensor]


def ema_update(decay: float) -> Callable[[Tensors, Tensors, Tensor | int], None]:
    """``AveragedModel``'s ``multi_avg_fn``: ``average <- d * average + (1 - d) * current`` with
    ``d = ramped_decay(decay, n)`` (``n`` is the model's ``n_averaged`` count)."""

    @torch.no_grad()
    def update(averaged: Tensors, current: Tensors, n_averaged: Tensor | int) -> None:
        # AveragedModel hands the tensors over grouped by dtype: integer buffers keep their first copy
        if averaged and averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - ramped_decay(decay, int(n_averaged)))

    return update


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model``'s parameters and buffers with :func:`ramped_decay`'s warm-up.

    ``.module`` is a copy of ``model`` (a :class:`~sdetr.model.Detector`) with the averaged weights; call
    ``.update_parameters(model)`` after every optimiser step (the first call copies the weights).

    Raises:
        ValueError: ``decay`` outside ``(0, 1)``.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay {decay}: use a value in (0, 1), e.g. 0.998")
    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)
