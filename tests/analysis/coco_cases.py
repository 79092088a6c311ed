"""Hand-made COCO ground truth and detections for the breakdown tests."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

Box = Sequence[float]  # x, y, w, h in pixels


def make_coco(
    objects: Sequence[tuple[int, int, Box]],
    categories: Sequence[int] = (1, 2),
    images: Sequence[int] = (1,),
    size: tuple[int, int] = (200, 200),
) -> COCO:
    """A COCO index of ``(image_id, category_id, xywh box)`` objects; area = w * h, ids from 1."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": size[0], "width": size[1], "file_name": f"{i}.png"} for i in images],
        "annotations": [
            {
                "id": k,
                "image_id": im,
                "category_id": c,
                "bbox": [float(v) for v in b],
                "area": float(b[2] * b[3]),
                "iscrowd": 0,
            }
            for k, (im, c, b) in enumerate(objects, start=1)
        ],
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def det(category: int, box: Box, score: float, image: int = 1) -> dict[str, Any]:
    return {"image_id": image, "category_id": category, "bbox": [float(v) for v in box], "score": score}


def summarize(coco: COCO, detections: list[dict[str, Any]]) -> np.ndarray:
    """COCOeval's 12 ``stats`` with its default parameters (the reference every breakdown must match)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def mixed_scene() -> tuple[COCO, list[dict[str, Any]]]:
    """Three images, two classes, boxes from 8 to 150 px: hits, misses, a wrong class, duplicates,
    shifted boxes and background detections."""
    objects = [
        (1, 1, (10, 10, 8, 8)),
        (1, 1, (40, 10, 20, 20)),
        (1, 2, (80, 80, 50, 40)),
        (1, 2, (5, 100, 150, 90)),
        (2, 1, (20, 20, 12, 30)),
        (2, 2, (60, 60, 90, 90)),
        (2, 1, (150, 10, 40, 40)),
        (3, 2, (30, 30, 25, 25)),
        (3, 1, (100, 100, 70, 60)),
        (3, 2, (5, 150, 14, 14)),
    ]
    coco = make_coco(objects, categories=(1, 2, 3), images=(1, 2, 3))
    detections = [
        det(1, (10, 10, 8, 8), 0.95, 1),
        det(1, (42, 11, 20, 20), 0.80, 1),
        det(2, (85, 80, 50, 40), 0.70, 1),
        det(2, (5, 100, 150, 90), 0.60, 1),
        det(2, (7, 102, 150, 90), 0.55, 1),
        det(1, (170, 170, 20, 20), 0.90, 1),
        det(1, (20, 25, 12, 30), 0.50, 2),
        det(1, (60, 60, 90, 90), 0.85, 2),
        det(2, (70, 70, 60, 60), 0.40, 2),
        det(2, (30, 30, 25, 25), 0.30, 3),
        det(1, (110, 100, 70, 60), 0.65, 3),
        det(3, (5, 5, 10, 10), 0.99, 3),
        det(2, (6, 151, 14, 14), 0.45, 3),
    ]
    return coco, detections


@st.composite
def scenes(draw: Any) -> tuple[Any, list[dict[str, Any]]]:
    """1-3 images with 0-6 objects of sides 4..180 px in 3 classes; detections near some of them
    (jittered, some relabelled) plus background boxes."""
    n_images = draw(st.integers(1, 3))
    objects = []
    for image in range(1, n_images + 1):
        for _ in range(draw(st.integers(0, 6))):
            w, h = draw(st.floats(4, 180)), draw(st.floats(4, 180))
            x, y = draw(st.floats(0, 300 - w)), draw(st.floats(0, 300 - h))
            objects.append((image, draw(st.integers(1, 3)), (x, y, w, h)))
    coco = make_coco(objects, categories=(1, 2, 3), images=tuple(range(1, n_images + 1)), size=(300, 300))
    detections = []
    for image, category, (x, y, w, h) in objects:
        for _ in range(draw(st.integers(0, 2))):
            dx, dy = draw(st.floats(-0.4, 0.4)) * w, draw(st.floats(-0.4, 0.4)) * h
            label = category if draw(st.booleans()) else draw(st.integers(1, 3))
            detections.append(det(label, (x + dx, y + dy, w, h), draw(st.floats(0.01, 1)), image))
    for _ in range(draw(st.integers(0, 4))):
        side = draw(st.floats(4, 100))
        detections.append(
            det(
                draw(st.integers(1, 3)),
                (draw(st.floats(0, 200)), draw(st.floats(0, 200)), side, side),
                draw(st.floats(0.01, 1)),
                draw(st.integers(1, n_images)),
            )
        )
    return coco, detections
