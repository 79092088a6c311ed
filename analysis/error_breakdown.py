"""TIDE-style error breakdown (Bolya et al., ECCV 2020): how much AP each kind of error costs.

The maintained-package route was checked first: ``tidecv`` 1.0.1 (PyPI, August 2020, the latest
release) computes its own matching and AP outside COCOeval, cannot break errors down by size
(``TIDE.add_qualifiers`` raises ``NotImplementedError``) and needs opencv, seaborn and appdirs.
So TIDE's definitions are re-stated here on top of pycocotools: true / false positives come
from COCOeval's own matching (``evalImgs`` at IoU ``iou``), each error type is fixed by editing
the detections or the ground truth, and COCOeval scores the fixed set again.

Definitions (TIDE's ``quantify.py`` / ``errors/main_errors.py``, in its order). With ``t_f`` =
``iou`` (0.5) and ``t_b`` = ``background_iou`` (0.1), each false positive (a detection that
COCOeval scored and did not match) is tested against every non-crowd ground truth of its image:

1. ``loc``: the highest IoU with a ground truth of its own class is in ``[t_b, t_f]``.
2. ``cls``: IoU >= ``t_f`` with a ground truth of another class.
3. ``dupe``: IoU >= ``t_f`` with a ground truth of its own class that another detection matched.
4. ``bkg``: IoU <= ``t_b`` with every ground truth (also: the image has no ground truth).
5. ``both``: none of the above (wrong class and badly localised).

A ground truth that no detection matched is ``missed`` unless a ``cls`` or ``loc`` error
points at it. The oracle fixes, one type at a time, each from the original detections:

- ``cls`` / ``loc``: among the ``cls`` and ``loc`` errors pointing at one unmatched ground truth
  the highest-scoring one becomes a true positive (relabelled to the ground truth's class and its
  box snapped onto the ground truth's; ``loc`` keeps its class, which is already right); the others
  of the fixed type, and those pointing at a ground truth already matched, are removed.
- ``both``, ``dupe``, ``bkg``: those detections are removed.
- ``missed``: those ground truths are removed (fewer positives to find).

``dAP = AP(fixed) - AP(original)``, clamped at 0 as TIDE does (a negative change would be an
artefact of binning). Two of TIDE's "special" errors come along: ``false_pos`` removes every
false positive and ``false_neg`` every unmatched ground truth. AP is COCOeval's AP at one IoU
threshold (``iou``: AP50 by default) on a 0-1 scale (TIDE prints 0-100).

Size: ``area`` restricts the whole analysis to one COCO area range the way COCOeval restricts
APs: ground truth outside the range is ignored (a detection matching it is neither right nor
wrong), unmatched detections outside it are ignored, and only ground truth inside it can be
missed. Errors are still classified against all of the image's ground truth, so a small false
positive half on a medium object is a ``loc`` error. (TIDE's own size qualifiers, never
released, would instead fix the errors whose ground truth is small and report overall AP.)
Detections that COCOeval ignores (over ``maxDets`` = 100 per image and class, on crowd regions,
outside the area range) are not errors.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from analysis.breakdowns import (
    COCO_AREAS,
    DetectionsInput,
    GroundTruth,
    as_coco,
    as_results,
    coco_area_ranges,
    run_cocoeval,
)

#: TIDE's six main error types, in TIDE's order.
ERROR_TYPES: tuple[str, ...] = ("cls", "loc", "both", "dupe", "bkg", "missed")
#: TIDE's special errors: perfect precision / perfect recall.
SPECIAL_TYPES: tuple[str, ...] = ("false_pos", "false_neg")


@dataclass
class _Errors:
    """Outcome of one COCOeval at one area: detection ids (``loadRes`` order: results index + 1)."""

    true_positives: set[int] = field(default_factory=set)
    false_positives: set[int] = field(default_factory=set)
    unmatched_gt: set[int] = field(default_factory=set)  # inside the area range, matched by nothing
    error: dict[int, str] = field(default_factory=dict)  # detection id -> error type
    target: dict[int, int] = field(default_factory=dict)  # cls / loc detection id -> ground-truth id
    iou: dict[int, float] = field(default_factory=dict)  # detection id -> best IoU with any ground truth
    missed: set[int] = field(default_factory=set)  # ground-truth ids
    fixed_by: dict[int, int] = field(default_factory=dict)  # ground-truth id -> best cls/loc detection id
    ap: float = math.nan
    categories: set[int] = field(default_factory=set)  # categories with ground truth in the area range


def _iou(boxes: list[list[float]], gt_boxes: list[list[float]]) -> np.ndarray:
    """``[D, G]`` COCO IoU of xywh boxes (``pycocotools.mask.iou``; no crowd regions)."""
    if not boxes or not gt_boxes:
        return np.zeros((len(boxes), len(gt_boxes)))
    return np.asarray(mask_utils.iou(boxes, gt_boxes, [0] * len(gt_boxes)), dtype=np.float64).reshape(
        len(boxes), len(gt_boxes)
    )


def _area_range(area: str) -> tuple[str, float, float]:
    ranges = {label: (label, lo, hi) for label, lo, hi in coco_area_ranges()}
    if area not in ranges:
        raise ValueError(f"area must be one of {COCO_AREAS}, got {area!r}")
    return ranges[area]


def _ap(evaluator: COCOeval, categories: set[int] | None = None) -> float:
    """COCOeval's AP at its one IoU threshold and area range (as ``summarize`` reads it).

    Args:
        categories: the categories of the original evaluation. A category a fix left without
            ground truth drops out of COCOeval's mean; TIDE keeps it at AP 0 while it still has
            detections, and so does this (None: plain COCOeval).
    """
    precision = evaluator.eval["precision"][0, :, :, 0, 0]  # [R, K]
    valid = precision > -1  # [R, K]
    params = evaluator.params
    lost = [
        k for k, c in enumerate(params.catIds) if categories is not None and c in categories and not valid[:, k].any()
    ]
    if not lost:
        return float(precision[valid].mean()) if valid.any() else math.nan
    scored = {  # categories with detections COCOeval scores (not ignored)
        int(e["category_id"]) for e in evaluator.evalImgs if e is not None and (~e["dtIgnore"][0].astype(bool)).any()
    }
    per_category = [float(precision[:, k].mean()) for k in range(len(params.catIds)) if valid[:, k].any()]
    per_category += [0.0 for k in lost if params.catIds[k] in scored]
    return float(np.mean(per_category)) if per_category else math.nan


def _evaluate(
    coco: COCO, results: list[dict[str, Any]], area: str, iou: float, image_ids: Sequence[int] | None
) -> COCOeval:
    return run_cocoeval(coco, results, [_area_range(area)], image_ids, iou_thresholds=[iou], max_dets=[100])


def _classify(
    coco: COCO,
    results: list[dict[str, Any]],
    area: str,
    iou: float,
    background_iou: float,
    image_ids: Sequence[int] | None,
) -> _Errors:
    """Match with COCOeval, then sort every false positive and unmatched ground truth into TIDE's types."""
    evaluator = _evaluate(coco, results, area, iou, image_ids)
    precision = evaluator.eval["precision"][0, :, :, 0, 0]  # [R, K]
    found = _Errors(ap=_ap(evaluator))
    found.categories = {int(c) for k, c in enumerate(evaluator.params.catIds) if (precision[:, k] > -1).any()}
    used: set[int] = set()  # ground truth matched by any detection (ignored ones included)
    per_image: dict[int, list[int]] = {}
    for entry in evaluator.evalImgs:
        if entry is None:
            continue
        dt_matches, dt_ignore = entry["dtMatches"][0], entry["dtIgnore"][0]  # [D] at the one IoU threshold
        for j, det_id in enumerate(entry["dtIds"]):
            if dt_ignore[j]:
                continue
            if dt_matches[j] > 0:
                found.true_positives.add(int(det_id))
            else:
                found.false_positives.add(int(det_id))
                per_image.setdefault(int(entry["image_id"]), []).append(int(det_id))
        gt_matches, gt_ignore = entry["gtMatches"][0], entry["gtIgnore"]  # [G]
        for j, gt_id in enumerate(entry["gtIds"]):
            if gt_matches[j] > 0:
                used.add(int(gt_id))
            elif not gt_ignore[j]:
                found.unmatched_gt.add(int(gt_id))
    categories = set(evaluator.params.catIds)
    usable: set[int] = set()
    best_score: dict[int, float] = {}
    for image_id, det_ids in per_image.items():
        det_ids = sorted(det_ids, key=lambda d: -results[d - 1]["score"])  # TIDE walks by score, highest first
        gts = [
            g for g in coco.imgToAnns.get(image_id, []) if not g.get("iscrowd", 0) and g["category_id"] in categories
        ]
        ious = _iou([results[d - 1]["bbox"] for d in det_ids], [g["bbox"] for g in gts])  # [D, G]
        same = np.array(
            [[results[d - 1]["category_id"] == g["category_id"] for g in gts] for d in det_ids], dtype=bool
        ).reshape(len(det_ids), len(gts))  # [D, G]
        matched = np.array([g["id"] in used for g in gts], dtype=bool)[None, :]  # [1, G]
        for row, det_id in enumerate(det_ids):
            found.iou[det_id] = float(ious[row].max()) if gts else 0.0
            if not gts:
                found.error[det_id] = "bkg"
                continue
            own, other, taken = ious[row] * same[row], ious[row] * ~same[row], ious[row] * same[row] * matched[0]
            target: int | None = None
            if background_iou <= own.max() <= iou:
                error, target = "loc", int(own.argmax())
            elif other.max() >= iou:
                error, target = "cls", int(other.argmax())
            elif taken.max() >= iou:
                error = "dupe"
            elif ious[row].max() <= background_iou:
                error = "bkg"
            else:
                error = "both"
            found.error[det_id] = error
            if target is not None:
                gt_id = int(gts[target]["id"])
                found.target[det_id] = gt_id
                if gt_id not in used:  # TIDE's BestGTMatch: one fix per ground truth, the highest score
                    usable.add(gt_id)
                    score = results[det_id - 1]["score"]
                    if best_score.get(gt_id, -1.0) < score:
                        best_score[gt_id], found.fixed_by[gt_id] = score, det_id
    found.missed = found.unmatched_gt - usable
    return found


