"""Figures for the detection breakdowns: AP per size bin, per class, per error type, and a viewer.

Each ``plot_*`` takes what :mod:`analysis.breakdowns` / :mod:`analysis.error_breakdown` return
and gives back a ``matplotlib.figure.Figure`` (no backend is chosen and no pyplot state is kept;
in a notebook the returned figure shows itself). Bars are drawn one ``Rectangle`` per value, so
a figure's ``axes[i].patches`` are its bars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from pycocotools import mask as mask_utils
from torch import Tensor

from analysis.error_breakdown import ERROR_TYPES, SPECIAL_TYPES

#: COCO's "small": area below 32^2 pixels.
SMALL_AREA = 32.0**2
MATCH_COLOURS = {"tp": "#2ca02c", "fp": "#d62728", "missed": "#ff7f0e", "matched_gt": "white"}


def _grouped_bars(ax: Axes, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str) -> None:
    """One bar per (group, series); NaN bars are drawn at height 0 and marked ``n/a``."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for j, (name, values) in enumerate(series.items()):
        heights = np.array([0.0 if math.isnan(v) else v for v in values], dtype=float)
        positions = x - 0.4 + width * (j + 0.5)
        ax.bar(positions, heights, width, label=name)
        for position, value in zip(positions, values, strict=True):
            if math.isnan(value):
                ax.text(position, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="grey")
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _size_series(frames: Mapping[str, pd.DataFrame] | pd.DataFrame) -> dict[str, pd.DataFrame]:
    if isinstance(frames, pd.DataFrame):
        if "output" not in frames.columns:
            return {"model": frames}
        series = {}
        for output, frame in frames.groupby("output", sort=True):
            first = frame.iloc[0]
            name = str(first["site"]) if "site" in frame.columns else f"output {output}"
            series[name + (" (final)" if bool(first.get("is_final", False)) else "")] = frame
        return series
    if not frames:
        raise ValueError("frames is empty: pass {name: size_breakdown(...)} or a stage_breakdown frame")
    return dict(frames)


def plot_size_breakdown(
    frames: Mapping[str, pd.DataFrame] | pd.DataFrame,
    metric: str = "AP",
    include_coco: bool = False,
) -> Figure:
    """Grouped bars of ``metric`` per size bin: one bar per model (or decoder output) in each bin.

    Args:
        frames: ``{name: size_breakdown(...)}`` for several models, one ``size_breakdown`` frame,
            or a ``stage_breakdown`` frame (one series per decoder output, named by its site).
        metric: ``AP``, ``AP50``, ``AP75`` or ``AR100``.
        include_coco: also draw COCO's small / medium / large / all after the bins.
    """
    series = _size_series(frames)
    first = next(iter(series.values()))
    if metric not in first.columns:
        raise ValueError(f"metric {metric!r} is not a column of the breakdown; use AP, AP50, AP75 or AR100")
    keep = first if include_coco else first[first["kind"] == "bin"]
    bins = [str(b) for b in keep["bin"]]
    values = {}
    for name, frame in series.items():
        indexed = frame.set_index("bin")
        values[name] = [float(indexed.loc[b, metric]) if b in indexed.index else math.nan for b in bins]
    counts = [int(n) for n in keep["n_gt"]]
    same_gt = all(list(frame.set_index("bin").reindex(bins)["n_gt"]) == counts for frame in series.values())
    figure = Figure(figsize=(max(6.0, 0.9 * len(bins) * max(1, len(series)) ** 0.5 + 2), 4), layout="constrained")
    ax = figure.subplots()
    labels = [f"{b}\nn={n}" for b, n in zip(bins, counts, strict=True)] if same_gt else bins
    _grouped_bars(ax, labels, values, metric)
    ax.set_xlabel("object size: side = sqrt(area) in pixels (ground-truth count below)")
    ax.set_title(f"{metric} by object size")
    if len(series) > 1:
        ax.legend(fontsize=8, ncols=2 if len(series) > 4 else 1)
    return figure


