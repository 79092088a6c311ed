"""A quick look at detections: images side by side, each with its best boxes and their scores.

For images without ground truth (a first look at a checkpoint, ``notebooks/01_quickstart``). With
ground truth, ``analysis.detection_plots.plot_detections`` colours each box by its match status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

COLOURS = ("tab:cyan", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:pink", "tab:olive", "tab:blue")


def top_detections(detections: Mapping[str, Tensor], top: int = 3, score_threshold: float = 0.0) -> list[int]:
    """Indices of the ``top`` highest-scoring detections with ``score >= score_threshold``, best first.

    Args:
        detections: one image of ``sdetr.postprocess``'s output (``scores [Q]``, ...).
    """
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    scores = detections["scores"].detach().float().cpu()  # [Q]
    order = scores.argsort(descending=True, stable=True).tolist()
    return [int(i) for i in order if scores[i] >= score_threshold][:top]


def plot_detection_grid(
    images: Sequence[Tensor],
    detections: Sequence[Mapping[str, Tensor]],
    top: int = 3,
    score_threshold: float = 0.0,
    category_names: Mapping[int, str] | None = None,
    columns: int = 4,
) -> Figure:
    """Each image with its ``top`` best detections (box, class name and score), in a grid.

    Args:
        images: ``[3, H, W]`` RGB in [0, 1] (``analysis.explorer.unnormalize_image`` of a model input).
        detections: per image, ``sdetr.postprocess``'s ``scores [Q]``, ``labels [Q]`` and
            ``boxes [Q, 4]`` xyxy in the pixels of that image (give ``postprocess`` the image sizes).
        top / score_threshold: which detections to draw (see :func:`top_detections`).
        category_names: class id -> name for the captions (default: the id).
        columns: panels per row.
    """
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images but {len(detections)} detection sets; give one per image")
    if not images:
        raise ValueError("images is empty")
    ncols = min(columns, len(images))
    nrows = math.ceil(len(images) / ncols)
    figure = Figure(figsize=(3.4 * ncols, 2.9 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False)
    names = category_names or {}
    for position, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if position >= len(images):
            ax.set_axis_off()
            continue
        image, found = images[position], detections[position]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{position}] must be [3, H, W] RGB in [0, 1], got {tuple(image.shape)}")
        ax.imshow(image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
        for rank, index in enumerate(top_detections(found, top, score_threshold)):
            x0, y0, x1, y1 = (float(v) for v in found["boxes"][index])
            colour = COLOURS[rank % len(COLOURS)]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.8))
            label = int(found["labels"][index])
            caption = f"{names.get(label, label)} {float(found['scores'][index]):.2f}"
            ax.text(x0, y0, caption, color="black", fontsize=7, va="bottom", backgroundcolor=colour)
        ax.set_title(f"image {position}", fontsize=9)
    return figure
