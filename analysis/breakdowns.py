"""AP broken down by object size, by class and by decoder output, sliced from COCOeval's arrays.

Every number here is a slice of pycocotools' ``COCOeval.evaluate()`` / ``accumulate()`` output,
read exactly as ``COCOeval.summarize()`` reads it, so nothing about matching is re-implemented:

- ``eval["precision"]`` is ``[T, R, K, A, M]`` (IoU thresholds, 101 recall points, categories,
  area ranges, max detections), ``-1`` where a category has no ground truth;
- ``eval["recall"]`` is ``[T, K, A, M]``;
- AP over a slice = the mean of its entries ``> -1`` (NaN here when there are none, where
  ``summarize`` prints ``-1``); AP50 / AP75 take the IoU index of 0.5 / 0.75; AR100 reads
  ``recall`` at ``maxDets = 100``.

Object size is the side length of a square of the same area: ``side = sqrt(area)`` with
``area`` COCO's ``area`` field of the ground truth (the segment area on COCO, the shape's
visible pixel count on the synthetic set) and ``w * h`` for detections (``COCO.loadRes``). A size bin ``(lo, hi)``
is therefore COCO's area range ``(lo**2, hi**2)``; like COCO's, both ends are inclusive
(an object exactly on an edge belongs to both neighbouring bins). ``inf`` stands for COCO's
upper limit ``1e5**2``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from analysis.evaluation import detect
from sdetr import CocoDetection, Detector, ModelConfig, load_coco

GroundTruth: TypeAlias = "COCO | str | os.PathLike[str]"
DetectionsInput: TypeAlias = Sequence[dict[str, Any]] | str | os.PathLike[str]

#: Default size bins (box side in pixels, ``sqrt(area)``); the last bin is open-ended.
DEFAULT_BINS: tuple[float, ...] = (0, 16, 32, 64, 96, 128, math.inf)
#: COCO's standard area ranges (``COCOeval``'s defaults), in the order ``summarize`` uses.
COCO_AREAS: tuple[str, ...] = ("all", "small", "medium", "large")
#: COCOeval's default ``maxDets``; AP and AR100 read the last.
MAX_DETS: tuple[int, ...] = (1, 10, 100)
#: COCO's "no upper limit" (``1e5`` pixels of side).
COCO_MAX_SIDE = 1e5
NO_GT_NOTE = "no ground truth in this bin"


def as_coco(gt: GroundTruth) -> COCO:
    """A ``COCO`` index from an annotation file path (read quietly) or a ``COCO`` itself.

    Args:
        gt: path of a COCO annotation JSON, or a ``pycocotools.coco.COCO``.
    """
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, str | os.PathLike):
        return load_coco(gt)
    raise TypeError(f"gt must be a COCO annotation file path or a pycocotools COCO, got {type(gt).__name__}")


def as_results(detections: DetectionsInput, coco: COCO) -> list[dict[str, Any]]:
    """COCO results entries as new dicts (``COCO.loadRes`` writes into the dicts it is given).

    Args:
        detections: a COCO results JSON path (e.g. the trainer's ``detections_val.json``) or a
            list of dicts with ``image_id``, ``category_id``, ``bbox`` (xywh pixels), ``score``.
        coco: the ground truth, to check that every ``image_id`` is one of its images.
    """
    if isinstance(detections, str | os.PathLike):
        path = Path(detections)
        if not path.is_file():
            raise FileNotFoundError(f"detections file {path} does not exist (a COCO results JSON)")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"detections file {path} is not valid JSON ({error})") from None
        if not isinstance(loaded, list):
            raise ValueError(f"detections file {path} must hold a JSON list of results, got {type(loaded).__name__}")
        detections = loaded
    results = []
    for index, entry in enumerate(detections):
        missing = {"image_id", "category_id", "bbox", "score"} - set(entry)
        if missing:
            raise ValueError(
                f"detections[{index}] lacks {sorted(missing)}; COCO results need image_id, "
                "category_id, bbox (x, y, w, h in pixels) and score"
            )
        if int(entry["image_id"]) not in coco.imgs:
            raise ValueError(
                f"detections[{index}] has image_id {entry['image_id']}, which is not an image of "
                "the ground truth; pass the annotation file these detections were made on"
            )
        results.append(
            {
                "image_id": int(entry["image_id"]),
                "category_id": int(entry["category_id"]),
                "bbox": [float(v) for v in entry["bbox"]],
                "score": float(entry["score"]),
            }
        )
    return results


def results_coco(coco: COCO, results: list[dict[str, Any]]) -> COCO:
    """``coco.loadRes(results)`` without prints; an empty results index when there are none
    (``loadRes`` fails on an empty list; no detections simply score 0)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return coco.loadRes(copy.deepcopy(results))
        empty = COCO()
        empty.dataset = {
            "images": list(coco.dataset.get("images", [])),
            "annotations": [],
            "categories": copy.deepcopy(coco.dataset.get("categories", [])),
        }
        empty.createIndex()
        return empty


def run_cocoeval(
    coco: COCO,
    results: list[dict[str, Any]],
    areas: Sequence[tuple[str, float, float]],
    image_ids: Sequence[int] | None = None,
    iou_thresholds: Sequence[float] | None = None,
    max_dets: Sequence[int] = MAX_DETS,
) -> COCOeval:
    """A bbox ``COCOeval`` after ``evaluate()`` and ``accumulate()`` (quietly).

    Args:
        areas: ``(label, min area, max area)`` per area range (``params.areaRng`` / ``areaRngLbl``).
        image_ids: images to score (None: every image of ``coco``, COCOeval's default).
        iou_thresholds: ``params.iouThrs`` (None: COCO's 0.50:0.05:0.95).
        max_dets: ``params.maxDets``.
    """
    evaluator = COCOeval(coco, results_coco(coco, results), iouType="bbox")
    params = evaluator.params
    params.areaRng = [[float(lo), float(hi)] for _, lo, hi in areas]
    params.areaRngLbl = [label for label, _, _ in areas]
    params.maxDets = list(max_dets)
    if iou_thresholds is not None:
        params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
    if image_ids is not None:
        params.imgIds = sorted({int(i) for i in image_ids})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def coco_area_ranges() -> list[tuple[str, float, float]]:
    """COCO's four standard ``(label, min area, max area)`` ranges, exactly as ``COCOeval`` sets them."""
    params = Params(iouType="bbox")
    return [(label, float(lo), float(hi)) for label, (lo, hi) in zip(params.areaRngLbl, params.areaRng, strict=True)]


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries ``> -1`` (as ``COCOeval.summarize``), NaN when there are none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else math.nan


def _iou_index(evaluator: COCOeval, threshold: float) -> np.ndarray:
    return np.where(threshold == evaluator.params.iouThrs)[0]  # the exact test summarize() uses


def gt_counts(evaluator: COCOeval) -> np.ndarray:
    """``[K, A]``: non-crowd ground truth inside each area range, per category (from ``evalImgs``)."""
    params = evaluator.params
    n_cats, n_areas, n_images = len(params.catIds), len(params.areaRng), len(params.imgIds)
    counts = np.zeros((n_cats, n_areas), dtype=np.int64)
    for k in range(n_cats):
        for a in range(n_areas):
            for entry in evaluator.evalImgs[(k * n_areas + a) * n_images : (k * n_areas + a + 1) * n_images]:
                if entry is not None:
                    counts[k, a] += int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
    return counts


def area_metrics(evaluator: COCOeval, area: int, category: int | None = None) -> dict[str, float]:
    """AP, AP50, AP75 and AR100 of one area range (index into ``areaRng``), over all categories
    or one (index into ``catIds``), read as ``COCOeval.summarize`` reads them (NaN: no ground truth)."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    recall = evaluator.eval["recall"]  # [T, K, A, M]
    m = evaluator.params.maxDets.index(100)
    ks = slice(None) if category is None else slice(category, category + 1)
    p = precision[:, :, ks, area, m]  # [T, R, K']
    return {
        "AP": _mean_valid(p),
        "AP50": _mean_valid(p[_iou_index(evaluator, 0.5)]),
        "AP75": _mean_valid(p[_iou_index(evaluator, 0.75)]),
        "AR100": _mean_valid(recall[:, ks, area, m]),
    }


def _check_bins(bins: Sequence[float]) -> list[float]:
    edges = [float(b) for b in bins]
    if len(edges) < 2 or edges[0] < 0 or any(b >= c for b, c in itertools.pairwise(edges)):
        raise ValueError(f"bins must be >= 2 increasing side lengths in pixels starting at >= 0, got {tuple(bins)}")
    return edges


def _edge(side: float) -> str:
    return "inf" if math.isinf(side) else f"{side:g}"


def _side_to_area(side: float) -> float:
    return COCO_MAX_SIDE**2 if math.isinf(side) else side**2


def size_breakdown(
    gt: GroundTruth,
    detections: DetectionsInput,
    bins: Sequence[float] = DEFAULT_BINS,
    image_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """AP, AP50, AP75 and AR100 per object-size bin, then COCO's small / medium / large / all.

    Size is ``side = sqrt(area)`` in pixels with ``area`` COCO's ``area`` field (see the module
    docstring), so bin ``(lo, hi)`` is the area range ``(lo**2, hi**2)``, ends inclusive. One
    ``COCOeval`` run scores every bin and the four standard ranges (maxDets 1, 10, 100); the
    standard rows equal ``COCOeval.summarize()``'s ``stats`` (AP, AP50, AP75, APs/m/l, AR100,
    ARs/m/l) exactly.

    Args:
        gt: COCO annotation file path or ``COCO``.
        detections: COCO results file path or list of results dicts.
        bins: increasing side lengths; ``inf`` for an open last bin.
        image_ids: images to score (None: every image of ``gt``).
    Returns:
        one row per bin (``bin`` like ``16-32``), then ``small``, ``medium``, ``large``, ``all``:
        ``bin, kind`` (``bin`` / ``coco``), ``lo, hi`` (sides in pixels), ``n_gt`` (non-crowd ground
        truth in range), ``AP, AP50, AP75, AR100`` (NaN where ``n_gt`` is 0) and ``note``.
    """
    coco = as_coco(gt)
    edges = _check_bins(bins)
    binned = [(f"{_edge(lo)}-{_edge(hi)}", lo, hi) for lo, hi in itertools.pairwise(edges)]
    standard = coco_area_ranges()
    areas = [(label, _side_to_area(lo), _side_to_area(hi)) for label, lo, hi in binned] + standard
    evaluator = run_cocoeval(coco, as_results(detections, coco), areas, image_ids)
    counts = gt_counts(evaluator).sum(axis=0)  # [A]
    sides = {
        label: (math.sqrt(lo), math.inf if hi >= COCO_MAX_SIDE**2 else math.sqrt(hi)) for label, lo, hi in standard
    }
    order = [(label, "bin", lo, hi) for label, lo, hi in binned]
    order += [(label, "coco", *sides[label]) for label in ("small", "medium", "large", "all")]
    labels = [label for label, _, _ in areas]
    rows = []
    for label, kind, lo, hi in order:
        a = len(binned) + labels[len(binned) :].index(label) if kind == "coco" else labels.index(label)
        n_gt = int(counts[a])
        rows.append(
            {
                "bin": label,
                "kind": kind,
                "lo": lo,
                "hi": hi,
                "n_gt": n_gt,
                **area_metrics(evaluator, a),
                "note": NO_GT_NOTE if n_gt == 0 else "",
            }
        )
    return pd.DataFrame(rows)


def class_breakdown(
    gt: GroundTruth,
    detections: DetectionsInput,
    area: str = "all",
    image_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Per-category AP (the K axis of COCOeval's arrays), sorted by category id.

    Args:
        gt: COCO annotation file path or ``COCO``.
        detections: COCO results file path or list of results dicts.
        area: the range of ``n_gt``, ``AP``, ``AP50``, ``AP75``: ``all``, ``small``, ``medium``, ``large``.
        image_ids: images to score (None: every image of ``gt``).
    Returns:
        ``category_id, category, area, n_gt, AP, AP50, AP75, APs, APm, APl`` (AP at IoU 0.5:0.95,
        maxDets 100; NaN where the category has no ground truth in that range).
    """
    if area not in COCO_AREAS:
        raise ValueError(f"area must be one of {COCO_AREAS}, got {area!r}")
    coco = as_coco(gt)
    evaluator = run_cocoeval(coco, as_results(detections, coco), coco_area_ranges(), image_ids)
    counts = gt_counts(evaluator)  # [K, A]
    a = list(COCO_AREAS).index(area)
    rows = []
    for k, category_id in enumerate(evaluator.params.catIds):
        chosen = area_metrics(evaluator, a, k)
        rows.append(
            {
                "category_id": int(category_id),
                "category": str(coco.cats[category_id].get("name", category_id)),
                "area": area,
                "n_gt": int(counts[k, a]),
                "AP": chosen["AP"],
                "AP50": chosen["AP50"],
                "AP75": chosen["AP75"],
                **{
                    f"AP{name[0]}": area_metrics(evaluator, COCO_AREAS.index(name), k)["AP"]
                    for name in ("small", "medium", "large")
                },
            }
        )
    return pd.DataFrame(rows).sort_values("category_id", ignore_index=True)


