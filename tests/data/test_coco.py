"""COCO loading: cleaning as the original, and every kind of bad data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from sdetr.data import SCALES, BadDataError, CocoDetection, CocoPaths, build_transforms, collate, load_coco


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


def test_cached_images_are_decoded_once_and_give_the_same_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_coco(tmp_path, GOOD)
    plain = CocoDetection(paths, build_transforms("synthetic", train=False))
    cached = CocoDetection(paths, build_transforms("synthetic", train=False), cache_decoded=True)
    reads: list[int] = []
    read = cached.read_image
    monkeypatch.setattr(cached, "read_image", lambda image_id: reads.append(image_id) or read(image_id))
    for _ in range(3):  # three epochs
        for index in range(len(cached)):
            image, target = cached[index]
            expected_image, expected_target = plain[index]
            assert torch.equal(image, expected_image) and torch.equal(target["boxes"], expected_target["boxes"])
    assert sorted(reads) == [1, 2, 3]  # each file read once
    assert cached.decoded is not None and cached.decoded[2][0, 0].tolist() == [80, 0, 0]  # the file's pixels


def test_with_transforms_shares_the_split_and_its_decoded_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progressive resizing reads the same split at another size: one index, one decoded-image cache."""
    paths = write_coco(tmp_path, GOOD)
    full = CocoDetection(paths, build_transforms("synthetic", train=False), cache_decoded=True)
    small = full.with_transforms(build_transforms(SCALES["synthetic"].scaled(0.5), train=True, augment=False))
    reads: list[int] = []
    read = full.read_image
    monkeypatch.setattr(full, "read_image", lambda image_id: reads.append(image_id) or read(image_id))
    image, target = full[1]
    assert image.shape == (3, 160, 213) and full.transforms is not small.transforms
    monkeypatch.setattr(small, "read_image", lambda image_id: reads.append(-image_id) or read(image_id))
    small_image, small_target = small[1]
    assert small_image.shape == (3, 80, 106) and small_target["image_id"] == target["image_id"] == 2
    torch.testing.assert_close(small_target["boxes"], target["boxes"], atol=0.01, rtol=0)  # relative boxes agree
    assert reads == [2]  # the smaller view decoded nothing: the full view's cache served it
    assert small.decoded is full.decoded and small.ids is full.ids and small.targets is full.targets


class CountingTransforms:
    """The validation transforms, counting the samples they make."""

    def __init__(self, scale: Any = "synthetic") -> None:
        self.inner = build_transforms(scale, train=False)
        self.calls = 0

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        self.calls += 1
        return self.inner(image, target)


def test_cached_samples_are_transformed_once_and_equal_fresh_ones(tmp_path: Path) -> None:
    paths = write_coco(tmp_path, GOOD)
    plain = CocoDetection(paths, build_transforms("synthetic", train=False))
    transforms = CountingTransforms()
    cached = CocoDetection(paths, transforms, cache_decoded=True, cache_samples=True)
    for _ in range(3):  # three epochs
        for index in range(len(cached)):
            image, target = cached[index]
            expected_image, expected_target = plain[index]
            assert torch.equal(image, expected_image) and target.keys() == expected_target.keys()
            assert all(torch.equal(torch.as_tensor(target[k]), torch.as_tensor(expected_target[k])) for k in target)
    assert transforms.calls == 3  # once per image, not once per epoch
    image, target = cached[0]
    target["added downstream"] = 1  # each read gets a dict of its own
    assert "added downstream" not in cached[0][1]


def test_a_view_and_new_transforms_get_a_sample_cache_of_their_own(tmp_path: Path) -> None:
    paths = write_coco(tmp_path, GOOD)
    full = CocoDetection(paths, CountingTransforms(), cache_decoded=True, cache_samples=True)
    full_image = full[1][0]
    small = full.with_transforms(CountingTransforms(SCALES["synthetic"].scaled(0.5)))
    assert small.samples == {} and full.samples is not None and list(full.samples) == [2]
    assert small[1][0].shape == (3, 80, 106) and full[1][0] is full_image  # neither serves the other's size
    assert list(full.samples) == [2] and small.samples is not None and list(small.samples) == [2]
    assert full.with_transforms(CountingTransforms(), cache_samples=False).samples is None
    replaced = CountingTransforms(SCALES["synthetic"].scaled(0.5))
    full.transforms = replaced  # by hand: perhaps random, so the cache is off, and nothing stale is served
    assert full.samples is None and full[1][0].shape == (3, 80, 106) and full[1][0] is not full[1][0]
    assert replaced.calls == 3
    assert CocoDetection(paths, CountingTransforms()).samples is None  # off by default


