"""sdetr: train and dissect Stacked-DETR object detectors.

Public API::

    from sdetr import build_model, load_model
    model = load_model("checkpoint.pth")   # eval mode
    out = model(images)                    # [B, 3, H, W] normalised, or a list of [3, H, W]
"""

from sdetr.build import build_model, count_parameters
from sdetr.checkpoints import CheckpointError, load_model, save_model, to_original_state_dict
from sdetr.config import PRESETS, ModelConfig, StageConfig, get_config
from sdetr.instrument import (
    GridGeometry,
    Recording,
    RecordingBudgetError,
    RecordingError,
    SiteGrids,
    estimate_bytes,
    gate_heads,
    load_recording,
    patch_attention,
    record,
    sites,
)
from sdetr.model import (
    CriterionConfig,
    Detector,
    HungarianMatcher,
    ImageBatch,
    SetCriterion,
    normalize_image,
    postprocess,
)

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "GridGeometry",
    "Recording",
    "RecordingBudgetError",
    "RecordingError",
    "SiteGrids",
    "estimate_bytes",
    "gate_heads",
    "load_recording",
    "patch_attention",
    "record",
    "sites",
    "CheckpointError",
    "CriterionConfig",
    "Detector",
    "HungarianMatcher",
    "ImageBatch",
    "ModelConfig",
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
]
