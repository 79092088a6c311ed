"""Training and evaluation: the trainer, distributed set-up, COCO evaluation, run options."""

from sdetr.engine.evaluation import STAT_NAMES, coco_stats, format_stats, to_coco_results
from sdetr.engine.options import ORIGINAL_RECIPE, TrainConfig
from sdetr.engine.preflight import PreflightError
from sdetr.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "ORIGINAL_RECIPE",
    "STAT_NAMES",
    "NonFiniteLossError",
    "PreflightError",
    "TrainConfig",
    "Trainer",
    "coco_stats",
    "format_stats",
    "to_coco_results",
]
