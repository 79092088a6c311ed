"""Data: COCO detection (pycocotools), DETR transforms, the embedded synthetic set."""

from sdetr.data.annotations import BadDataError, load_coco
from sdetr.data.coco import CocoDetection, CocoPaths, collate
from sdetr.data.synthetic import (
    SyntheticSpec,
    default_cache_dir,
    generate_synthetic_coco,
    synthetic_image,
    synthetic_root,
)
from sdetr.data.transforms import SCALES, Scale, build_transforms

__all__ = [
    "SCALES",
    "BadDataError",
    "CocoDetection",
    "CocoPaths",
    "Scale",
    "SyntheticSpec",
    "build_transforms",
    "collate",
    "generate_synthetic_coco",
    "load_coco",
    "synthetic_image",
    "synthetic_root",
    "default_cache_dir",
]