def _fixed(
    coco: COCO, results: list[dict[str, Any]], found: _Errors, error: str
) -> tuple[COCO, list[dict[str, Any]], int]:
    """Ground truth and detections with every error of type ``error`` fixed; the number of such errors."""
    if error in ("missed", "false_neg"):
        drop = found.missed if error == "missed" else found.unmatched_gt
        dataset = dict(coco.dataset)
        dataset["annotations"] = [copy.copy(a) for a in coco.dataset.get("annotations", []) if a["id"] not in drop]
        fixed_gt = COCO()
        fixed_gt.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            fixed_gt.createIndex()
        return fixed_gt, results, len(drop)
    if error == "false_pos":
        return coco, [r for i, r in enumerate(results, 1) if i not in found.false_positives], len(found.false_positives)
    chosen = {d for d, e in found.error.items() if e == error}
    fixed = []
    for det_id, entry in enumerate(results, 1):
        if det_id not in chosen:
            fixed.append(entry)
            continue
        gt_id = found.target.get(det_id)
        if gt_id is not None and found.fixed_by.get(gt_id) == det_id:  # cls / loc: becomes a true positive
            truth = coco.anns[gt_id]
            fixed.append({**entry, "category_id": int(truth["category_id"]), "bbox": list(truth["bbox"])})
        # anything else of this type is removed
    return coco, fixed, len(chosen)


