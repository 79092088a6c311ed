"""QKVA grid figures: Q, K, V and one query cell's attention map A, laid out on the image."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from torch import Tensor

from sdetr import SiteGrids


def principal_component(grid: Tensor) -> Tensor:
    """``[H, W, d]`` -> ``[H, W]``: each cell's projection on the first principal direction."""
    height, width, dim = grid.shape
    flat = grid.reshape(-1, dim).float()
    centred = flat - flat.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[0]).reshape(height, width)


def plot_qkva(
    grids: SiteGrids,
    image: Tensor | None = None,
    index: int = 0,
    head: int = 0,
    query_cell: tuple[int, int] | None = None,
) -> Figure:
    """Figure of an encoder site: image, Q, K, V (first principal component per cell) and A.

    Args:
        grids: an ``encoder_self`` site recorded with q, k, v and a (all query cells).
        image: ``[3, H, W]`` RGB in [0, 1] for the first panel and the A overlay, or None.
        index / head: batch element and head (position among ``grids.heads``).
        query_cell: ``(row, col)`` whose attention map is drawn; default the grid centre.
    """
    if grids.kind != "encoder_self" or any(t is None for t in (grids.q, grids.k, grids.v, grids.a)):
        raise ValueError(f"{grids.site}: plot_qkva needs an encoder site recorded with q, k, v and a")
    assert grids.q is not None and grids.k is not None and grids.v is not None and grids.a is not None
    if grids.queries is not None:
        raise ValueError(f"{grids.site}: record all query cells (no query_pixels/query_cells) to plot A")
    geometry = grids.geometry
    assert geometry.feature_size is not None and geometry.stride is not None
    rows, cols = geometry.valid_cells[index]
    row, col = query_cell if query_cell is not None else (rows // 2, cols // 2)
    a = grids.a[index, head, row, col, :rows, :cols].float()  # [H, W] over key cells
    panels: list[tuple[str, Tensor]] = [
        (name.upper(), principal_component(getattr(grids, name)[index, head, :rows, :cols])) for name in ("q", "k", "v")
    ]
    figure = Figure(figsize=(17, 3.6), layout="constrained")
    axes = figure.subplots(1, 5)
    height, width = geometry.valid_sizes[index]
    stride = geometry.stride
    extent = (0, cols * stride, rows * stride, 0)
    if image is not None:
        axes[0].imshow(image[:, :height, :width].permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title("image")
    cy, cx = geometry.cell_to_pixel(row, col)
    for title, values in panels:
        ax = axes[["Q", "K", "V"].index(title) + 1]
        shown = ax.imshow(values.numpy(), cmap="coolwarm", extent=extent)
        ax.set_title(f"{title}: 1st principal comp.\n{rows}x{cols} cells, head {grids.heads[head]}")
        figure.colorbar(shown, ax=ax, shrink=0.8)
    if image is not None:
        axes[4].imshow(image[:, :height, :width].permute(1, 2, 0).clamp(0, 1).numpy())
    shown = axes[4].imshow(a.numpy(), cmap="magma", alpha=0.65 if image is not None else 1.0, extent=extent)
    figure.colorbar(shown, ax=axes[4], shrink=0.8)
    axes[4].set_title(f"A of query cell ({row}, {col})\nover {rows}x{cols} key cells")
    for ax in axes:
        ax.plot([cx], [cy], marker="+", color="lime", markersize=14, mew=2)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle(f"{grids.site} (stride {stride})")
    return figure
