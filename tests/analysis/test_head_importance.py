"""Gate-gradient importance, head ablation and pruning curves (``analysis.head_importance``).

The model is a random-weight ``sdetr-tiny-multihead`` (4 heads in the stage-2 encoder). Its AP
on real labels would be 0 everywhere, which makes AP comparisons vacuous; so the ground truth
here is the model's own top-3 detections per image ("self-labelled"): the unablated model scores
a clearly non-zero AP, and removing heads changes it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from analysis.batches import iter_batches
from analysis.evaluation import detect, evaluate
from analysis.head_importance import (
    ablation_table,
    ablations,
    head_importance,
    normalise_per_site,
    plot_ablation,
    plot_pruning_curve,
    pruning_curve,
    removal_order,
)
from sdetr import (
    CocoDetection,
    CocoPaths,
    Detector,
    SetCriterion,
    SyntheticSpec,
    build_model,
    gate_heads,
    generate_synthetic_coco,
    normalize_image,
    sites,
)

SITE = "stage2.encoder.0.self_attn"


def native(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Test transforms: no resizing (64x96 stays 64x96); normalised; boxes cxcywh in [0, 1]."""
    height, width = image.shape[-2:]
    boxes = target["boxes"].as_subclass(Tensor)  # [N, 4] xyxy pixels
    cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=-1)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    pixels = normalize_image(image.as_subclass(Tensor).float() / 255)
    return pixels, dict(target, boxes=cxcywh / scale, size=torch.tensor([height, width]))


