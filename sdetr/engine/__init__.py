"""Training and evaluation: the trainer and the parts it is built from, distributed set-up, COCO
evaluation, run options."""

from sdetr.engine.averaging import weight_average
from sdetr.engine.components import TrainingData, build_criterion, build_data, build_training_model
from sdetr.engine.evaluation import STAT_NAMES, coco_stats, format_stats, to_coco_results
from sdetr.engine.options import BEFORE_THE_OPTION, ORIGINAL_RECIPE, TrainConfig
from sdetr.engine.preflight import PreflightError
from sdetr.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "BEFORE_THE_OPTION",
    "ORIGINAL_RECIPE",
    "STAT_NAMES",
    "NonFiniteLossError",
    "PreflightError",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "build_criterion",
    "build_data",
    "build_training_model",
    "coco_stats",
    "format_stats",
    "to_coco_results",
    "weight_average",
]
