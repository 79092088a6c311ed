"""COCO evaluation with pycocotools: the 12 bbox stats, a printed table, a results JSON."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from sdetr.atomic_files import atomic_path

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def to_coco_results(detections: list[dict[str, Tensor]], image_ids: list[int]) -> list[dict[str, Any]]:
    """Post-processed detections (absolute xyxy in original pixels) -> COCO results entries."""
    results = []
    for image_id, det in zip(image_ids, detections, strict=True):
        boxes = det["boxes"].detach().cpu()
        xywh = boxes.clone()
        xywh[:, 2:] = boxes[:, 2:] - boxes[:, :2]
        for box, score, label in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)})
    return results


def coco_stats(coco_gt: COCO, results: list[dict[str, Any]], image_ids: list[int] | None = None) -> list[float]:
    """The 12 COCOeval bbox stats (AP, AP50, ..., ARl) of ``results`` against ``coco_gt``."""
    if not results:
        return [0.0] * len(STAT_NAMES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(x) for x in evaluator.stats]


def format_stats(stats: list[float]) -> str:
    """A two-row table of the 12 stats."""
    header = " ".join(f"{name:>6}" for name in STAT_NAMES)
    values = " ".join(f"{value:6.3f}" for value in stats)
    return f"{header}\n{values}"


def write_json_atomic(payload: Any, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload))
    return Path(path)