def self_labelled(model: Detector, folder: Path, per_image: int = 3) -> CocoDetection:
    """A 4-image 64x96 synthetic val split whose annotations are ``model``'s top detections."""
    spec = SyntheticSpec(height=64, width=96, num_train=1, num_val=4, min_side=8)
    root = generate_synthetic_coco(spec, cache_dir=folder / "cache")
    plain = CocoDetection(CocoPaths(root, "val"), native)
    results = next(iter(detect(model, plain, batch_size=2, progress=False).results.values()))
    gt = json.loads(plain.paths.annotations.read_text())
    annotations: list[dict[str, Any]] = []
    for image in gt["images"]:
        best = sorted((r for r in results if r["image_id"] == image["id"]), key=lambda r: -r["score"])[:per_image]
        for r in best:
            x, y, w, h = r["bbox"]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], "category_id": r["category_id"],
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
    gt["annotations"] = annotations
    gt["categories"] = [{"id": c, "name": f"class {c}"} for c in range(model.config.num_classes)]
    labelled = folder / "self_labelled"
    (labelled / "annotations").mkdir(parents=True)
    (labelled / "val2017").symlink_to(plain.paths.images)
    (labelled / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    return CocoDetection(CocoPaths(labelled, "val"), native)


@pytest.fixture(scope="module")
def model() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny-multihead", num_classes=5).eval()


@pytest.fixture(scope="module")
def dataset(model: Detector, tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    return self_labelled(model, tmp_path_factory.mktemp("data"))


def zeroed(model: Detector, removed: list[tuple[str, int]]) -> Detector:
    """A copy of ``model`` with the ``out_proj`` input slice of each ``(site, head)`` set to 0 by hand."""
    copied = copy.deepcopy(model)
    modules = copied.attention_sites()
    with torch.no_grad():
        for site, head in removed:
            d = modules[site].head_dim
            modules[site].out_proj.weight[:, head * d : (head + 1) * d] = 0
    return copied


# --- (a) ablation ------------------------------------------------------------------------------


def test_each_ablation_gate_equals_zeroing_the_out_proj_slice(model: Detector, dataset: CocoDetection) -> None:
    images = [dataset[i][0] for i in range(2)]
    chosen = ablations(model, "stage2.encoder.*")
    assert [(a["site"], a["head"], a["ablated"]) for a in chosen[:2]] == [("none", -1, "none"), (SITE, 0, "head")]
    assert [a["ablated"] for a in chosen].count("site") == 2 and len(chosen) == 1 + 8 + 2
    with torch.no_grad():
        plain = model(images)["pred_boxes"]
        for ablation in [*chosen[1:5], chosen[-1]]:  # the heads of the first site; the whole second site
            removed = [(s, h) for s, gate in ablation["gates"].items() for h, g in enumerate(gate) if g == 0]
            expected = [(ablation["site"], ablation["head"])] if ablation["ablated"] == "head" else []
            assert removed == expected or (ablation["ablated"] == "site" and len(removed) == 4)
            with gate_heads(model, ablation["gates"]):
                gated = model(images)
            by_hand = zeroed(model, removed)(images)
            torch.testing.assert_close(gated["pred_logits"], by_hand["pred_logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(gated["pred_boxes"], by_hand["pred_boxes"], atol=1e-5, rtol=0)
            assert not torch.allclose(gated["pred_boxes"], plain, atol=1e-5)


def test_ablation_table_ap_equals_the_by_hand_model(model: Detector, dataset: CocoDetection) -> None:
    table = ablation_table(model, dataset, sites=SITE, batch_size=2, progress=False)
    assert list(table.columns) == [
        "site", "head", "ablated", "AP", "AP50", "APs", "APm", "APl", "dAP", "dAP50", "dAPs"
    ]  # fmt: skip
    assert list(zip(table["site"], table["head"], table["ablated"], strict=True)) == [
        ("none", -1, "none"), *[(SITE, h, "head") for h in range(4)], (SITE, -1, "site")
    ]  # fmt: skip
    baseline = evaluate(model, dataset, progress=False)
    assert table["AP"].iloc[0] == pytest.approx(baseline["AP"], abs=1e-9) and baseline["AP"] > 0.2
    for head, row in [(1, 2), (None, 5)]:
        removed = [(SITE, head)] if head is not None else [(SITE, h) for h in range(4)]
        by_hand = evaluate(zeroed(model, removed), dataset, progress=False)
        assert table["AP"].iloc[row] == pytest.approx(by_hand["AP"], abs=1e-9)
        assert table["APm"].iloc[row] == pytest.approx(by_hand["APm"], abs=1e-9)
    np.testing.assert_allclose(table["dAP"], table["AP"] - baseline["AP"], atol=1e-12)
    assert table["AP"].nunique() > 1  # ablations do change the AP here
    # COCOeval's -1 (no ground truth of that size) makes the difference NaN
    assert table["dAPs"].isna().tolist() == (table["APs"] < 0).tolist()


# --- (b) importance ----------------------------------------------------------------------------


def test_importance_equals_autograd_of_a_hand_inserted_scale(model: Detector, dataset: CocoDetection) -> None:
    model.train()  # head_importance must run in eval mode and give the mode back
    table = head_importance(model, dataset, sites="stage2.encoder.*", batch_size=2, progress=False)
    assert model.training
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    assert list(table.columns) == ["site", "stage", "kind", "layer", "head", "heads", "importance", "importance_norm"]
    assert list(table["site"]) == [SITE] * 4 + ["stage2.encoder.1.self_attn"] * 4
    assert list(table["layer"]) == [0] * 4 + [1] * 4 and list(table["head"]) == [0, 1, 2, 3] * 2

    # by hand: a scale per head multiplies that head's slice of out_proj's input, [B, L, E]
    criterion = SetCriterion(5)
    modules = model.attention_sites()
    totals = {name: torch.zeros(4, dtype=torch.float64) for name in table["site"].unique()}
    scales = {name: torch.ones(4, requires_grad=True) for name in totals}

    def scaler(name: str) -> Any:
        d = modules[name].head_dim

        def hook(_module: torch.nn.Module, args: tuple[Tensor]) -> tuple[Tensor]:
            x = args[0]  # [B, L, E] = heads x d
            factors = scales[name].repeat_interleave(d)  # [E]
            return (x * factors,)

        return hook

    handles = [modules[name].out_proj.register_forward_pre_hook(scaler(name)) for name in totals]
    try:
        batches = list(iter_batches(dataset, 2))
        for batch in batches:
            assert batch.targets is not None
            loss = criterion(model(batch.images), batch.targets)["total"]
            grads = torch.autograd.grad(loss, list(scales.values()))
            for name, grad in zip(totals, grads, strict=True):
                totals[name] += grad.abs().double()
    finally:
        for handle in handles:
            handle.remove()
    expected = torch.cat([totals[name] / len(batches) for name in totals])
    assert len(batches) == 2 and expected.min() > 0
    np.testing.assert_allclose(table["importance"], expected.numpy(), rtol=1e-4, atol=1e-8)
    norms = {name: float(totals[name].norm() / len(batches)) for name in totals}
    np.testing.assert_allclose(
        table["importance_norm"], [v / norms[s] for s, v in zip(table["site"], expected.tolist(), strict=True)],
        rtol=1e-4,
    )  # fmt: skip


def test_a_head_with_a_zero_output_slice_has_importance_exactly_zero(model: Detector, dataset: CocoDetection) -> None:
    silenced = zeroed(model, [(SITE, 2)])
    table = head_importance(silenced, dataset, sites=SITE, batch_size=2, limit=2, progress=False)
    assert table["importance"].tolist()[2] == 0.0 and table["importance_norm"].tolist()[2] == 0.0
    assert (table["importance"].drop(index=2) > 0).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0, 100, allow_subnormal=False), min_size=1, max_size=5), min_size=1, max_size=4))