def decoder_layout(model: Detector | ModelConfig) -> list[tuple[int, int]]:
    """``(stage, layer)`` of each decoder output in order (stages from 1, layers from 0 within
    their stage, as in ``sdetr.sites``: ``stage1.decoder.0``).

    Args:
        model: a detector or its ``ModelConfig``.
    """
    config = model if isinstance(model, ModelConfig) else model.config
    return [
        (stage, layer)
        for stage, stage_config in enumerate(config.stages, start=1)
        for layer in range(stage_config.decoder_layers)
    ]


def stage_breakdown(
    model: Detector,
    dataset: CocoDetection,
    batch_size: int = 2,
    limit: int | None = None,
    bins: Sequence[float] = DEFAULT_BINS,
    progress: bool = True,
) -> pd.DataFrame:
    """:func:`size_breakdown` of every decoder output, each scored as if it were the prediction.

    One pass over ``dataset`` (``analysis.evaluation.detect`` converts all outputs with the
    trainer's post-processing); SDETR's outputs are stage 1's layers, then stage 2's. With the
    trainer's ``batch_size`` (padding depends on the batch), the final output's ``all`` row is
    ``Trainer.evaluate()``'s AP.

    Args:
        model: the detector, in eval mode (gates and patches attached by the caller stay on).
        dataset: a ``CocoDetection``; its ``coco`` is the ground truth.
        batch_size: images per forward pass.
        limit: at most this many images (scored on those images only).
        bins: size bins, as for :func:`size_breakdown`.
        progress: show a progress bar.
    Returns:
        long form: ``output`` (0 .. L-1), ``stage``, ``layer``, ``site`` (``stage1.decoder.0``),
        ``is_final``, then :func:`size_breakdown`'s ``bin, kind, lo, hi, n_gt, AP, AP50, AP75, AR100, note``.
    """
    if not isinstance(dataset, CocoDetection):
        raise TypeError(
            f"dataset must be an sdetr.CocoDetection (its .coco is the ground truth), got {type(dataset).__name__}"
        )
    layout = decoder_layout(model)
    found = detect(model, dataset, batch_size, range(len(layout)), limit, progress, desc="stage breakdown")
    if sorted(found.results) != list(range(len(layout))) and found.image_ids:
        raise ValueError(
            f"the model gave {len(found.results)} decoder outputs but its config has {len(layout)} decoder layers; "
            "stage_breakdown needs every layer's output (aux_outputs)"
        )
    frames = []
    for output, (stage, layer) in enumerate(layout):
        frame = size_breakdown(dataset.coco, found.results.get(output, []), bins, found.image_ids)
        frame.insert(0, "is_final", output == len(layout) - 1)
        frame.insert(0, "site", f"stage{stage}.decoder.{layer}")
        frame.insert(0, "layer", layer)
        frame.insert(0, "stage", stage)
        frame.insert(0, "output", output)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
