"""Data for the analyses: plain image sequences, a ``CocoDetection``, or a DataLoader, as batches.

Every dataset-level analysis takes ``data`` in any of these forms and walks it with
:func:`iter_batches`, one batch at a time, so memory stays bounded by one batch:

- a sequence of ``[3, H, W]`` normalised images (or one ``[B, 3, H, W]`` tensor): grouped into
  lists of ``batch_size`` images (the model pads each list and builds its mask); no targets;
- a ``CocoDetection`` (or any dataset of ``(image, target)`` pairs): batched with
  ``batch_size`` in order, with its targets;
- a ``DataLoader`` (or any iterable) whose batches are ``(images, targets)`` pairs as
  ``sdetr.collate`` makes them, or plain lists / tensors of images: used as it comes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sdetr import CocoDetection, collate

Target = dict[str, Any]
DataSource = Sequence[Tensor] | Tensor | Dataset[Any] | DataLoader[Any] | Iterable[Any]


@dataclass
class Batch:
    """One batch: ``images`` a list of ``[3, H_i, W_i]`` normalised images; ``targets`` their
    targets (``boxes [N, 4]`` cxcywh in [0, 1] of the image, ``labels [N]``, ``image_id``,
    ``orig_size``, ``size``) when the data has them, else None."""

    images: list[Tensor]
    targets: list[Target] | None


def _check_image(image: Any, where: str) -> Tensor:
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{where}: expected a [3, H, W] normalised image tensor, got {shape}")
    return image


def _is_pair_dataset(data: Any) -> bool:
    if isinstance(data, CocoDetection):
        return True
    if isinstance(data, Dataset) and not isinstance(data, Sequence) and len(data) > 0:  # type: ignore[arg-type]
        first = data[0]
        return isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], dict)
    return False


def _from_loader_item(item: Any, index: int) -> Batch:
    if isinstance(item, Tensor):
        images = list(item) if item.dim() == 4 else [item]
        return Batch([_check_image(x, f"batch {index}") for x in images], None)
    if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], list | tuple):
        raw_images, targets = item
        if targets and isinstance(targets[0], dict):
            images = list(raw_images) if not isinstance(raw_images, Tensor) or raw_images.dim() == 4 else [raw_images]
            return Batch([_check_image(x, f"batch {index}") for x in images], list(targets))
    if isinstance(item, list | tuple):
        return Batch([_check_image(x, f"batch {index}, image {i}") for i, x in enumerate(item)], None)
    raise ValueError(
        f"batch {index}: expected (images, targets) as sdetr.collate makes them, a list of [3, H, W] images, "
        f"or a [B, 3, H, W] tensor; got {type(item).__name__}"
    )


def iter_batches(data: DataSource, batch_size: int = 1, limit: int | None = None) -> Iterator[Batch]:
    """Batches of ``data`` (see the module docstring), at most ``limit`` images in all.

    Args:
        data: images, a dataset of ``(image, target)`` pairs, or a DataLoader.
        batch_size: images per batch for a sequence or a dataset (a DataLoader keeps its own).
        limit: stop after this many images (None: all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seen = 0
    if isinstance(data, Tensor):
        if data.dim() != 4 or data.shape[1] != 3:
            raise ValueError(f"an image tensor must be [B, 3, H, W], got {tuple(data.shape)}")
        data = list(data)
    if _is_pair_dataset(data):
        dataset: Any = data
        count = len(dataset) if limit is None else min(len(dataset), limit)
        for start in range(0, count, batch_size):
            images, targets = collate([dataset[i] for i in range(start, min(start + batch_size, count))])
            yield Batch(images, targets)
        return
    if isinstance(data, Sequence) and (len(data) == 0 or isinstance(data[0], Tensor)):
        count = len(data) if limit is None else min(len(data), limit)
        for start in range(0, count, batch_size):
            chunk = [_check_image(data[i], f"image {i}") for i in range(start, min(start + batch_size, count))]
            yield Batch(chunk, None)
        return
    for index, item in enumerate(cast(Iterable[Any], data)):
        batch = _from_loader_item(item, index)
        if limit is not None and seen + len(batch.images) > limit:
            keep = limit - seen
            batch = Batch(batch.images[:keep], None if batch.targets is None else batch.targets[:keep])
        if batch.images:
            yield batch
        seen += len(batch.images)
        if limit is not None and seen >= limit:
            return


def count_images(data: DataSource, limit: int | None = None) -> int | None:
    """Number of images ``iter_batches`` will yield, when known without iterating (for progress bars)."""
    total: int | None
    if isinstance(data, Tensor):
        total = int(data.shape[0])
    elif isinstance(data, DataLoader):
        try:
            total = len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            total = None
    elif isinstance(data, Sequence | Dataset):
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    else:
        total = None
    if total is None:
        return limit
    return total if limit is None else min(total, limit)


def boxes_in_pixels(target: Target) -> Tensor:
    """A target's ``boxes [N, 4]`` (cxcywh in [0, 1]) as ``[N, 4]`` (x0, y0, x1, y1) in input pixels."""
    height, width = (int(v) for v in target["size"])
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    cx, cy, w, h = boxes.unbind(-1)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * scale
