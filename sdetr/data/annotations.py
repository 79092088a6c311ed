"""COCO annotation files: read, check every field, index with pycocotools.

Every entry is checked before pycocotools sees it, so a malformed file gives one
:class:`BadDataError` naming the file, the entry (annotation id, image id or list position)
and the field, instead of a raw ``KeyError``/``TypeError`` or a silently wrong box:
- the file: valid JSON, an object with an ``images`` list, a non-empty ``categories`` list and
  (optionally) an ``annotations`` list;
- categories: integer ``id`` in ``[0, MAX_CATEGORY_ID)``, unique; ``name`` a string if present;
- images: integer ``id``, unique; ``file_name`` a non-empty string; ``width`` and ``height``
  positive integers up to ``MAX_SIDE``;
- annotations: integer ``id``, unique; ``image_id`` and ``category_id`` of existing entries;
  ``bbox`` four finite numbers with non-negative width and height; ``iscrowd`` 0 or 1 and
  ``area`` a finite number >= 0 when present (missing: 0 and the box's area, as COCOeval needs both).
With ``on_bad_data="skip"`` a bad entry is left out and counted by kind instead (the file-level
problems stay errors); the returned index holds only the entries that passed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal, TypeGuard

from pycocotools.coco import COCO

from sdetr.errors import UserError

OnBadData = Literal["error", "skip"]

#: Category ids must be below this (the model gets ``max id + 1`` classes).
MAX_CATEGORY_ID = 100_000
SKIP_HINT = "Fix the data or pass on_bad_data='skip' (--skip_bad_data)."


class BadDataError(UserError, ValueError):
    """Data that cannot be used; the message names the file, the entry and the field."""


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool; not an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Entries:
    """Collects bad entries: raises on the first (``"error"``) or counts them by kind (``"skip"``)."""

    def __init__(self, path: Path, on_bad_data: OnBadData) -> None:
        self.path = path
        self.on_bad_data = on_bad_data
        self.skipped: Counter[str] = Counter()

    def bad(self, kind: str, message: str) -> None:
        if self.on_bad_data == "error":
            raise BadDataError(f"{self.path}: {message}. {SKIP_HINT}")
        self.skipped[kind] += 1

    def fatal(self, message: str) -> BadDataError:
        return BadDataError(f"{self.path}: not a COCO annotation file ({message})")


def read_annotation_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON of an annotation file.

    Raises:
        FileNotFoundError: no such file.
        BadDataError: a folder, an unreadable file or not JSON (naming the file and the position).
    """
    path = Path(path)
    if path.is_dir():
        raise BadDataError(f"{path} is a folder; expected a COCO annotation JSON file")
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {path} does not exist; "
            "--coco_path must contain annotations/instances_{train,val}2017.json"
        )
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise BadDataError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise BadDataError(f"{path}: not a COCO annotation file (invalid JSON: {error})") from None


def validate_coco(data: Any, path: Path, on_bad_data: OnBadData = "error") -> tuple[dict[str, Any], Counter[str]]:
    """The entries of a parsed annotation file that pass every check, and the skipped counts.

    Args:
        data: the parsed JSON.
        path: the file it came from (for messages).
        on_bad_data: ``"error"``: raise on the first bad entry; ``"skip"``: leave it out and count it.

    Raises:
        BadDataError: naming the file, the entry and the field.
    """
    if on_bad_data not in ("error", "skip"):
        raise ValueError(f"on_bad_data={on_bad_data!r}; use 'error' or 'skip'")
    entries = _Entries(path, on_bad_data)
    if not isinstance(data, dict):
        raise entries.fatal(f"the top level is a JSON {type(data).__name__}, not an object with 'images'")
    for key, required in (("images", True), ("categories", True), ("annotations", False)):
        if key not in data:
            if required:
                raise entries.fatal(f"no {key!r} list; top-level keys: {sorted(map(str, data))[:10]}")
        elif not isinstance(data[key], list):
            raise entries.fatal(f"{key!r} is a {type(data[key]).__name__}, not a list")
    categories = _categories(data["categories"], entries)
    if not categories:
        raise BadDataError(f"{path}: no usable categories ('categories' is empty or every entry is bad)")
    images = _images(data["images"], entries)
    annotations = _annotations(data.get("annotations", []), images, categories, entries)
    clean = {
        **{k: v for k, v in data.items() if k not in ("images", "categories", "annotations")},
        "images": list(images.values()),
        "categories": list(categories.values()),
        "annotations": annotations,
    }
    return clean, entries.skipped


def _categories(items: list[Any], entries: _Entries) -> dict[int, dict[str, Any]]:
    kind = "categories with bad fields"
    categories: dict[int, dict[str, Any]] = {}
    for index, cat in enumerate(items):
        if not isinstance(cat, dict):
            entries.bad(kind, f"categories[{index}] is a {type(cat).__name__}, not an object")
            continue
        cat_id = cat.get("id")
        if not _is_int(cat_id) or not 0 <= cat_id < MAX_CATEGORY_ID:
            entries.bad(
                kind,
                f"categories[{index}]: field 'id' is {_shown(cat_id)}; expected an integer in [0, {MAX_CATEGORY_ID})",
            )
            continue
        if cat_id in categories:
            entries.bad("duplicate ids", f"category id {cat_id} appears more than once in 'categories'")
            continue
        if "name" in cat and not isinstance(cat["name"], str):
            entries.bad(kind, f"category {cat_id}: field 'name' is {_shown(cat['name'])}; expected a string")
            continue
        categories[cat_id] = cat
    return categories


