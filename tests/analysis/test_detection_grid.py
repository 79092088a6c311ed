from __future__ import annotations

import pytest
import torch
from matplotlib.patches import Rectangle

from analysis.detection_grid import plot_detection_grid, top_detections


def found(scores: list[float], labels: list[int], boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    return {"scores": torch.tensor(scores), "labels": torch.tensor(labels), "boxes": torch.tensor(boxes)}


FIRST = found(
    [0.2, 0.9, 0.5, 0.9],
    [1, 2, 3, 4],
    [[0, 0, 10, 10], [5, 6, 25, 30], [1, 2, 3, 4], [40, 10, 60, 20]],
)


def test_top_detections_orders_by_score_and_applies_the_threshold() -> None:
    assert top_detections(FIRST, top=3) == [1, 3, 2]  # ties keep query order
    assert top_detections(FIRST, top=10, score_threshold=0.5) == [1, 3, 2]
    assert top_detections(FIRST, top=2, score_threshold=0.95) == []
    assert top_detections(FIRST, top=0) == []
    with pytest.raises(ValueError, match="top must be >= 0"):
        top_detections(FIRST, top=-1)


def test_plot_detection_grid_draws_the_best_boxes_with_captions() -> None:
    images = [torch.rand(3, 32, 64), torch.rand(3, 40, 40), torch.rand(3, 16, 16)]
    second = found([0.1, 0.7], [2, 1], [[2, 2, 8, 8], [10, 12, 30, 38]])
    third = found([0.05], [3], [[0, 0, 4, 4]])
    figure = plot_detection_grid(
        images, [FIRST, second, third], top=2, score_threshold=0.1, category_names={2: "ellipse"}, columns=2
    )
    panels = [ax for ax in figure.axes if ax.get_title().startswith("image")]
    assert [ax.get_title() for ax in panels] == ["image 0", "image 1", "image 2"]
    rectangles = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in panels]
    assert [len(r) for r in rectangles] == [2, 2, 0]  # top 2; image 2's only box is below 0.1
    first = rectangles[0][0]
    assert (first.get_x(), first.get_y(), first.get_width(), first.get_height()) == (5, 6, 20, 24)
    assert [t.get_text() for t in panels[0].texts] == ["ellipse 0.90", "4 0.90"]
    assert [t.get_text() for t in panels[1].texts] == ["1 0.70", "ellipse 0.10"]
    assert sum(1 for ax in figure.axes if not ax.axison) == 1  # 2x2 grid, 3 images


def test_plot_detection_grid_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="2 images but 1 detection sets"):
        plot_detection_grid([torch.rand(3, 8, 8)] * 2, [FIRST])
    with pytest.raises(ValueError, match=r"images\[0\] must be \[3, H, W\]"):
        plot_detection_grid([torch.rand(8, 8)], [FIRST])
