"""DETR's augmentation and validation resizing, on torchvision ``transforms.v2`` (boxes follow).

Train: horizontal flip, then either a multi-scale resize of the short side, or a resize to one
of three sizes + a random crop + the multi-scale resize. Validation: one short-side size.
Scales are named presets: ``full`` (the original: 480..800, max 1333, val 800), ``tiny``
(x0.64: short side 512 at validation) and ``synthetic`` (the embedded 192x256 set, seen at
short side 128..192 in training and 160 at validation).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sdetr.model.boxes import xyxy_to_cxcywh
from sdetr.model.images import IMAGENET_MEAN, IMAGENET_STD

Sample = tuple[tv_tensors.Image, dict[str, Any]]


@dataclass(frozen=True)
class Scale:
    """Sizes (short side) of the augmentation and of validation."""

    train_sizes: tuple[int, ...]
    max_size: int
    crop_resize: tuple[int, ...]
    crop_range: tuple[int, int]
    val_size: int

    def scaled(self, factor: float) -> Scale:
        """Every size times ``factor``, rounded to whole pixels (progressive resizing's smaller
        epochs: without augmentation, ``synthetic.scaled(0.8)`` trains at short side 128 instead of
        160; with it, at 102..154 instead of 128..192).

        Raises:
            ValueError: ``factor`` is not a positive finite number.
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"a scale factor must be positive and finite, got {factor}")

        def size(pixels: int) -> int:
            return max(1, round(pixels * factor))

        return Scale(
            train_sizes=tuple(size(s) for s in self.train_sizes),
            max_size=size(self.max_size),
            crop_resize=tuple(size(s) for s in self.crop_resize),
            crop_range=(size(self.crop_range[0]), size(self.crop_range[1])),
            val_size=size(self.val_size),
        )


SCALES = {
    "full": Scale(tuple(range(480, 801, 32)), 1333, (400, 500, 600), (384, 600), 800),
    "tiny": Scale(tuple(range(288, 513, 32)), 853, (256, 320, 384), (240, 384), 512),
    "synthetic": Scale(tuple(range(128, 193, 16)), 256, (128, 144, 160), (112, 160), 160),
}


class RandomSizeCrop:
    """Crop a random ``h x w`` window with sides in ``[low, min(side, high)]`` (DETR's crop)."""

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> Sample:
        height, width = image.shape[-2:]
        h = random.randint(min(self.low, height), min(height, self.high))
        w = random.randint(min(self.low, width), min(width, self.high))
        top, left = random.randint(0, height - h), random.randint(0, width - w)
        target = dict(target, boxes=TF.crop(target["boxes"], top, left, h, w))
        return TF.crop(image, top, left, h, w), target


class ToModelTarget:
    """Float image normalised with ImageNet statistics; boxes to cxcywh in [0, 1] of the image."""

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        height, width = image.shape[-2:]
        pixels = TF.to_dtype(image, torch.float32, scale=True)
        pixels = TF.normalize(pixels, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        boxes = target["boxes"].as_subclass(Tensor)  # [N, 4] xyxy in pixels
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        out = dict(target, boxes=xyxy_to_cxcywh(boxes) / scale, size=torch.tensor([height, width]))
        return pixels.as_subclass(Tensor), out


def build_transforms(scale: str | Scale, train: bool, augment: bool = True) -> v2.Compose:
    """The pipeline for one split; ``augment=False`` makes training deterministic (val resizing)."""
    s = SCALES[scale] if isinstance(scale, str) else scale
    if train and augment:
        steps: list[Any] = [
            v2.RandomHorizontalFlip(),
            v2.RandomChoice(
                [
                    v2.RandomShortestSize(list(s.train_sizes), max_size=s.max_size),
                    v2.Compose(
                        [
                            v2.RandomShortestSize(list(s.crop_resize)),
                            RandomSizeCrop(*s.crop_range),
                            v2.RandomShortestSize(list(s.train_sizes), max_size=s.max_size),
                        ]
                    ),
                ]
            ),
        ]
    else:
        steps = [v2.RandomShortestSize([s.val_size], max_size=s.max_size)]
    return v2.Compose([*steps, v2.SanitizeBoundingBoxes(min_size=1.0), ToModelTarget()])