def plot_class_breakdown(df: pd.DataFrame, metrics: Sequence[str] = ("AP", "APs", "APm", "APl")) -> Figure:
    """Grouped bars per category: one bar per metric (``class_breakdown``'s columns).

    Args:
        df: a ``class_breakdown`` frame.
        metrics: which AP columns to draw side by side.
    """
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"metrics {missing} are not columns of the class breakdown ({list(df.columns)})")
    names = [f"{c}\nn={n}" for c, n in zip(df["category"], df["n_gt"], strict=True)]
    figure = Figure(figsize=(max(6.0, 1.2 * len(names) + 2), 4), layout="constrained")
    ax = figure.subplots()
    _grouped_bars(ax, names, {m: [float(v) for v in df[m]] for m in metrics}, "AP")
    ax.set_title("AP per class" + (f" (n = ground truth, area {df['area'].iloc[0]})" if "area" in df.columns else ""))
    ax.legend(fontsize=8)
    return figure


def plot_error_breakdown(df: pd.DataFrame) -> Figure:
    """TIDE-style bars: dAP per error type, one bar per area (overall vs small), counts on top.

    Args:
        df: an ``error_breakdown`` frame (several areas: ``error_breakdown(..., area=("all", "small"))``).
    Returns:
        a figure with the six main errors on the left and the two special errors on the right.
    """
    areas = list(dict.fromkeys(df["area"]))
    base = df[df["error"] == "base"].set_index("area")["AP"]
    figure = Figure(figsize=(10, 4), layout="constrained")
    main_ax, special_ax = figure.subplots(1, 2, width_ratios=(3, 1), sharey=True)
    for ax, types in ((main_ax, ERROR_TYPES), (special_ax, SPECIAL_TYPES)):
        values, counts = {}, {}
        for area in areas:
            rows = df[df["area"] == area].set_index("error")
            values[f"{area} (AP {base.get(area, math.nan):.3f})"] = [float(rows.loc[t, "dAP"]) for t in types]
            counts[area] = [int(rows.loc[t, "count"]) for t in types]
        _grouped_bars(ax, list(types), values, "dAP (AP after the fix - AP)")
        width = 0.8 / len(areas)
        for j, area in enumerate(areas):
            for i, count in enumerate(counts[area]):
                height = list(values.values())[j][i]
                ax.text(
                    i - 0.4 + width * (j + 0.5),
                    0 if math.isnan(height) else height,
                    str(count),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    main_ax.set_title("main errors (number of errors on top)")
    special_ax.set_title("special errors")
    main_ax.legend(fontsize=8)
    return figure


def _as_array(values: Any, columns: int | None = None) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    return array.reshape(-1, columns) if columns else array.reshape(-1)


def _xyxy_to_xywh(boxes: np.ndarray) -> list[list[float]]:
    return [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in boxes]


def match_for_drawing(
    gt_boxes: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    gt_labels: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching by score, for colouring boxes only (AP always comes from COCOeval).

    Each detection, highest score first, takes the unmatched ground truth (of its class, when
    both have labels) with the highest IoU >= ``iou``.

    Args:
        gt_boxes: ``[N, 4]`` xyxy; boxes: ``[M, 4]`` xyxy; scores: ``[M]``; labels optional ``[N]`` / ``[M]``.
    Returns:
        ``[M]`` index of the matched ground truth or -1, and ``[N]`` matched flags.
    """
    ious = np.zeros((len(boxes), len(gt_boxes)))
    if len(boxes) and len(gt_boxes):
        ious = np.asarray(mask_utils.iou(_xyxy_to_xywh(boxes), _xyxy_to_xywh(gt_boxes), [0] * len(gt_boxes)))
        ious = ious.reshape(len(boxes), len(gt_boxes))  # [M, N]
    if gt_labels is not None and labels is not None:
        ious = ious * (labels[:, None] == gt_labels[None, :])
    matched = np.zeros(len(gt_boxes), dtype=bool)
    assignment = np.full(len(boxes), -1)
    for d in np.argsort(-scores, kind="stable"):
        candidates = np.where(~matched, ious[d], -1.0)
        if len(gt_boxes) and candidates.max() >= iou:
            g = int(candidates.argmax())
            assignment[d], matched[g] = g, True
    return assignment, matched


def plot_detections(
    image: Tensor | np.ndarray,
    gt_boxes: Tensor | np.ndarray | Sequence[Sequence[float]],
    detections: Mapping[str, Any],
    gt_labels: Tensor | np.ndarray | Sequence[int] | None = None,
    score_threshold: float = 0.5,
    iou: float = 0.5,
    category_names: Mapping[int, str] | None = None,
    title: str | None = None,
) -> Figure:
    """An image with its boxes coloured by match status; small objects (area < 32^2) dashed and thicker.

    Detections with ``score >= score_threshold`` are matched to the ground truth greedily by score
    at IoU ``iou`` (:func:`match_for_drawing`; for drawing only, not an evaluation). Green: true
    positive (its ground truth in thin white); red: false positive; orange: missed ground truth.

    Args:
        image: ``[3, H, W]`` RGB in [0, 1] (a tensor) or ``[H, W, 3]`` (an array, 0-1 or 0-255).
        gt_boxes: ``[N, 4]`` ground-truth boxes, xyxy in the image's pixels.
        detections: ``boxes [M, 4]`` xyxy pixels and ``scores [M]``, optionally ``labels [M]``
            (one image of ``sdetr.postprocess``'s output).
        gt_labels: ``[N]`` classes; with detection labels, matching is class-aware.
        score_threshold: detections below this score are not drawn.
        iou: IoU for a match.
        category_names: class id -> name for the box captions.
        title: figure title (default: the counts).
    """
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W] RGB in [0, 1], got {tuple(image.shape)}")
        pixels = image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()  # [H, W, 3]
    else:
        pixels = np.asarray(image)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"image must be an [H, W, 3] array, got shape {pixels.shape}")
        if pixels.dtype != np.uint8 and pixels.max() > 1:
            pixels = pixels.astype(np.uint8)
    if "boxes" not in detections or "scores" not in detections:
        raise ValueError("detections must have 'boxes' [M, 4] xyxy and 'scores' [M] (sdetr.postprocess's output)")
    gts = _as_array(gt_boxes, 4)  # [N, 4]
    scores_all = _as_array(detections["scores"])  # [M]
    keep = scores_all >= score_threshold
    boxes, scores = _as_array(detections["boxes"], 4)[keep], scores_all[keep]  # [M', 4], [M']
    labels = _as_array(detections["labels"]).astype(int)[keep] if "labels" in detections else None
    truth_labels = _as_array(gt_labels).astype(int) if gt_labels is not None else None
    if truth_labels is not None and len(truth_labels) != len(gts):
        raise ValueError(f"gt_labels has {len(truth_labels)} entries for {len(gts)} gt_boxes")
    assignment, matched = match_for_drawing(gts, boxes, scores, truth_labels, labels, iou)

    figure = Figure(figsize=(7, 7 * pixels.shape[0] / max(pixels.shape[1], 1) + 0.6), layout="constrained")
    ax = figure.subplots()
    ax.imshow(pixels)

    def draw(box: np.ndarray, status: str, caption: str | None = None) -> None:
        x0, y0, x1, y1 = (float(v) for v in box)
        small = (x1 - x0) * (y1 - y0) < SMALL_AREA
        thin = status == "matched_gt"
        rect = Rectangle(
            (x0, y0),
            x1 - x0,
            y1 - y0,
            fill=False,
            edgecolor=MATCH_COLOURS[status],
            linewidth=(1.0 if thin else 3.0 if small else 1.8),
            linestyle="--" if small else "-",
        )
        rect.set_gid(status)
        ax.add_patch(rect)
        if caption:
            ax.text(
                x0,
                y0 - 1,
                caption,
                color="white",
                fontsize=7,
                va="bottom",
                bbox={"facecolor": MATCH_COLOURS[status], "alpha": 0.7, "pad": 1, "linewidth": 0},
            )

    def name(label: int) -> str:
        return category_names.get(label, str(label)) if category_names else str(label)

    for g, box in enumerate(gts):
        if matched[g]:
            draw(box, "matched_gt")
        else:
            draw(box, "missed", f"missed {name(truth_labels[g])}" if truth_labels is not None else "missed")
    for d, box in enumerate(boxes):
        status = "tp" if assignment[d] >= 0 else "fp"
        caption = (f"{name(labels[d])} " if labels is not None else "") + f"{scores[d]:.2f}"
        draw(box, status, caption)
    ax.set_xlim(0, pixels.shape[1])
    ax.set_ylim(pixels.shape[0], 0)
    ax.set_xticks([])
    ax.set_yticks([])
    n_tp = int((assignment >= 0).sum())
    ax.set_title(
        title
        or f"TP {n_tp}, FP {len(boxes) - n_tp}, missed {int((~matched).sum())} "
        f"(score >= {score_threshold:g}, IoU {iou:g}; greedy, for drawing only)",
        fontsize=9,
    )
    handles = [Line2D([], [], color=MATCH_COLOURS[s], label=s.replace("_", " ")) for s in ("tp", "fp", "missed")]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=3.0, label="small (< 32^2 px)"))
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.7)
    return figure