#: Largest image side accepted (int32's range; larger values are corrupt, not images).
MAX_SIDE = 2**31 - 1


def _pixels(value: Any) -> int | None:
    """A positive integer size (``640`` or ``640.0``) up to :data:`MAX_SIDE`, else None."""
    if _is_number(value) and 0 < value <= MAX_SIDE and float(value).is_integer():
        return int(value)
    return None


def _images(items: list[Any], entries: _Entries) -> dict[int, dict[str, Any]]:
    kind = "images with bad fields"
    images: dict[int, dict[str, Any]] = {}
    for index, img in enumerate(items):
        if not isinstance(img, dict):
            entries.bad(kind, f"images[{index}] is a {type(img).__name__}, not an object")
            continue
        image_id = img.get("id")
        if not _is_int(image_id):
            entries.bad(kind, f"images[{index}]: field 'id' is {_shown(image_id)}; expected an integer")
            continue
        if image_id in images:
            entries.bad("duplicate ids", f"image id {image_id} appears more than once in 'images'")
            continue
        name = img.get("file_name")
        if not isinstance(name, str) or not name.strip():
            entries.bad(kind, f"image {image_id}: field 'file_name' is {_shown(name)}; expected a file name")
            continue
        sizes = {field: _pixels(img.get(field)) for field in ("width", "height")}
        wrong = [field for field, size in sizes.items() if size is None]
        if wrong:
            field = wrong[0]
            entries.bad(
                kind,
                f"image {image_id} ({name}): field {field!r} is {_shown(img.get(field))}; "
                f"expected a positive integer (pixels, at most {MAX_SIDE})",
            )
            continue
        images[image_id] = {**img, "width": sizes["width"], "height": sizes["height"]}
    return images


def _annotations(
    items: list[Any], images: dict[int, Any], categories: dict[int, Any], entries: _Entries
) -> list[dict[str, Any]]:
    kind = "annotations with bad fields"
    seen: set[int] = set()
    clean = []
    for index, ann in enumerate(items):
        if not isinstance(ann, dict):
            entries.bad(kind, f"annotations[{index}] is a {type(ann).__name__}, not an object")
            continue
        ann_id = ann.get("id")
        if not _is_int(ann_id):
            entries.bad(kind, f"annotations[{index}]: field 'id' is {_shown(ann_id)}; expected an integer")
            continue
        if ann_id in seen:
            entries.bad("duplicate ids", f"annotation id {ann_id} appears more than once in 'annotations'")
            continue
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or image_id not in images:
            entries.bad(
                "annotations of missing images",
                f"annotation {ann_id} refers to image_id {_shown(image_id)}, which is not in 'images'",
            )
            continue
        if not _is_int(category_id) or category_id not in categories:
            entries.bad(
                "annotations of missing categories",
                f"annotation {ann_id} (image {image_id}) has category_id {_shown(category_id)}, "
                "which is not in 'categories'",
            )
            continue
        where = f"annotation {ann_id} (image {image_id})"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            shown = "missing" if "bbox" not in ann else _shown(bbox)
            entries.bad(kind, f"{where}: field 'bbox' is {shown}; expected 4 finite numbers [x, y, width, height]")
            continue
        if bbox[2] < 0 or bbox[3] < 0:
            entries.bad("boxes with negative size", f"{where} has bbox {bbox} with negative width or height")
            continue
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or not isinstance(iscrowd, (int, bool)):
            entries.bad(kind, f"{where}: field 'iscrowd' is {_shown(iscrowd)}; expected 0 or 1")
            continue
        area = ann.get("area", float(bbox[2]) * float(bbox[3]))
        if not _is_number(area) or area < 0:
            entries.bad(kind, f"{where}: field 'area' is {_shown(area)}; expected a finite number >= 0")
            continue
        seen.add(ann_id)
        clean.append({**ann, "iscrowd": int(iscrowd), "area": area})
    return clean


def index_coco(dataset: dict[str, Any]) -> COCO:
    """pycocotools' index of an already validated dataset dict, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_coco(annotation_file: str | os.PathLike[str], on_bad_data: OnBadData = "error") -> tuple[COCO, Counter[str]]:
    """Read, validate and index an annotation file; also the counts of skipped entries by kind."""
    path = Path(annotation_file)
    dataset, skipped = validate_coco(read_annotation_json(path), path, on_bad_data)
    return index_coco(dataset), skipped


def load_coco(annotation_file: str | os.PathLike[str], on_bad_data: OnBadData = "error") -> COCO:
    """pycocotools' COCO index of a validated annotation file (see the module docstring), without prints.

    Args:
        annotation_file: a COCO ``instances_*.json``.
        on_bad_data: ``"error"`` (default): a bad entry raises; ``"skip"``: bad entries are left out.

    Raises:
        FileNotFoundError: no such file.
        BadDataError: a malformed file or entry (naming the file, the entry and the field).
    """
    return read_coco(annotation_file, on_bad_data)[0]
