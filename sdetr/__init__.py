"""sdetr: train and dissect Stacked-DETR object detectors.

Public API::

    from sdetr import build_model, load_model
    model = load_model("checkpoint.pth")   # eval mode
    out = model(images)                    # [B, 3, H, W] normalised, or a list of [3, H, W]
"""

from sdetr.atomic_files import atomic_path
from sdetr.build import build_model, count_parameters
from sdetr.checkpoints import CheckpointError, load_model, save_model, to_original_state_dict
from sdetr.config import PRESETS, ConfigError, ModelConfig, StageConfig, get_config
from sdetr.data import (
    BadDataError,
    CocoDetection,
    CocoPaths,
    SyntheticSpec,
    build_transforms,
    collate,
    default_cache_dir,
    generate_synthetic_coco,
    load_coco,
    synthetic_image,
    synthetic_root,
)
from sdetr.engine import (
    STAT_NAMES,
    NonFiniteLossError,
    PreflightError,
    TrainConfig,
    Trainer,
    TrainingData,
    build_criterion,
    build_data,
    build_training_model,
    coco_stats,
    to_coco_results,
)
from sdetr.errors import UserError
from sdetr.instrument import (
    GridGeometry,
    Recording,
    RecordingBudgetError,
    RecordingError,
    Selection,
    SiteGrids,
    SiteInfo,
    estimate_bytes,
    format_bytes,
    gate_heads,
    load_recording,
    patch_attention,
    record,
    save_recording,
    sites,
    weights_sha256,
)
from sdetr.model import (
    BACKBONE_SPEEDS,
    BackboneSpeed,
    CriterionConfig,
    Denoiser,
    DenoisingBatch,
    Detector,
    HungarianMatcher,
    ImageBatch,
    QueryGroups,
    SetCriterion,
    normalize_image,
    postprocess,
)

__version__ = "0.1.0"

__all__ = [
    # data
    "BadDataError",
    "CocoDetection",
    "CocoPaths",
    "SyntheticSpec",
    "build_transforms",
    "collate",
    "generate_synthetic_coco",
    "load_coco",
    "synthetic_image",
    "synthetic_root",
    "default_cache_dir",
    # training and COCO evaluation
    "NonFiniteLossError",
    "PreflightError",
    "STAT_NAMES",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "build_criterion",
    "build_data",
    "build_training_model",
    "coco_stats",
    "to_coco_results",
    # instrumentation
    "PRESETS",
    "GridGeometry",
    "Recording",
    "RecordingBudgetError",
    "RecordingError",
    "Selection",
    "SiteGrids",
    "SiteInfo",
    "estimate_bytes",
    "format_bytes",
    "gate_heads",
    "load_recording",
    "patch_attention",
    "record",
    "save_recording",
    "sites",
    "weights_sha256",
    # files
    "atomic_path",
    # models and checkpoints
    "BACKBONE_SPEEDS",
    "BackboneSpeed",
    "CheckpointError",
    "ConfigError",
    "CriterionConfig",
    "Denoiser",
    "DenoisingBatch",
    "Detector",
    "HungarianMatcher",
    "ImageBatch",
    "ModelConfig",
    "QueryGroups",
    "SetCriterion",
    "StageConfig",
    "__version__",
    "build_model",
    "count_parameters",
    "get_config",
    "load_model",
    "normalize_image",
    "postprocess",
    "save_model",
    "to_original_state_dict",
    # errors of the user's input (the base class of every error type above)
    "UserError",
]
