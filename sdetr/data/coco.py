"""COCO detection through pycocotools, with the original cleaning and clear bad-data errors.

The annotation file is checked field by field first (:mod:`sdetr.data.annotations`). Cleaning
(as the original): crowd boxes are dropped, boxes are clipped to the image and boxes left empty
are removed. Bad data is either an error that names the file, the entry and the field
(``on_bad_data="error"``, the default) or skipped with one warning and a count per kind
(``on_bad_data="skip"``):
- an entry with a missing or malformed field (see :mod:`sdetr.data.annotations`);
- an annotation whose ``image_id`` or ``category_id`` does not exist;
- a box with negative width or height, or entirely outside its image;
- an image file that is missing, or unreadable or of another size than its entry says
  (found by :meth:`CocoDetection.verify_images`, which the trainer runs before the first step).
Skipped images are left out of the dataset, never replaced by other images.
Images without objects are legitimate in COCO (all queries learn "no object"): they are kept
and counted; with ``on_bad_data="skip"`` they are skipped too.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm.auto import tqdm

from sdetr.data.annotations import SKIP_HINT, BadDataError, OnBadData, load_coco, read_coco

__all__ = ["BadDataError", "CocoDetection", "CocoPaths", "OnBadData", "collate", "image_problem", "load_coco"]

#: Bad files listed in full in one error message; more are counted.
MAX_LISTED = 20


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


def image_problem(path: Path, width: int, height: int) -> str | None:
    """Why the image file at ``path`` cannot be used (None: it can), reading headers only.

    PIL's ``verify`` checks the file's structure (for PNG every chunk's checksum) without
    decoding the pixels; the size must be the ``width x height`` of its entry.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except FileNotFoundError:
        return "does not exist"
    except Exception as error:  # PIL raises many types for broken files
        return f"is unreadable ({type(error).__name__}: {error})"
    if size != (width, height):
        return f"is {size[0]}x{size[1]} pixels but its entry says {width}x{height}"
    return None


class CocoDetection(Dataset[tuple[Tensor, dict[str, Any]]]):
    """Images and targets of one split.

    Each item is ``(image [3, H, W] normalised, target)`` with target ``boxes [N, 4]`` cxcywh in
    [0, 1] of the transformed image, ``labels [N]`` (COCO category ids), ``image_id``,
    ``orig_size`` and ``size`` (height, width).

    Attributes:
        coco: the pycocotools index of the entries that passed the checks.
        skipped: counts of skipped items by kind (with ``on_bad_data="skip"``).
        empty_images: number of images without (valid) objects.
    """

    def __init__(
        self,
        paths: CocoPaths,
        transforms: Callable[..., tuple[Tensor, dict[str, Any]]] | None,
        on_bad_data: OnBadData = "error",
        cache_decoded: bool = False,
        cache_samples: bool = False,
    ) -> None:
        if on_bad_data not in ("error", "skip"):
            raise ValueError(f"on_bad_data={on_bad_data!r}; use 'error' or 'skip'")
        self.paths = paths
        self.on_bad_data = on_bad_data
        #: Decoded images kept in memory after their first read (``cache_decoded``): small sets
        #: only (the embedded synthetic set: 1400 x 192x256x3 bytes, 206 MB); each worker keeps its own.
        self.decoded: dict[int, np.ndarray] | None = {} if cache_decoded else None
        #: Transformed samples kept in memory after their first read (``cache_samples``): only for
        #: transforms that give the same sample every time (no augmentation) and small sets (the
        #: synthetic set at short side 160: 1200 x 3x160x213 float32, 491 MB). The first epoch
        #: fills it; later epochs skip the transforms' resize and normalisation (about 30 ms per
        #: batch of 16 on a 2-core CPU). Each view of :meth:`with_transforms` keeps its own, and
        #: so does each data-loading worker process (lost when the workers end with the epoch).
        #: Reads return the cache's tensors (a new target dict): write into copies only.
        self.transforms = transforms  # (the setter leaves the cache off: turned on next)
        self.samples: dict[int, tuple[Tensor, dict[str, Any]]] | None = {} if cache_samples else None
        self.coco, self.skipped = read_coco(paths.annotations, on_bad_data)
        if not paths.images.is_dir():
            raise FileNotFoundError(
                f"image folder {paths.images} does not exist (expected next to {paths.annotations.parent})"
            )
        self.targets: dict[int, tuple[Tensor, Tensor]] = {}
        self.ids = self._clean()
        self.empty_images = sum(1 for i in self.ids if len(self.targets[i][1]) == 0)
        if self.skipped:
            details = ", ".join(f"{count} {kind}" for kind, count in sorted(self.skipped.items()))
            warnings.warn(f"{paths.annotations}: skipped {details}", stacklevel=2)

    def with_transforms(
        self, transforms: Callable[..., tuple[Tensor, dict[str, Any]]], cache_samples: bool | None = None
    ) -> CocoDetection:
        """The same split through other ``transforms``: a shallow copy that shares the index, the
        targets and the decoded-image cache (progressive resizing's smaller epochs read it). A
        view to read from: drop or verify images on the split it came from, then take a new view.

        Args:
            cache_samples: give the view a sample cache of its own (samples depend on the
                transforms); None: if this split caches samples. Only for transforms that give the
                same sample every time.
        """
        caching = self.samples is not None if cache_samples is None else cache_samples
        other = copy.copy(self)
        other.transforms = transforms  # turns the copy's cache off (the setter) ...
        other.samples = {} if caching else None  # ... and this gives it a new one
        return other

    @property
    def transforms(self) -> Callable[..., tuple[Tensor, dict[str, Any]]] | None:
        """What turns a decoded image and its target into a sample; setting it turns the sample cache off."""
        return self._transforms

    @transforms.setter
    def transforms(self, transforms: Callable[..., tuple[Tensor, dict[str, Any]]] | None) -> None:
        """New transforms turn the sample cache off: whether they give the same sample every time
        is not known here (:meth:`with_transforms` can keep it on)."""
        self._transforms = transforms
        self.samples = None

    def _bad(self, kind: str, message: str) -> None:
        if self.on_bad_data == "error":
            raise BadDataError(f"{self.paths.annotations}: {message}. {SKIP_HINT}")
        self.skipped[kind] += 1

    def _clean(self) -> list[int]:
        coco = self.coco
        per_image: dict[int, tuple[list[list[float]], list[int]]] = {i: ([], []) for i in coco.imgs}
        for ann in coco.dataset["annotations"]:  # validated: ids exist, bbox is 4 finite numbers, w, h >= 0
            ann_id, image_id = ann["id"], ann["image_id"]
            if ann["iscrowd"]:
                continue  # the original drops crowd boxes
            x, y, w, h = (float(v) for v in ann["bbox"])
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
            path = self.image_path(image_id)
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

    def image_path(self, image_id: int) -> Path:
        return self.paths.images / self.coco.imgs[image_id]["file_name"]

    def find_bad_images(self, progress: bool = False) -> list[tuple[int, Path, str]]:
        """``(image id, path, problem)`` of every image that cannot be read (headers only, see
        :func:`image_problem`); fast enough to run over a whole split before training.

        Args:
            progress: show a progress bar (for splits of 1000 images or more).
        """
        bad = []
        for image_id in tqdm(
            self.ids,
            desc=f"checking {self.paths.split} images",
            disable=not progress or len(self.ids) < 1000,
            leave=False,
        ):
            info = self.coco.imgs[image_id]
            path = self.image_path(image_id)
            problem = image_problem(path, int(info["width"]), int(info["height"]))
            if problem is not None:
                bad.append((image_id, path, problem))
        return bad

    def drop_images(self, image_ids: Iterable[int], kind: str = "unreadable images") -> None:
        """Leave these images out of the dataset and count them under ``kind`` in ``skipped``."""
        dropped = set(image_ids) & set(self.ids)
        self.ids = [i for i in self.ids if i not in dropped]
        self.empty_images = sum(1 for i in self.ids if len(self.targets[i][1]) == 0)
        if dropped:
            self.skipped[kind] += len(dropped)

    def verify_images(self) -> None:
        """Check every image file before use: one error listing all bad files (``on_bad_data="error"``),
        or they are left out, counted and listed in one warning (``"skip"``)."""
        bad = self.find_bad_images()
        if not bad:
            return
        listing = describe_bad_images(bad)
        if self.on_bad_data == "error":
            raise BadDataError(
                f"{len(bad)} image file(s) of {self.paths.images} cannot be used:\n{listing}\n{SKIP_HINT}"
            )
        self.drop_images(image_id for image_id, _, _ in bad)
        warnings.warn(f"skipped {len(bad)} unreadable image(s) of {self.paths.images}:\n{listing}", stacklevel=2)

    def read_image(self, image_id: int) -> Image.Image:
        path = self.image_path(image_id)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:  # PIL raises many types for broken files
            raise BadDataError(
                f"{path}: image {image_id} is unreadable ({type(error).__name__}: {error}). "
                "Run dataset.verify_images() first (the trainer does) to find every bad file at once"
                + (" and skip them." if self.on_bad_data == "skip" else ".")
            ) from None

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        if self.samples is None:
            return self._transformed(image_id)
        cached = self.samples.get(image_id)
        if cached is None:
            # torchvision's deterministic resize still draws from torch's global generator (its
            # one-size choice): drawn in a fork, so that filling the cache, which a resumed run
            # does at other epochs than the run it continues, leaves training's random stream alone
            with torch.random.fork_rng(devices=[]):
                cached = self.samples[image_id] = self._transformed(image_id)
        image, target = cached
        return image, dict(target)  # a new dict; the tensors are the cache's own: never write into them

    def _transformed(self, image_id: int) -> tuple[Tensor, dict[str, Any]]:
        if self.decoded is None:
            return self._sample(image_id, np.asarray(self.read_image(image_id)))
        pixels = self.decoded.get(image_id)
        if pixels is None:
            pixels = self.decoded[image_id] = np.asarray(self.read_image(image_id))
        return self._sample(image_id, pixels)

    def _sample(self, image_id: int, image: np.ndarray) -> tuple[Tensor, dict[str, Any]]:
        """``image``: ``[H, W, 3]`` uint8 RGB (never modified: the cache keeps it)."""
        boxes, labels = self.targets[image_id]
        height, width = image.shape[:2]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(height, width)),
            "labels": labels.clone(),
            "image_id": image_id,
            "orig_size": torch.tensor([height, width]),
        }
        pixels = tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1))  # [H, W, 3] -> [3, H, W] uint8
        if self.transforms is None:
            raise RuntimeError("CocoDetection needs transforms that turn the sample into model input")
        return self.transforms(pixels, target)


def describe_bad_images(bad: list[tuple[int, Path, str]]) -> str:
    """One line per bad image (the first :data:`MAX_LISTED`), then a count of the rest."""
    lines = [f"  {path} (image {image_id}) {problem}" for image_id, path, problem in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return "\n".join(lines)


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Images stay a list (the model pads them and builds the mask); targets a list of dicts."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
