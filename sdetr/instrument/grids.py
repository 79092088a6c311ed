"""Recorded Q/K/V/A of one site, laid out on the feature grid, with the geometry to read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sdetr.model.images import valid_extent


def feature_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Grid size of a ResNet level: every stride-2 step maps n -> ceil(n / 2)."""
    for _ in range(stride.bit_length() - 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


@dataclass(frozen=True)
class GridGeometry:
    """How a site's grid sits on the images.

    Attributes:
        stride: pixels per grid cell (16 for C4, 32 for C5), None for decoder self-attention.
        feature_size: ``(H, W)`` of the grid, None for decoder self-attention.
        input_size: ``(height, width)`` of the padded input batch in pixels.
        valid_sizes: per image, ``(height, width)`` of its unpadded region in input pixels.
        valid_cells: per image, ``(rows, cols)`` of grid cells that are not padding.
        image_sizes: per image, the original ``(height, width)`` before resizing (equal to
            ``valid_sizes`` unless given to the recorder).
    """

    stride: int | None
    feature_size: tuple[int, int] | None
    input_size: tuple[int, int]
    valid_sizes: tuple[tuple[int, int], ...]
    valid_cells: tuple[tuple[int, int], ...]
    image_sizes: tuple[tuple[int, int], ...]

    def _require_grid(self) -> int:
        if self.stride is None:
            raise ValueError("decoder self-attention has no image grid: its keys are object queries")
        return self.stride

    def cell_to_pixel(self, row: int, col: int) -> tuple[float, float]:
        """Centre ``(y, x)`` in input pixels of grid cell ``(row, col)``."""
        stride = self._require_grid()
        return ((row + 0.5) * stride, (col + 0.5) * stride)

    def pixel_to_cell(self, y: float, x: float) -> tuple[int, int]:
        """Grid cell ``(row, col)`` containing input pixel ``(y, x)``."""
        stride = self._require_grid()
        assert self.feature_size is not None
        row, col = int(y // stride), int(x // stride)
        if not (0 <= row < self.feature_size[0] and 0 <= col < self.feature_size[1]):
            raise ValueError(f"pixel (y={y}, x={x}) lies outside the {self.input_size} input")
        return row, col

    def cell_to_original(self, image: int, row: int, col: int) -> tuple[float, float]:
        """Centre of a cell in the original (un-resized) image ``image``'s pixels."""
        y, x = self.cell_to_pixel(row, col)
        (vh, vw), (oh, ow) = self.valid_sizes[image], self.image_sizes[image]
        return (y * oh / vh, x * ow / vw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stride": self.stride,
            "feature_size": self.feature_size,
            "input_size": self.input_size,
            "valid_sizes": self.valid_sizes,
            "valid_cells": self.valid_cells,
            "image_sizes": self.image_sizes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridGeometry:
        def pairs(values: list) -> tuple[tuple[int, int], ...]:
            return tuple((int(a), int(b)) for a, b in values)

        size = data["feature_size"]
        return cls(
            stride=data["stride"],
            feature_size=None if size is None else (int(size[0]), int(size[1])),
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            valid_sizes=pairs(data["valid_sizes"]),
            valid_cells=pairs(data["valid_cells"]),
            image_sizes=pairs(data["image_sizes"]),
        )


@dataclass
class SiteGrids:
    """What was recorded at one site; tensors not asked for are None.

    Shapes by kind (``heads`` counts the selected heads, ``P`` the selected queries):
        encoder_self:  q, k, v ``[B, heads, H, W, d]``; a ``[B, heads, H, W, H, W]``, or
            ``[B, heads, P, H, W]`` when query cells were selected.
        decoder_cross: q ``[B, heads, Q|P, d]``; k, v ``[B, heads, H, W, d]``; a ``[B, heads, Q|P, H, W]``.
        decoder_self:  q ``[B, heads, Q|P, d]``; k, v ``[B, heads, Q, d]``; a ``[B, heads, Q|P, Q]``.

    Attributes:
        site, kind: the site's name and kind.
        heads: indices of the recorded heads.
        queries: the selected query cells ``(row, col)`` (encoder) or query indices (decoder),
            None when all are recorded.
        geometry: where the grid lies on the images.
        a_grad_source: with ``keep_graph``, the attention map ``[B, heads, Lq, Lk]`` used in the
            forward (in the autograd graph, with ``retain_grad``); see :meth:`a_grad`.
    """

    site: str
    kind: str
    heads: tuple[int, ...]
    geometry: GridGeometry
    queries: tuple[Any, ...] | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    a: Tensor | None = None
    a_grad_source: Tensor | None = field(default=None, repr=False)

    def tensors(self) -> dict[str, Tensor]:
        return {name: t for name in ("q", "k", "v", "a") if (t := getattr(self, name)) is not None}

    def a_grad(self) -> Tensor:
        """Gradient of the loss w.r.t. the attention map, in the layout of ``a`` (all heads)."""
        if self.a_grad_source is None or self.a_grad_source.grad is None:
            raise RuntimeError(f"{self.site}: no gradient of a; record with keep_graph=True and call backward() first")
        grad = self.a_grad_source.grad
        batch, heads, length, _keys = grad.shape
        size = self.geometry.feature_size
        if self.kind == "encoder_self" and size is not None:
            return grad.view(batch, heads, *size, *size)
        if self.kind == "decoder_cross" and size is not None:
            return grad.view(batch, heads, length, *size)
        return grad

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def grid_cells(mask: Tensor) -> tuple[tuple[int, int], ...]:
    """Per image, ``(rows, cols)`` of not-padded cells of a ``[B, H, W]`` mask."""
    return tuple((int(rows), int(cols)) for rows, cols in valid_extent(mask).tolist())
