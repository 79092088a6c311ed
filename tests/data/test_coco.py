"""COCO loading: cleaning as the original, and every kind of bad data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdetr.data import BadDataError, CocoDetection, CocoPaths, build_transforms, collate


def write_coco(
    root: Path, annotations: list[dict[str, Any]], images: int = 3, extra_images: list[dict] | None = None
) -> CocoPaths:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    entries = []
    for i in range(1, images + 1):
        Image.new("RGB", (80, 60), (i * 40, 0, 0)).save(root / "train2017" / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 60})
    entries += extra_images or []
    payload = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
    }
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(payload))
    return CocoPaths(root, "train")


def ann(i: int, image_id: int, bbox: list[float], category: int = 1, **extra: Any) -> dict[str, Any]:
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": category, "area": 1.0, **extra}


GOOD = [ann(1, 1, [5, 5, 20, 10]), ann(2, 2, [10, 10, 30, 30], 3), ann(3, 3, [0, 0, 8, 8])]


def test_original_cleaning(tmp_path: Path) -> None:
    annotations = [
        *GOOD,
        ann(4, 1, [70, 50, 30, 30]),  # clipped to the image: (70, 50, 80, 60)
        ann(5, 1, [10, 10, 5, 5], iscrowd=1),  # crowd: dropped
        ann(6, 2, [10, 10, 0, 5]),  # empty: removed
    ]
    dataset = CocoDetection(write_coco(tmp_path, annotations), build_transforms("synthetic", train=False))
    boxes, labels = dataset.targets[1]
    assert boxes.tolist() == [[5.0, 5.0, 25.0, 15.0], [70.0, 50.0, 80.0, 60.0]] and labels.tolist() == [1, 1]
    assert dataset.targets[2][1].tolist() == [3]
    image, target = dataset[1]
    assert image.shape[0] == 3 and target["image_id"] == 2 and target["orig_size"].tolist() == [60, 80]
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2


BAD_CASES = [
    ("annotation 9 refers to image_id 42", "annotations of missing images", [ann(9, 42, [1, 1, 5, 5])], None),
    (
        "annotation 9 .image 1. has category_id 2",
        "annotations of missing categories",
        [ann(9, 1, [1, 1, 5, 5], 2)],
        None,
    ),
    ("annotation 9 .image 1. has bbox .* negative", "boxes with negative size", [ann(9, 1, [1, 1, -5, 5])], None),
    (
        "annotation 9 has bbox .* entirely outside image 1",
        "boxes outside their image",
        [ann(9, 1, [100, 70, 5, 5])],
        None,
    ),
    (
        r"image 4 .*4\.png. does not exist",
        "missing image files",
        [],
        [{"id": 4, "file_name": "4.png", "width": 8, "height": 8}],
    ),
]


@pytest.mark.parametrize(("message", "kind", "extra", "images"), BAD_CASES)
def test_bad_data_is_an_error_naming_file_and_annotation(
    tmp_path: Path, message: str, kind: str, extra, images
) -> None:  # type: ignore[no-untyped-def]
    paths = write_coco(tmp_path, [*GOOD, *extra], extra_images=images)
    with pytest.raises(BadDataError, match=rf"instances_train2017\.json: {message}.*on_bad_data='skip'"):
        CocoDetection(paths, build_transforms("synthetic", train=False))


@pytest.mark.parametrize(("message", "kind", "extra", "images"), BAD_CASES)
def test_bad_data_is_skipped_with_a_count(tmp_path: Path, message: str, kind: str, extra, images) -> None:  # type: ignore[no-untyped-def]
    paths = write_coco(tmp_path, [*GOOD, *extra], extra_images=images)
    with pytest.warns(UserWarning, match=f"skipped 1 {kind}"):
        dataset = CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")
    assert dataset.skipped == {kind: 1}
    assert len(dataset) == 3


def test_unreadable_image(tmp_path: Path) -> None:
    paths = write_coco(tmp_path, GOOD)
    (paths.images / "2.png").write_bytes(b"not a png")
    strict = CocoDetection(paths, build_transforms("synthetic", train=False))
    with pytest.raises(BadDataError, match=r"2\.png: image 2 is unreadable"):
        strict[1]
    lenient = CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")
    with pytest.warns(UserWarning, match="skipping unreadable image 2"):
        _, target = lenient[1]
    assert target["image_id"] == 3


def test_images_without_objects_are_kept_and_counted_or_skipped(tmp_path: Path) -> None:
    paths = write_coco(tmp_path, GOOD[:2])  # image 3 has no objects
    kept = CocoDetection(paths, build_transforms("synthetic", train=False))
    assert len(kept) == 3 and kept.empty_images == 1
    _, target = kept[2]
    assert target["boxes"].shape == (0, 4)
    with pytest.warns(UserWarning, match="1 images without objects"):
        skipped = CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")
    assert len(skipped) == 2


def test_missing_and_broken_annotation_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="must contain annotations/instances"):
        CocoDetection(CocoPaths(tmp_path, "val"), None)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(BadDataError, match="not a COCO annotation file"):
        CocoDetection(CocoPaths(tmp_path, "val"), None)
