"""Figures of the detection breakdowns: one bar per value, boxes coloured by match status."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.breakdowns import class_breakdown, size_breakdown
from analysis.detection_plots import (
    MATCH_COLOURS,
    match_for_drawing,
    plot_class_breakdown,
    plot_detections,
    plot_error_breakdown,
    plot_size_breakdown,
)
from analysis.error_breakdown import ERROR_TYPES, SPECIAL_TYPES, error_breakdown
from tests.analysis.coco_cases import mixed_scene


def bars(figure: Figure, axis: int = 0) -> list[Rectangle]:
    return [p for p in figure.axes[axis].patches if isinstance(p, Rectangle)]


def legend(figure: Figure) -> list[str]:
    drawn = figure.axes[0].get_legend()
    assert drawn is not None
    return [t.get_text() for t in drawn.get_texts()]


def test_size_breakdown_bars_per_model_and_bin() -> None:
    coco, detections = mixed_scene()
    good = size_breakdown(coco, detections)
    worse = size_breakdown(coco, detections[::2])
    figure = plot_size_breakdown({"good": good, "worse": worse})
    assert isinstance(figure, Figure)
    assert len(bars(figure)) == 2 * 6  # two models x six size bins
    heights = [b.get_height() for b in bars(figure)]
    expected = [0.0 if math.isnan(v) else v for v in good[good["kind"] == "bin"]["AP"]]
    assert heights[:6] == pytest.approx(expected)  # the first model's bars are its AP per bin
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels[0] == "0-16\nn=2" and len(labels) == 6  # the 8x8 and the 14x14 objects
    assert legend(figure) == ["good", "worse"]

    single = plot_size_breakdown(good, metric="AR100", include_coco=True)
    assert len(bars(single)) == 10  # six bins + small, medium, large, all
    assert bars(single)[-1].get_height() == pytest.approx(good.set_index("bin").loc["all", "AR100"])
    with pytest.raises(ValueError, match="metric"):
        plot_size_breakdown(good, metric="F1")


def test_size_breakdown_of_a_stage_frame_has_one_series_per_output() -> None:
    coco, detections = mixed_scene()
    frames = []
    for output, (stage, layer) in enumerate([(1, 0), (1, 1), (2, 0)]):
        frame = size_breakdown(coco, detections[: 5 + 4 * output])
        frame.insert(0, "is_final", output == 2)
        frame.insert(0, "site", f"stage{stage}.decoder.{layer}")
        frame.insert(0, "output", output)
        frames.append(frame)
    figure = plot_size_breakdown(pd.concat(frames, ignore_index=True))
    assert len(bars(figure)) == 3 * 6
    assert legend(figure) == ["stage1.decoder.0", "stage1.decoder.1", "stage2.decoder.0 (final)"]


def test_class_breakdown_bars() -> None:
    coco, detections = mixed_scene()
    frame = class_breakdown(coco, detections)
    figure = plot_class_breakdown(frame)
    assert len(bars(figure)) == 3 * 4  # three classes x AP, APs, APm, APl
    # class 3 has no ground truth: its four bars are drawn at 0 and marked n/a
    missing = int(frame[["AP", "APs", "APm", "APl"]].isna().sum().sum())
    assert missing >= 4 and sum(t.get_text() == "n/a" for t in figure.axes[0].texts) == missing
    assert len(bars(plot_class_breakdown(frame, metrics=("AP50",)))) == 3


def test_error_breakdown_bars_overall_and_small() -> None:
    coco, detections = mixed_scene()
    frame = error_breakdown(coco, detections, area=("all", "small"))
    figure = plot_error_breakdown(frame)
    assert len(figure.axes) == 2
    assert len(bars(figure, 0)) == 2 * len(ERROR_TYPES) and len(bars(figure, 1)) == 2 * len(SPECIAL_TYPES)
    overall = frame[frame["area"] == "all"].set_index("error")
    assert [b.get_height() for b in bars(figure, 0)[: len(ERROR_TYPES)]] == pytest.approx(
        [overall.loc[e, "dAP"] for e in ERROR_TYPES]
    )
    counts = [t.get_text() for t in figure.axes[0].texts][: len(ERROR_TYPES)]
    assert counts == [str(int(overall.loc[e, "count"])) for e in ERROR_TYPES]


def test_detections_viewer_colours_by_match() -> None:
    """gt: a 50x50 (found), a 10x10 (missed, small); detections: a hit on the 50x50 (0.9), a small
    box on nothing (0.8, false positive), a duplicate of the hit (0.7, false positive) and a
    hit below the score threshold (not drawn)."""
    image = torch.rand(3, 120, 160)
    gt_boxes = torch.tensor([[20.0, 20.0, 70.0, 70.0], [100.0, 10.0, 110.0, 20.0]])
    detections = {
        "boxes": torch.tensor(
            [
                [21.0, 20.0, 71.0, 70.0],
                [130.0, 90.0, 150.0, 110.0],
                [22.0, 22.0, 70.0, 70.0],
                [100.0, 10.0, 110.0, 20.0],
            ]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.3]),
        "labels": torch.tensor([1, 1, 1, 1]),
    }
    figure = plot_detections(image, gt_boxes, detections, gt_labels=[1, 1], category_names={1: "box"})
    patches = [p for p in figure.axes[0].patches if isinstance(p, Rectangle)]
    by_status: dict[str, list[Rectangle]] = {}
    for patch in patches:
        by_status.setdefault(str(patch.get_gid()), []).append(patch)
    assert {k: len(v) for k, v in by_status.items()} == {"matched_gt": 1, "missed": 1, "tp": 1, "fp": 2}
    assert by_status["tp"][0].get_edgecolor()[:3] == pytest.approx((0.173, 0.627, 0.173), abs=0.01)  # green
    missed = by_status["missed"][0]
    assert missed.get_linestyle() == "--" and missed.get_linewidth() == 3.0  # small: dashed and thick
    small_fp, big_fp = sorted(by_status["fp"], key=lambda p: p.get_width())
    assert small_fp.get_linestyle() == "--" and big_fp.get_linestyle() == "-"  # 20x20 is small, 48x48 is not
    assert figure.axes[0].get_title().startswith("TP 1, FP 2, missed 1")
    assert any(t.get_text() == "box 0.90" for t in figure.axes[0].texts)
    assert set(MATCH_COLOURS) == {"tp", "fp", "missed", "matched_gt"}


def test_detections_viewer_takes_arrays_and_checks_input() -> None:
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    figure = plot_detections(pixels, [[5, 5, 20, 20]], {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)})
    assert [p.get_gid() for p in figure.axes[0].patches] == ["missed"]
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        plot_detections(torch.rand(1, 40, 60), [], {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)})
    with pytest.raises(ValueError, match="'boxes'"):
        plot_detections(pixels, [], {"scores": np.zeros(0)})


def test_matching_for_drawing_is_greedy_by_score_and_class_aware() -> None:
    gt = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    assignment, matched = match_for_drawing(gt, boxes, np.array([0.5, 0.9, 0.8]))
    assert assignment.tolist() == [-1, 0, 1] and matched.tolist() == [True, True]  # 0.9 takes the first gt
    assignment, matched = match_for_drawing(
        gt, boxes, np.array([0.5, 0.9, 0.8]), gt_labels=np.array([1, 2]), labels=np.array([1, 1, 1])
    )
    assert assignment.tolist() == [-1, 0, -1] and matched.tolist() == [True, False]
