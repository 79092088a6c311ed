"""``detect`` / ``evaluate``: every decoder output converted once, scored by COCOeval."""

from __future__ import annotations

import pytest
import torch

from analysis.evaluation import decoder_outputs, detect, evaluate
from sdetr import (
    STAT_NAMES,
    CocoDetection,
    CocoPaths,
    SyntheticSpec,
    build_model,
    build_transforms,
    coco_stats,
    generate_synthetic_coco,
    postprocess,
    to_coco_results,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    spec = SyntheticSpec(height=64, width=96, num_train=2, num_val=3, min_side=8)
    root = generate_synthetic_coco(spec, cache_dir=tmp_path_factory.mktemp("cache"))
    return CocoDetection(CocoPaths(root, "val"), build_transforms("synthetic", False))


def test_all_decoder_outputs_in_order(dataset: CocoDetection) -> None:
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", num_classes=5).eval()
    images = [dataset[i][0] for i in range(2)]
    targets = [dataset[i][1] for i in range(2)]
    with torch.no_grad():
        out = model(images)
    outputs = decoder_outputs(out)
    assert len(outputs) == 4  # sdetr-tiny: 2 decoder layers per stage, 2 stages
    assert outputs[-1]["pred_logits"] is out["pred_logits"] and outputs[0] is out["aux_outputs"][0]

    found = detect(model, dataset, batch_size=2, outputs=range(4), limit=2, progress=False)
    assert sorted(found.results) == [0, 1, 2, 3] and found.image_ids == [int(t["image_id"]) for t in targets]
    sizes = torch.stack([t["orig_size"] for t in targets])
    ids = [int(t["image_id"]) for t in targets]
    for index in range(4):  # each output converted exactly as the trainer converts the final one
        assert found.results[index] == to_coco_results(postprocess(outputs[index], sizes), ids)


def test_evaluate_is_coco_stats_of_the_final_output(dataset: CocoDetection) -> None:
    torch.manual_seed(1)
    model = build_model("sdetr-tiny", num_classes=5).eval()
    stats = evaluate(model, dataset, batch_size=2, progress=False)
    found = detect(model, dataset, batch_size=2, progress=False)
    expected = coco_stats(dataset.coco, found.results[3], found.image_ids)
    assert list(stats) == list(STAT_NAMES) and list(stats.values()) == expected


def test_detect_needs_targets() -> None:
    model = build_model("sdetr-tiny", num_classes=5).eval()
    with pytest.raises(ValueError, match="needs targets"):
        detect(model, [torch.zeros(3, 32, 32)], progress=False)
