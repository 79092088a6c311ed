"""COCO detection through pycocotools, with the original cleaning and clear bad-data errors.

Cleaning (as the original): crowd boxes are dropped, boxes are clipped to the image and boxes
left empty are removed. Bad data is either an error that names the file and the annotation
(``on_bad_data="error"``, the default) or skipped with one warning and a count per kind
(``on_bad_data="skip"``):
- an annotation whose ``image_id`` or ``category_id`` does not exist;
- a box with negative width or height, or entirely outside its image;
- an image file that is missing or unreadable.
Images without objects are legitimate in COCO (all queries learn "no object"): they are kept
and counted; with ``on_bad_data="skip"`` they are skipped too.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

OnBadData = Literal["error", "skip"]


class BadDataError(ValueError):
    """Data that cannot be used; the message names the file and the annotation."""


@dataclass(frozen=True)
class CocoPaths:
    """``root/annotations/instances_{split}2017.json`` and ``root/{split}2017/``."""

    root: Path
    split: str

    @property
    def annotations(self) -> Path:
        return self.root / "annotations" / f"instances_{self.split}2017.json"

    @property
    def images(self) -> Path:
        return self.root / f"{self.split}2017"


def load_coco(annotation_file: str | os.PathLike[str]) -> COCO:
    """pycocotools' COCO index, without its prints; a clear error for a missing or broken file."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {path} does not exist; "
            "--coco_path must contain annotations/instances_{train,val}2017.json"
        )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as error:  # pycocotools asserts on format
        raise BadDataError(f"{path}: not a COCO annotation file ({type(error).__name__}: {error})") from None


class CocoDetection(Dataset[tuple[Tensor, dict[str, Any]]]):
    """Images and targets of one split.

    Each item is ``(image [3, H, W] normalised, target)`` with target ``boxes [N, 4]`` cxcywh in
    [0, 1] of the transformed image, ``labels [N]`` (COCO category ids), ``image_id``,
    ``orig_size`` and ``size`` (height, width).

    Attributes:
        skipped: counts of skipped items by kind (with ``on_bad_data="skip"``).
        empty_images: number of images without (valid) objects.
    """

    def __init__(
        self,
        paths: CocoPaths,
        transforms: Callable[..., tuple[Tensor, dict[str, Any]]] | None,
        on_bad_data: OnBadData = "error",
    ) -> None:
        if on_bad_data not in ("error", "skip"):
            raise ValueError(f"on_bad_data={on_bad_data!r}; use 'error' or 'skip'")
        self.paths = paths
        self.transforms = transforms
        self.on_bad_data = on_bad_data
        self.coco = load_coco(paths.annotations)
        if not paths.images.is_dir():
            raise FileNotFoundError(
                f"image folder {paths.images} does not exist (expected next to {paths.annotations.parent})"
            )
        self.skipped: Counter[str] = Counter()
        self.targets: dict[int, tuple[Tensor, Tensor]] = {}
        self.ids = self._clean()
        self.empty_images = sum(1 for i in self.ids if len(self.targets[i][1]) == 0)
        if self.skipped:
            details = ", ".join(f"{count} {kind}" for kind, count in sorted(self.skipped.items()))
            warnings.warn(f"{paths.annotations}: skipped {details}", stacklevel=2)

    def _bad(self, kind: str, message: str) -> None:
        if self.on_bad_data == "error":
            raise BadDataError(
                f"{self.paths.annotations}: {message}. Fix the data or pass on_bad_data='skip' (--skip_bad_data)."
            )
        self.skipped[kind] += 1

    def _clean(self) -> list[int]:
        coco = self.coco
        per_image: dict[int, tuple[list[list[float]], list[int]]] = {i: ([], []) for i in coco.imgs}
        for ann in coco.dataset.get("annotations", []):
            ann_id, image_id = ann.get("id"), ann.get("image_id")
            if image_id not in coco.imgs:
                self._bad(
                    "annotations of missing images",
                    f"annotation {ann_id} refers to image_id {image_id}, which is not in 'images'",
                )
                continue
            if ann.get("category_id") not in coco.cats:
                self._bad(
                    "annotations of missing categories",
                    f"annotation {ann_id} (image {image_id}) has category_id {ann.get('category_id')}, "
                    "which is not in 'categories'",
                )
                continue
            if ann.get("iscrowd", 0):
                continue  # the original drops crowd boxes
            x, y, w, h = ann["bbox"]
            if w < 0 or h < 0:
                self._bad(
                    "boxes with negative size",
                    f"annotation {ann_id} (image {image_id}) has bbox {ann['bbox']} with negative width or height",
                )
                continue
            info = coco.imgs[image_id]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(info["width"]), x + w), min(float(info["height"]), y + h)
            if w > 0 and h > 0 and (x1 <= 0 or y1 <= 0 or x0 >= info["width"] or y0 >= info["height"]):
                self._bad(
                    "boxes outside their image",
                    f"annotation {ann_id} has bbox {ann['bbox']} entirely outside image {image_id} "
                    f"({info['file_name']}, {info['width']}x{info['height']})",
                )
                continue
            if x1 > x0 and y1 > y0:  # empty boxes are removed, as in the original
                per_image[image_id][0].append([x0, y0, x1, y1])
                per_image[image_id][1].append(int(ann["category_id"]))
        ids = []
        for image_id in sorted(per_image):
            info = coco.imgs[image_id]
            path = self.paths.images / info["file_name"]
            if not path.is_file():
                self._bad("missing image files", f"image {image_id} ({path}) does not exist")
                continue
            boxes, labels = per_image[image_id]
            if not labels and self.on_bad_data == "skip":
                self.skipped["images without objects"] += 1
                continue
            self.targets[image_id] = (
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64),
            )
            ids.append(image_id)
        return ids

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        path = self.paths.images / info["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise BadDataError(f"{path}: image {image_id} is unreadable ({error})") from None

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        for attempt in range(len(self.ids)):
            image_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                image = self.read_image(image_id)
            except BadDataError:
                if self.on_bad_data == "error":
                    raise
                warnings.warn(f"skipping unreadable image {image_id}; using the next one", stacklevel=2)
                continue
            return self._sample(image_id, image)
        raise BadDataError(f"{self.paths.images}: no readable image")

    def _sample(self, image_id: int, image: Image.Image) -> tuple[Tensor, dict[str, Any]]:
        boxes, labels = self.targets[image_id]
        width, height = image.size
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(height, width)),
            "labels": labels.clone(),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width]),
        }
        pixels = tv_tensors.Image(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))  # [3, H, W] uint8
        if self.transforms is None:
            raise RuntimeError("CocoDetection needs transforms that turn the sample into model input")
        return self.transforms(pixels, target)


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Images stay a list (the model pads them and builds the mask); targets a list of dicts."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