def test_importance_norm_has_unit_norm_per_site(values: list[list[float]]) -> None:
    rows = [{"site": f"s{i}", "importance": v} for i, site in enumerate(values) for v in site]
    table = pd.DataFrame(rows)
    table["importance_norm"] = normalise_per_site(table)
    for i, site in enumerate(values):
        part = table[table["site"] == f"s{i}"]["importance_norm"].to_numpy()
        largest = max(site)
        if largest == 0:
            assert (part == 0).all()  # 0 stays 0
        else:
            norm = largest * math.sqrt(sum((v / largest) ** 2 for v in site))
            np.testing.assert_allclose(part, np.array(site) / norm, rtol=1e-12)
            assert math.sqrt(sum(v * v for v in part)) == pytest.approx(1.0)


def test_importance_needs_targets(model: Detector) -> None:
    with pytest.raises(ValueError, match="needs targets"):
        head_importance(model, [torch.zeros(3, 64, 96)], progress=False)


# --- (c) pruning -------------------------------------------------------------------------------


def test_pruning_follows_the_given_importance_and_starts_at_the_baseline(
    model: Detector, dataset: CocoDetection
) -> None:
    infos = [info for info in sites(model) if info.name.startswith("stage2.encoder")]
    values = [0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.05, 0.6]  # heads (site 0: 0..3, site 1: 0..3)
    importance = pd.DataFrame(
        {"site": [i.name for i in infos for _ in range(4)], "head": [0, 1, 2, 3] * 2, "importance_norm": values}
    )
    curve = pruning_curve(model, dataset, importance=importance, max_removed=3, progress=False)
    later = "stage2.encoder.1.self_attn"
    assert list(curve.columns) == ["step", "removed", "order", "site", "head", "AP", "AP50", "APs", "APm", "APl"]
    assert list(zip(curve["site"], curve["head"], strict=True)) == [("none", -1), (later, 2), (SITE, 1), (later, 0)]
    assert list(curve["removed"]) == [0, 1, 2, 3]
    assert curve["AP"].iloc[0] == pytest.approx(evaluate(model, dataset, progress=False)["AP"], abs=1e-9)
    three = evaluate(zeroed(model, [(later, 2), (SITE, 1), (later, 0)]), dataset, progress=False)
    assert curve["AP"].iloc[3] == pytest.approx(three["AP"], abs=1e-9)


def test_pruning_by_computed_importance_and_random_control(model: Detector, dataset: CocoDetection) -> None:
    curve = pruning_curve(model, dataset, sites=SITE, max_removed=2, limit=2, progress=False)
    importance = head_importance(model, dataset, sites=SITE, limit=2, progress=False)
    expected = importance.sort_values("importance_norm")["head"].tolist()[:2]
    assert curve["head"].tolist()[1:] == expected

    infos = [info for info in sites(model) if info.name.startswith("stage2.encoder")]
    first = removal_order(infos, "random", seed=3)
    assert first == removal_order(infos, "random", seed=3) and first != removal_order(infos, "random", seed=4)
    assert sorted(first) == sorted((i.name, h) for i in infos for h in range(4))
    with pytest.raises(ValueError, match="order must be"):
        removal_order(infos, "largest")
    with pytest.raises(ValueError, match="has no rows for"):
        removal_order(infos, importance=importance)  # only the first site's heads
    with pytest.raises(TypeError, match=r"must be a sdetr\.CocoDetection"):
        ablation_table(model, [torch.zeros(3, 64, 96)], progress=False)  # type: ignore[arg-type]


def test_plots_draw_one_bar_per_ablation_and_one_line_per_order() -> None:
    table = pd.DataFrame(
        {"site": ["none", SITE, SITE, SITE], "head": [-1, 0, 1, -1], "ablated": ["none", "head", "head", "site"],
         "AP": [0.5, 0.4, 0.5, 0.1], "dAP": [0.0, -0.1, 0.0, -0.4]}
    )  # fmt: skip
    figure = plot_ablation(table)
    bars = figure.axes[0].patches
    heights = [b.get_height() for b in bars]  # type: ignore[attr-defined]
    assert heights == pytest.approx([-0.1, 0.0, -0.4])
    assert [bool(b.get_hatch()) for b in bars] == [False, False, True]
    assert "baseline AP 0.500" in figure.axes[0].get_title()
    plt.close(figure)
    curve = pd.DataFrame(
        {"removed": [0, 1, 0, 1], "order": ["importance"] * 2 + ["random"] * 2, "AP": [0.5, 0.45, 0.5, 0.2]}
    )
    figure = plot_pruning_curve(curve)
    lines = figure.axes[0].get_lines()
    assert [np.asarray(line.get_ydata()).tolist() for line in lines] == [[0.5, 0.45], [0.5, 0.2]]
    plt.close(figure)