def error_breakdown(
    gt: GroundTruth,
    detections: DetectionsInput,
    area: str | Sequence[str] = "all",
    iou: float = 0.5,
    background_iou: float = 0.1,
    image_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """dAP per TIDE error type (see the module docstring for the definitions and fixes).

    Args:
        gt: COCO annotation file path or ``COCO``.
        detections: COCO results file path or list of results dicts.
        area: one COCO area range or several (``("all", "small")``: overall and small objects).
        iou: the foreground IoU threshold ``t_f``; AP is COCOeval's AP at this IoU (AP50 at 0.5).
        background_iou: TIDE's background threshold ``t_b``.
        image_ids: images to score (None: every image of ``gt``).
    Returns:
        per area, a ``base`` row (``AP`` the original AP, ``count`` the detections scored) then one
        row per error type: ``area, error, kind`` (``base`` / ``main`` / ``special``), ``AP`` after the
        fix, ``dAP`` (>= 0), ``count`` (errors of that type; ground truths for missed / false_neg).
    """
    if not 0 <= background_iou <= iou <= 1:
        raise ValueError(f"need 0 <= background_iou <= iou <= 1, got background_iou={background_iou}, iou={iou}")
    areas = [area] if isinstance(area, str) else list(area)
    coco = as_coco(gt)
    results = as_results(detections, coco)
    rows: list[dict[str, Any]] = []
    for name in areas:
        found = _classify(coco, results, name, iou, background_iou, image_ids)
        scored = len(found.true_positives) + len(found.false_positives)
        rows.append({"area": name, "error": "base", "kind": "base", "AP": found.ap, "dAP": 0.0, "count": scored})
        for error in (*ERROR_TYPES, *SPECIAL_TYPES):
            fixed_gt, fixed_results, count = _fixed(coco, results, found, error)
            ap = _ap(_evaluate(fixed_gt, fixed_results, name, iou, image_ids), found.categories) if count else found.ap
            change = ap - found.ap if not (math.isnan(ap) and math.isnan(found.ap)) else 0.0
            kind = "main" if error in ERROR_TYPES else "special"
            rows.append(
                {
                    "area": name,
                    "error": error,
                    "kind": kind,
                    "AP": ap,
                    "dAP": max(change, 0.0) if not math.isnan(change) else math.nan,
                    "count": count,
                }
            )
    return pd.DataFrame(rows)


def classify_errors(
    gt: GroundTruth,
    detections: DetectionsInput,
    area: str = "all",
    iou: float = 0.5,
    background_iou: float = 0.1,
    image_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Every error instance behind :func:`error_breakdown`, one row each, for inspection.

    Args:
        gt, detections, area, iou, background_iou, image_ids: as for :func:`error_breakdown`.
    Returns:
        ``error, image_id, category_id, score, bbox`` (xywh) and ``detection`` (index into the
        results; -1 for a missed ground truth), ``gt_id`` (the ground truth a cls / loc error points
        at, or the missed one; -1 otherwise), ``max_iou`` (with any ground truth), ``fixes`` (whether
        this cls / loc detection is the one turned into a true positive).
    """
    coco = as_coco(gt)
    results = as_results(detections, coco)
    found = _classify(coco, results, area, iou, background_iou, image_ids)
    rows = []
    for det_id in sorted(found.error):
        entry = results[det_id - 1]
        gt_id = found.target.get(det_id, -1)
        rows.append(
            {
                "error": found.error[det_id],
                "image_id": entry["image_id"],
                "category_id": entry["category_id"],
                "score": entry["score"],
                "bbox": entry["bbox"],
                "detection": det_id - 1,
                "gt_id": gt_id,
                "max_iou": found.iou[det_id],
                "fixes": gt_id != -1 and found.fixed_by.get(gt_id) == det_id,
            }
        )
    for gt_id in sorted(found.missed):
        truth = coco.anns[gt_id]
        rows.append(
            {
                "error": "missed",
                "image_id": truth["image_id"],
                "category_id": truth["category_id"],
                "score": math.nan,
                "bbox": list(truth["bbox"]),
                "detection": -1,
                "gt_id": gt_id,
                "max_iou": math.nan,
                "fixes": False,
            }
        )
    columns = ["error", "image_id", "category_id", "score", "bbox", "detection", "gt_id", "max_iou", "fixes"]
    return pd.DataFrame(rows, columns=columns)
