"""COCO evaluation agrees with pycocotools on hand-made ground truth and detections."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sdetr.engine import STAT_NAMES, coco_stats, format_stats, to_coco_results


def _ground_truth(tmp_path: Path) -> COCO:
    payload = {
        "images": [{"id": 1, "width": 200, "height": 100}, {"id": 2, "width": 200, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 20, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 30, 120, 60], "area": 7200, "iscrowd": 0},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(payload))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


DETECTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": [12, 11, 48, 40], "score": 0.9},
    {"image_id": 1, "category_id": 2, "bbox": [140, 20, 20, 20], "score": 0.8},  # misplaced
    {"image_id": 2, "category_id": 1, "bbox": [30, 30, 120, 60], "score": 0.7},
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.3},  # false positive
]


def test_matches_pycocotools(tmp_path: Path) -> None:
    gt = _ground_truth(tmp_path)
    ours = coco_stats(gt, DETECTIONS)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(DETECTIONS), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert ours == pytest.approx(list(evaluator.stats))
    assert 0 < ours[0] < 1 and len(ours) == len(STAT_NAMES) == 12


def test_perfect_and_empty_detections(tmp_path: Path) -> None:
    gt = _ground_truth(tmp_path)
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt.anns.values()
    ]
    stats = coco_stats(gt, perfect)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    assert coco_stats(gt, []) == [0.0] * 12


def test_to_coco_results_converts_xyxy_to_xywh() -> None:
    det = {
        "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([3]),
    }
    assert to_coco_results([det], [7]) == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.5}
    ]
    assert format_stats([0.5] * 12).splitlines()[0].split()[:2] == ["AP", "AP50"]
