"""AP by size bin, class and decoder output: slices of COCOeval's arrays, equal to ``summarize()``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings

from analysis.breakdowns import (
    NO_GT_NOTE,
    class_breakdown,
    decoder_layout,
    size_breakdown,
    stage_breakdown,
)
from sdetr import STAT_NAMES, TrainConfig, Trainer, get_config
from tests.analysis.coco_cases import det, make_coco, mixed_scene, scenes, summarize

#: size_breakdown (row, column) -> index into COCOeval.summarize()'s stats.
STANDARD = {
    ("all", "AP"): 0,
    ("all", "AP50"): 1,
    ("all", "AP75"): 2,
    ("small", "AP"): 3,
    ("medium", "AP"): 4,
    ("large", "AP"): 5,
    ("all", "AR100"): 8,
    ("small", "AR100"): 9,
    ("medium", "AR100"): 10,
    ("large", "AR100"): 11,
}


def assert_equals_summarize(frame: pd.DataFrame, stats: np.ndarray | list[float]) -> None:
    rows = frame.set_index("bin")
    for (row, column), index in STANDARD.items():
        value = rows.loc[row, column]
        expected = stats[index]
        if expected == -1:  # summarize's "no ground truth" is NaN here
            assert math.isnan(value), (row, column)
        else:
            assert value == expected, (row, column, value, expected)  # exactly, not approximately


def test_standard_ranges_equal_summarize_on_a_hand_made_scene() -> None:
    coco, detections = mixed_scene()
    frame = size_breakdown(coco, detections)
    stats = summarize(coco, detections)
    assert 0 < stats[0] < 1 and 0 < stats[3] < 1 and 0 < stats[4] < 1 and 0 < stats[5] < 1  # a real mix
    assert_equals_summarize(frame, stats)
    assert list(frame["bin"]) == [
        "0-16",
        "16-32",
        "32-64",
        "64-96",
        "96-128",
        "128-inf",
        "small",
        "medium",
        "large",
        "all",
    ]
    assert list(frame["kind"]) == ["bin"] * 6 + ["coco"] * 4
    assert frame.set_index("bin").loc["all", "n_gt"] == 10


def test_bins_by_hand() -> None:
    """gt sides 10 (0-16), 20 (16-32), 50 (32-64); the 10 and the 50 found exactly (score 0.9), the 20
    missed, one 20x20 background box at 0.8. Out-of-range gt and unmatched out-of-range detections are
    ignored, so each bin sees only its own objects."""
    coco = make_coco([(1, 1, (10, 10, 10, 10)), (1, 1, (50, 10, 20, 20)), (1, 1, (100, 100, 50, 50))])
    detections = [det(1, (10, 10, 10, 10), 0.9), det(1, (100, 100, 50, 50), 0.9), det(1, (10, 150, 20, 20), 0.8)]
    rows = size_breakdown(coco, detections).set_index("bin")
    expected = {  # bin: (n_gt, AP = AP50 = AP75, AR100)
        "0-16": (1, 1.0, 1.0),
        "16-32": (1, 0.0, 0.0),  # only the background box is in range: a false positive, nothing found
        "32-64": (1, 1.0, 1.0),
        "small": (2, 51 / 101, 0.5),  # precision 1 up to recall 0.5: recall points 0.00 .. 0.50
        "medium": (1, 1.0, 1.0),
        "all": (3, 67 / 101, 2 / 3),  # precision 1 up to recall 2/3: recall points 0.00 .. 0.66
    }
    for name, (n_gt, ap, ar) in expected.items():
        row = rows.loc[name]
        assert row["n_gt"] == n_gt and row["note"] == ""
        assert row["AP"] == pytest.approx(ap) and row["AP50"] == pytest.approx(ap) and row["AP75"] == pytest.approx(ap)
        assert row["AR100"] == pytest.approx(ar)
    for name in ("64-96", "96-128", "128-inf", "large"):  # no ground truth: NaN, not -1, with a note
        row = rows.loc[name]
        assert row["n_gt"] == 0 and row["note"] == NO_GT_NOTE
        assert all(math.isnan(row[c]) for c in ("AP", "AP50", "AP75", "AR100"))
    assert rows.loc["16-32", "lo"] == 16 and rows.loc["16-32", "hi"] == 32 and math.isinf(rows.loc["128-inf", "hi"])
    assert rows.loc["medium", "lo"] == 32 and rows.loc["medium", "hi"] == 96


def test_custom_bins_and_no_detections() -> None:
    coco = make_coco([(1, 1, (10, 10, 10, 10)), (1, 2, (50, 50, 60, 60))])
    rows = size_breakdown(coco, [], bins=(0, 20, math.inf)).set_index("bin")
    assert list(rows.index[:2]) == ["0-20", "20-inf"]
    assert rows.loc["0-20", "AP"] == 0.0 and rows.loc["all", "AR100"] == 0.0  # nothing found scores 0
    assert math.isnan(rows.loc["large", "AP"])


def test_inputs_from_files_and_bad_input(tmp_path: Path) -> None:
    coco, detections = mixed_scene()
    annotations, results = tmp_path / "gt.json", tmp_path / "detections.json"
    annotations.write_text(json.dumps(coco.dataset))
    results.write_text(json.dumps(detections))
    from_files = size_breakdown(annotations, results)
    pd.testing.assert_frame_equal(from_files, size_breakdown(coco, detections))
    assert "area" not in detections[0]  # the caller's dicts are not written into (loadRes would)
    with pytest.raises(ValueError, match="bins"):
        size_breakdown(coco, detections, bins=(0, 32, 16))
    with pytest.raises(ValueError, match="image_id 7"):
        size_breakdown(coco, [det(1, (0, 0, 5, 5), 0.5, image=7)])
    with pytest.raises(ValueError, match="lacks"):
        size_breakdown(coco, [{"image_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        size_breakdown(coco, tmp_path / "missing.json")
    with pytest.raises(TypeError, match="gt must be"):
        size_breakdown(42, detections)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_standard_ranges_equal_summarize_on_random_scenes(scene: tuple[Any, list[dict[str, Any]]]) -> None:
    coco, detections = scene
    assume(detections and coco.anns)  # loadRes needs detections; summarize has no AP without ground truth
    frame = size_breakdown(coco, detections)
    assert_equals_summarize(frame, summarize(coco, detections))
    rows = frame.set_index("bin")
    n_small = sum(1 for a in coco.anns.values() if a["area"] <= 32**2)
    assert rows.loc["small", "n_gt"] == n_small and rows.loc["all", "n_gt"] == len(coco.anns)


def test_class_breakdown_by_hand() -> None:
    """Class 1: a 10x10 and a 50x50, both found exactly. Class 2: a 40x40 found at IoU 2/3 (a hit at
    IoU 0.50, 0.55, 0.60, 0.65: AP 4/10). Class 3: no ground truth."""
    coco = make_coco(
        [(1, 1, (10, 10, 10, 10)), (1, 1, (100, 100, 50, 50)), (1, 2, (10, 100, 40, 40))], categories=(3, 1, 2)
    )
    detections = [det(1, (10, 10, 10, 10), 0.9), det(1, (100, 100, 50, 50), 0.9), det(2, (18, 100, 40, 40), 0.7)]
    frame = class_breakdown(coco, detections)
    assert list(frame["category_id"]) == [1, 2, 3] and list(frame["category"]) == ["class1", "class2", "class3"]
    assert list(frame["n_gt"]) == [2, 1, 0]
    rows = frame.set_index("category_id")
    assert rows.loc[1, "AP"] == pytest.approx(1.0) and rows.loc[1, "APs"] == pytest.approx(1.0)
    assert rows.loc[1, "APm"] == pytest.approx(1.0) and math.isnan(rows.loc[1, "APl"])
    assert rows.loc[2, "AP"] == pytest.approx(0.4) and rows.loc[2, "AP50"] == pytest.approx(1.0)
    assert rows.loc[2, "AP75"] == pytest.approx(0.0) and math.isnan(rows.loc[2, "APs"])
    assert rows.loc[2, "APm"] == pytest.approx(0.4)
    assert rows.loc[3, ["AP", "AP50", "AP75", "APs", "APm", "APl"]].isna().all()
    stats = summarize(coco, detections)
    assert stats[0] == pytest.approx(0.7) and frame["AP"].mean() == pytest.approx(stats[0])  # mean over classes

    small = class_breakdown(coco, detections, area="small").set_index("category_id")
    assert small.loc[1, "n_gt"] == 1 and small.loc[1, "AP"] == pytest.approx(1.0) and math.isnan(small.loc[2, "AP"])
    with pytest.raises(ValueError, match="area must be"):
        class_breakdown(coco, detections, area="tiny")


def test_class_means_are_the_overall_ap_on_the_mixed_scene() -> None:
    coco, detections = mixed_scene()
    frame = class_breakdown(coco, detections)
    stats = summarize(coco, detections)
    for column, index in (("AP", 0), ("AP50", 1), ("AP75", 2), ("APs", 3), ("APm", 4), ("APl", 5)):
        assert frame[column].mean() == pytest.approx(stats[index]), column  # NaN classes skipped


def test_decoder_layout_of_detr_and_sdetr() -> None:
    assert decoder_layout(get_config("detr")) == [(1, layer) for layer in range(6)]
    assert decoder_layout(get_config("sdetr")) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


@dataclass
class TrainerRun:
    trainer: Trainer
    stats: list[float]
    detections: Path


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerRun]:
    """A random-weight sdetr-tiny evaluated by the trainer on a 4-image synthetic validation split."""
    root = tmp_path_factory.mktemp("trainer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDETR_CACHE", str(root / "cache"))
        config = TrainConfig(
            synthetic_train=2,
            synthetic_val=4,
            epochs=1,
            low_res_epochs=0,
            batch_size=2,
            output_dir=str(root / "out"),
            device="cpu",
        )
        trainer = Trainer.from_config(config)
        stats, _ = trainer.evaluate(save_detections=root / "detections_val.json")
        yield TrainerRun(trainer, stats, root / "detections_val.json")


def test_size_breakdown_of_the_trainers_detections_file(trainer_run: TrainerRun) -> None:
    annotations = trainer_run.trainer.data.val.paths.annotations
    frame = size_breakdown(annotations, trainer_run.detections)
    assert_equals_summarize(frame, trainer_run.stats)
    detections = json.loads(trainer_run.detections.read_text())
    assert_equals_summarize(frame, summarize(trainer_run.trainer.data.val.coco, detections))
    assert frame.set_index("bin").loc["all", "n_gt"] == len(trainer_run.trainer.data.val.coco.anns)


def test_stage_breakdown_final_output_is_the_trainers_evaluation(trainer_run: TrainerRun) -> None:
    trainer = trainer_run.trainer
    frame = stage_breakdown(trainer.model, trainer.data.val, batch_size=trainer.config.batch_size, progress=False)
    layout = frame.drop_duplicates("output")
    assert list(layout["output"]) == [0, 1, 2, 3]
    assert list(zip(layout["stage"], layout["layer"], strict=True)) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert list(layout["site"]) == ["stage1.decoder.0", "stage1.decoder.1", "stage2.decoder.0", "stage2.decoder.1"]
    assert list(layout["is_final"]) == [False, False, False, True]
    final = frame[frame["is_final"]].drop(columns=["output", "stage", "layer", "site", "is_final"])
    assert final.set_index("bin").loc["all", "AP"] == trainer_run.stats[STAT_NAMES.index("AP")]
    assert_equals_summarize(final, trainer_run.stats)
    # every column of the final output equals the breakdown of the trainer's own detections file
    from_file = size_breakdown(trainer.data.val.coco, trainer_run.detections)
    pd.testing.assert_frame_equal(final.reset_index(drop=True), from_file)
    with pytest.raises(TypeError, match="CocoDetection"):
        stage_breakdown(trainer.model, [trainer.data.val[0][0]], progress=False)  # type: ignore[arg-type]