def test_filling_the_cache_leaves_torchs_random_stream_alone(tmp_path: Path) -> None:
    """The deterministic resize draws its one-size choice from torch's generator; a resumed run
    fills its caches at other epochs than the run it continues, so the fill must not draw."""
    paths = write_coco(tmp_path, GOOD)
    cached = CocoDetection(paths, build_transforms("synthetic", train=False), cache_samples=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for index in range(len(cached)):
        cached[index]
    assert torch.equal(torch.rand(3), expected)
    plain = CocoDetection(paths, build_transforms("synthetic", train=False))
    torch.manual_seed(0)
    plain[0]
    assert not torch.equal(torch.rand(3), expected)  # uncached, the transform does draw (the reason)


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
    with pytest.raises(BadDataError, match=r"2\.png: image 2 is unreadable .*verify_images"):
        strict[1]
    lenient = CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")
    with pytest.raises(BadDataError, match=r"2\.png: image 2 is unreadable"):
        lenient[1]  # never replaced by another image


def test_verify_images_reports_every_bad_file_at_once(tmp_path: Path) -> None:
    """Issue 11: bad images were found one by one, mid-epoch, and named by id only."""
    paths = write_coco(tmp_path, GOOD)
    (paths.images / "1.png").write_bytes(b"not a png")
    good = (paths.images / "3.png").read_bytes()
    (paths.images / "3.png").write_bytes(good[: len(good) // 2])  # truncated
    strict = CocoDetection(paths, build_transforms("synthetic", train=False))
    with pytest.raises(BadDataError) as caught:
        strict.verify_images()
    message = str(caught.value)
    assert message.startswith(f"2 image file(s) of {paths.images} cannot be used:")
    assert f"{paths.images / '1.png'} (image 1) is unreadable" in message
    assert f"{paths.images / '3.png'} (image 3) is unreadable" in message
    assert "2.png" not in message
    lenient = CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\).*\n.*1\.png.*\n.*3\.png"):
        lenient.verify_images()
    assert lenient.ids == [2] and len(lenient) == 1 and lenient.skipped == {"unreadable images": 2}
    assert lenient[0][1]["image_id"] == 2


def test_an_image_of_another_size_than_its_entry_is_bad(tmp_path: Path) -> None:
    paths = write_coco(tmp_path, GOOD)
    Image.new("RGB", (60, 80)).save(paths.images / "2.png")  # transposed
    dataset = CocoDetection(paths, build_transforms("synthetic", train=False))
    with pytest.raises(BadDataError, match=r"2\.png \(image 2\) is 60x80 pixels but its entry says 80x60"):
        dataset.verify_images()


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


def write_payload(tmp_path: Path, payload: Any) -> Path:
    path = tmp_path / "instances_val2017.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


IMAGE = {"id": 1, "file_name": "1.png", "width": 80, "height": 60}
CATEGORY = {"id": 1, "name": "a"}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{", "not a COCO annotation file .invalid JSON"),
        ({}, "not a COCO annotation file .no 'images' list"),
        ({"images": [], "categories": []}, "no usable categories"),
        ({"images": {}, "categories": [CATEGORY]}, "'images' is a dict, not a list"),
        ({"images": [], "categories": [CATEGORY], "annotations": 3}, "'annotations' is a int, not a list"),
        ({"images": [IMAGE], "categories": [{"name": "a"}]}, r"categories\[0\]: field 'id' is None"),
        ({"images": [IMAGE], "categories": [{"id": 10**9}]}, r"field 'id' is 1000000000; expected an integer in"),
        ({"images": [IMAGE], "categories": [CATEGORY, CATEGORY]}, "category id 1 appears more than once"),
        ({"images": [{**IMAGE, "width": 0}], "categories": [CATEGORY]}, r"image 1 \(1.png\): field 'width' is 0"),
        # found by the fuzz test: 2**64 passed and overflowed int64 in the boxes' checks
        ({"images": [{**IMAGE, "width": 2.0**64}], "categories": [CATEGORY]}, r"'width' is 1.8\d*e\+19; .*at most"),
        ({"images": [{**IMAGE, "height": "60"}], "categories": [CATEGORY]}, "field 'height' is '60'"),
        ({"images": [{**IMAGE, "file_name": None}], "categories": [CATEGORY]}, "field 'file_name' is None"),
        ({"images": [IMAGE, IMAGE], "categories": [CATEGORY]}, "image id 1 appears more than once"),
        ({"images": ["1.png"], "categories": [CATEGORY]}, r"images\[0\] is a str, not an object"),
    ],
)
def test_malformed_files_and_entries_name_the_file_and_field(tmp_path: Path, payload: Any, message: str) -> None:
    """Issue 11: ``{}`` or empty categories gave ``max() arg is an empty sequence``."""
    path = write_payload(tmp_path, payload)
    with pytest.raises(BadDataError, match=rf"instances_val2017\.json.*{message}"):
        load_coco(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bbox": [10, 10, float("nan"), 5]}, r"field 'bbox' is \[10, 10, nan, 5\]; expected 4 finite numbers"),
        ({"bbox": [10, 10, float("inf"), 5]}, "field 'bbox' is .*inf"),
        ({"bbox": "10 10 5 5"}, "field 'bbox' is '10 10 5 5'"),
        ({"bbox": [10, 10, 5]}, r"field 'bbox' is \[10, 10, 5\]"),
        ({"bbox": [10, 10, True, 5]}, "field 'bbox' is"),
        ({"bbox": None}, "field 'bbox' is None"),
        ({"area": float("nan")}, "field 'area' is nan"),
        ({"area": -1}, "field 'area' is -1"),
        ({"iscrowd": 2}, "field 'iscrowd' is 2; expected 0 or 1"),
        ({"image_id": "1"}, "refers to image_id '1'"),
        ({"category_id": 1.0}, "has category_id 1.0"),
    ],
)
def test_every_annotation_field_is_checked(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    """Issue 11: a NaN bbox width became a full-width box; a string bbox a raw TypeError."""
    paths = write_coco(tmp_path, [*GOOD, {**ann(9, 1, [1, 1, 5, 5]), **change}])
    with pytest.raises(BadDataError, match=rf"instances_train2017\.json: annotation 9 .*{message}.*skip_bad_data"):
        CocoDetection(paths, build_transforms("synthetic", train=False))
    with pytest.warns(UserWarning, match="skipped 1 "):
        dataset = CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")
    assert sum(dataset.skipped.values()) == 1 and len(dataset) == 3
    assert 9 not in dataset.coco.anns  # left out of the ground truth for evaluation too
    assert dataset.targets[1][0].tolist() == [[5.0, 5.0, 25.0, 15.0]]


def test_missing_bbox_and_missing_id(tmp_path: Path) -> None:
    no_bbox = {"id": 9, "image_id": 1, "category_id": 1}
    paths = write_coco(tmp_path / "a", [*GOOD, no_bbox])
    with pytest.raises(BadDataError, match=r"annotation 9 \(image 1\): field 'bbox' is missing"):
        CocoDetection(paths, build_transforms("synthetic", train=False))
    paths = write_coco(tmp_path / "b", [*GOOD, {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(BadDataError, match=r"annotations\[3\]: field 'id' is None; expected an integer"):
        CocoDetection(paths, build_transforms("synthetic", train=False))
    with pytest.warns(UserWarning, match="skipped 1 annotations with bad fields"):
        CocoDetection(paths, build_transforms("synthetic", train=False), on_bad_data="skip")


def test_missing_area_and_iscrowd_get_coco_defaults(tmp_path: Path) -> None:
    path = write_payload(
        tmp_path,
        {
            "images": [IMAGE],
            "categories": [CATEGORY],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}],
        },
    )
    coco = load_coco(path)
    assert coco.anns[1]["area"] == 12.0 and coco.anns[1]["iscrowd"] == 0
