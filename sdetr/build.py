"""Building models from preset names or configs."""

from __future__ import annotations

from typing import Any

from sdetr.config import ModelConfig, get_config
from sdetr.model.detector import Detector


def build_model(preset: str | ModelConfig = "sdetr", **overrides: Any) -> Detector:
    """A model with fresh weights (no download): ``build_model("sdetr-tiny", num_classes=5)``.

    Args:
        preset: a preset name (see ``sdetr.PRESETS``) or a full :class:`ModelConfig`.
        overrides: config fields to change, e.g. ``hidden_dim=128``.
    """
    config = preset.replace(**overrides) if isinstance(preset, ModelConfig) else get_config(preset, **overrides)
    return Detector(config)


def count_parameters(model: Detector, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, as the original ``n_parameters`` log entry."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
