"""TIDE-style error breakdown: one hand-made case per error type, area restriction, invariants."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings

from analysis.breakdowns import size_breakdown
from analysis.error_breakdown import ERROR_TYPES, SPECIAL_TYPES, classify_errors, error_breakdown
from tests.analysis.coco_cases import det, make_coco, mixed_scene, scenes, summarize

A = (10, 10, 40, 40)  # a 40x40 object
B = (120, 120, 40, 40)  # another, far from A
SHIFTED = (30, 10, 40, 40)  # A moved right by 20: IoU 1/3 with A
NEAR = (14, 10, 40, 40)  # A moved right by 4: IoU 36/44 with A


def dupe_ap() -> float:
    """TP 0.9, FP 0.8, TP 0.7 over 2 objects: precision 1 up to recall 0.5, then 2/3."""
    return (51 + 50 * 2 / 3) / 101


# error type -> (ground truth, detections, AP50 before, AP50 after fixing that type), all by hand
CASES: dict[str, tuple[list[tuple[int, int, tuple[int, ...]]], list[dict[str, Any]], float, float]] = {
    # class-2 box exactly on the class-1 object (0.9), a class-2 hit elsewhere (0.5): class 1 AP 0, class 2 AP
    # 0.5; relabelled, both classes are perfect
    "cls": ([(1, 1, A), (1, 2, B)], [det(2, A, 0.9), det(2, B, 0.5)], 0.25, 1.0),
    # the only detection at IoU 1/3 with its object: snapped onto it, AP 1
    "loc": ([(1, 1, A)], [det(1, SHIFTED, 0.9)], 0.0, 1.0),
    # a class-2 box at IoU 1/3 with the class-1 object, above the class-2 hit: class 2 AP 0.5
    "both": ([(1, 1, A), (1, 2, B)], [det(1, A, 0.5), det(2, B, 0.5), det(2, SHIFTED, 0.9)], 0.75, 1.0),
    # a second box on an object already found (IoU 9/11), scored between two hits
    "dupe": ([(1, 1, A), (1, 1, B)], [det(1, A, 0.9), det(1, NEAR, 0.8), det(1, B, 0.7)], dupe_ap(), 1.0),
    # a box on nothing above the hit: AP 0.5
    "bkg": ([(1, 1, A)], [det(1, (100, 100, 30, 30), 0.9), det(1, A, 0.5)], 0.5, 1.0),
    # one of two objects never detected: precision 1 up to recall 0.5
    "missed": ([(1, 1, A), (1, 1, B)], [det(1, A, 0.9)], 51 / 101, 1.0),
}


@pytest.mark.parametrize("error", list(CASES))
def test_each_error_type_is_counted_where_it_belongs(error: str) -> None:
    objects, detections, before, after = CASES[error]
    frame = error_breakdown(make_coco(objects), detections).set_index("error")
    assert frame.loc["base", "AP"] == pytest.approx(before)
    for other in ERROR_TYPES:
        expected = 1 if other == error else 0
        assert frame.loc[other, "count"] == expected, (other, frame["count"].to_dict())
        if other != error:
            assert frame.loc[other, "dAP"] == 0.0 and frame.loc[other, "AP"] == frame.loc["base", "AP"]
    assert frame.loc[error, "dAP"] > 0
    assert frame.loc[error, "AP"] == pytest.approx(after)
    assert frame.loc[error, "dAP"] == pytest.approx(after - before)


def test_instances_name_their_ground_truth() -> None:
    objects, detections, _, _ = CASES["cls"]
    rows = classify_errors(make_coco(objects), detections)
    assert rows[["error", "detection", "gt_id", "fixes"]].to_dict("records") == [
        {"error": "cls", "detection": 0, "gt_id": 1, "fixes": True}
    ]
    assert rows.loc[0, "max_iou"] == pytest.approx(1.0)
    objects, detections, _, _ = CASES["missed"]
    rows = classify_errors(make_coco(objects), detections)
    assert rows[["error", "detection", "gt_id"]].to_dict("records") == [
        {"error": "missed", "detection": -1, "gt_id": 2}
    ]


def test_only_the_best_of_two_loc_errors_on_one_object_is_fixed() -> None:
    """TIDE fixes one error per ground truth (the highest score); the other is removed."""
    coco = make_coco([(1, 1, A)])
    detections = [det(1, SHIFTED, 0.9), det(1, (10, 30, 40, 40), 0.6)]  # both IoU 1/3
    rows = classify_errors(coco, detections)
    assert list(rows["error"]) == ["loc", "loc"] and list(rows["fixes"]) == [True, False]
    frame = error_breakdown(coco, detections).set_index("error")
    assert frame.loc["loc", "count"] == 2 and frame.loc["loc", "AP"] == pytest.approx(1.0)
    assert frame.loc["missed", "count"] == 0  # an object a loc error points at is not missed


def test_small_objects_only() -> None:
    """A 10x10 object found at 0.5, a 50x50 (medium) found at 0.8, a 20x20 box on the medium object
    at 0.9 (IoU 0.16: loc) and a 40x40 box on nothing at 0.95 (bkg).

    all:   FP .95, FP .9, TP .8, TP .5 -> AP 1/2; without the loc box (the medium object is taken) or
           without the bkg box, 2/3.
    small: the medium object and its hit are ignored, the 40x40 background box is outside the range
           (ignored); FP .9, TP .5 -> AP 1/2; the loc box snapped onto the medium object is ignored -> 1.
    """
    coco = make_coco([(1, 1, (150, 150, 10, 10)), (1, 1, (20, 20, 50, 50))])
    detections = [
        det(1, (150, 150, 10, 10), 0.5),
        det(1, (20, 20, 50, 50), 0.8),
        det(1, (30, 30, 20, 20), 0.9),
        det(1, (150, 20, 40, 40), 0.95),
    ]
    frame = error_breakdown(coco, detections, area=("all", "small"))
    assert list(frame["area"]) == ["all"] * 9 + ["small"] * 9
    overall = frame[frame["area"] == "all"].set_index("error")
    small = frame[frame["area"] == "small"].set_index("error")
    assert overall.loc["base", "AP"] == pytest.approx(0.5) and small.loc["base", "AP"] == pytest.approx(0.5)
    assert overall.loc["loc", "count"] == 1 and overall.loc["bkg", "count"] == 1
    assert overall.loc["loc", "dAP"] == pytest.approx(1 / 6) and overall.loc["bkg", "dAP"] == pytest.approx(1 / 6)
    assert small.loc["loc", "count"] == 1 and small.loc["bkg", "count"] == 0
    assert small.loc["loc", "dAP"] == pytest.approx(0.5) and small.loc["bkg", "dAP"] == 0.0
    assert small.loc["base", "count"] == 2  # detections scored in the small range: the hit and the loc box
    assert small.loc["base", "AP"] == size_breakdown(coco, detections).set_index("bin").loc["small", "AP50"]


def test_base_ap_is_cocoevals_ap50_and_columns() -> None:
    coco, detections = mixed_scene()
    frame = error_breakdown(coco, detections, area=["all", "small"])
    assert list(frame.columns) == ["area", "error", "kind", "AP", "dAP", "count"]
    assert list(frame["error"][:9]) == ["base", *ERROR_TYPES, *SPECIAL_TYPES]
    assert frame.set_index(["area", "error"]).loc[("all", "base"), "AP"] == summarize(coco, detections)[1]
    counts = frame[frame["area"] == "all"].set_index("error")["count"]
    assert counts[["cls", "loc", "both", "dupe", "bkg"]].sum() == counts["false_pos"] > 0
    with pytest.raises(ValueError, match="area must be"):
        error_breakdown(coco, detections, area="tiny")
    with pytest.raises(ValueError, match="background_iou"):
        error_breakdown(coco, detections, iou=0.5, background_iou=0.6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_invariants_on_random_scenes(scene: tuple[Any, list[dict[str, Any]]]) -> None:
    coco, detections = scene
    assume(detections and coco.anns)  # loadRes needs detections; summarize has no AP without ground truth
    frame = error_breakdown(coco, detections)
    rows = frame.set_index("error")
    base = rows.loc["base"]
    assert base["AP"] == summarize(coco, detections)[1]
    # every false positive has exactly one type; missed objects are a subset of the unmatched ones
    assert rows.loc[["cls", "loc", "both", "dupe", "bkg"], "count"].sum() == rows.loc["false_pos", "count"]
    assert rows.loc["missed", "count"] <= rows.loc["false_neg", "count"]
    assert base["count"] - rows.loc["false_pos", "count"] == len(coco.anns) - rows.loc["false_neg", "count"]  # TPs
    # dAP >= 0; NaN only where removing unmatched objects leaves no ground truth in any class
    assert (frame["dAP"].dropna() >= 0).all()
    assert set(frame.loc[frame["dAP"].isna(), "error"]) <= {"missed", "false_neg"}
    # removing more false positives (or more unmatched objects) never lowers AP
    for subset in ("both", "dupe", "bkg"):
        assert rows.loc["false_pos", "AP"] >= rows.loc[subset, "AP"] - 1e-12
    if not pd.isna(rows.loc["false_neg", "AP"]):
        assert rows.loc["false_neg", "AP"] >= rows.loc["missed", "AP"] - 1e-12
    instances = classify_errors(coco, detections)
    assert isinstance(instances, pd.DataFrame)
    assert instances["error"].value_counts().to_dict() == {
        e: int(rows.loc[e, "count"]) for e in ERROR_TYPES if rows.loc[e, "count"] > 0
    }
