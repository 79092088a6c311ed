"""Issue 11: any mutation of an annotation file or of a recording's metadata gives the project's
own error type (naming the file) or a valid result - never a raw Python exception."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdetr import BadDataError, RecordingError, build_model, load_coco, load_recording, record
from sdetr.data import CocoDetection, CocoPaths

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Any JSON value, with the numbers that break naive code (NaN, inf, huge ints, negatives, bools).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 10**400, 1e308, -0.0])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=4),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)


def places(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON document, depth first."""
    found: list[tuple[Any, Any]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        found.append((node, key))
        found += places(child)
    return found


def mutate(document: Any, data: st.DataObject) -> Any:
    """1-3 random deletions, replacements or insertions anywhere in a copy of ``document``."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3))):
        spots = places(document)
        if not spots or data.draw(st.integers(0, 20)) == 0:
            return data.draw(JSON_VALUES)  # the whole document replaced
        container, key = data.draw(st.sampled_from(spots))
        action = data.draw(st.sampled_from(["delete", "replace", "insert"]))
        if action == "delete":
            del container[key]
        elif action == "replace":
            container[key] = data.draw(JSON_VALUES)
        elif isinstance(container, dict):
            container[data.draw(st.sampled_from(["id", "bbox", "area", "iscrowd", "extra", "width"]))] = data.draw(
                JSON_VALUES
            )
        else:
            container.insert(key, data.draw(JSON_VALUES))
    return document


COCO = {
    "images": [
        {"id": 1, "file_name": "1.png", "width": 80, "height": 60},
        {"id": 2, "file_name": "2.png", "width": 80, "height": 60},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10], "area": 200.0, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [70, 50, 30, 30], "area": 100.0, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64.0, "iscrowd": 1},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "train2017").mkdir()
    for i in (1, 2):
        Image.new("RGB", (80, 60), (60 * i, 0, 0)).save(root / "train2017" / f"{i}.png")
    return root


def test_the_unmutated_file_is_valid(coco_root: Path) -> None:
    (coco_root / "annotations" / "instances_train2017.json").write_text(json.dumps(COCO))
    dataset = CocoDetection(CocoPaths(coco_root, "train"), None)
    assert dataset.ids == [1, 2] and dataset.targets[2][0].tolist() == [[70.0, 50.0, 80.0, 60.0]]


@FUZZ
@given(data=st.data())
def test_any_mutation_of_an_annotation_file_is_a_bad_data_error_or_valid(coco_root: Path, data: st.DataObject) -> None:
    document = mutate(COCO, data)
    path = coco_root / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps(document))
    for on_bad in ("error", "skip"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the "skipped ..." summary
                dataset = CocoDetection(CocoPaths(coco_root, "train"), None, on_bad_data=on_bad)
        except BadDataError as error:
            assert str(path) in str(error)
            continue
        # a valid result: every kept image has a target of finite boxes inside its image, known labels
        for image_id in dataset.ids:
            boxes, labels = dataset.targets[image_id]
            info = dataset.coco.imgs[image_id]
            assert torch.isfinite(boxes).all() and (boxes >= 0).all()
            assert (boxes[:, 2] <= info["width"]).all() and (boxes[:, 3] <= info["height"]).all()
            assert set(labels.tolist()) <= set(dataset.coco.cats)
        for ann in dataset.coco.dataset["annotations"]:
            assert ann["image_id"] in dataset.coco.imgs and ann["category_id"] in dataset.coco.cats


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_as_an_annotation_file_are_a_bad_data_error_or_valid(coco_root: Path, raw: bytes) -> None:
    path = coco_root / "annotations" / "fuzz.json"
    path.write_bytes(raw)
    try:
        load_coco(path)
    except BadDataError as error:
        assert str(path) in str(error)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any], bytes]:
    """A small recording file, its header, its parsed metadata and its data bytes."""
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=2).eval()
    with (
        torch.no_grad(),
        record(model, sites=["stage2.encoder.0.self_attn", "stage1.decoder.0.cross_attn"], decoder_queries=[1]) as rec,
    ):
        model(torch.zeros(1, 3, 64, 64))
    path = rec.save(tmp_path_factory.mktemp("rec") / "rec.safetensors")
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return path, header, json.loads(header["__metadata__"]["sdetr_recording"]), data[8 + length :]


@FUZZ
@given(data=st.data())
def test_any_mutation_of_recording_metadata_is_a_recording_error_or_valid(
    recording: tuple[Path, dict[str, Any], dict[str, Any], bytes], data: st.DataObject
) -> None:
    path, header, metadata, body = recording
    mutated = mutate(metadata, data)
    header = {**header, "__metadata__": {"sdetr_recording": json.dumps(mutated)}}
    raw = json.dumps(header).encode()
    target = path.parent / "fuzz.safetensors"
    target.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    try:
        rec = load_recording(target)
        for site in rec:
            grids = rec[site]
            assert grids.site == site
            for name in rec.entries[site].tensors:
                assert isinstance(rec.load(site, name), torch.Tensor)
    except RecordingError as error:
        assert str(target) in str(error)
