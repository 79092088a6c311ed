"""Model components: backbone, positions, attention, transformer, detector, losses."""

from sdetr.model.attention import Attention, AttentionProbe, attention_weights
from sdetr.model.backbone import BACKBONE_SPEEDS, Backbone, BackboneSpeed
from sdetr.model.criterion import CriterionConfig, SetCriterion
from sdetr.model.denoising import Denoiser, DenoisingBatch
from sdetr.model.detector import Detector, Stage
from sdetr.model.images import ImageBatch, normalize_image
from sdetr.model.matcher import HungarianMatcher
from sdetr.model.postprocess import postprocess
from sdetr.model.query_groups import QueryGroups

__all__ = [
    "BACKBONE_SPEEDS",
    "Attention",
    "AttentionProbe",
    "Backbone",
    "BackboneSpeed",
    "CriterionConfig",
    "Denoiser",
    "DenoisingBatch",
    "Detector",
    "HungarianMatcher",
    "ImageBatch",
    "QueryGroups",
    "SetCriterion",
    "Stage",
    "attention_weights",
    "normalize_image",
    "postprocess",
]
