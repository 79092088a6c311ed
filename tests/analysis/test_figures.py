"""``python -m analysis.figures``: every figure from a checkpoint, deterministic, with a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.figures import FIGURES, main
from analysis.writers import sha256_file
from sdetr import SyntheticSpec, build_model, generate_synthetic_coco, save_model

CHEAP = ["qkva_grid", "attention_distance", "detections", "class_aps", "size_by_decoder_output", "relevance"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("figures")
    spec = SyntheticSpec(height=64, width=96, num_train=2, num_val=3, min_side=8)
    root = generate_synthetic_coco(spec, cache_dir=folder / "cache")
    torch.manual_seed(0)
    single = save_model(build_model("sdetr-tiny", num_classes=5), folder / "single.pth")
    multi = save_model(build_model("sdetr-tiny-multihead", num_classes=5), folder / "multi.pth")
    return {"data": str(root), "single": str(single), "multi": str(multi)}


def test_two_runs_give_identical_files_and_a_complete_manifest(inputs: dict[str, str], tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        argv = ["--checkpoint", inputs["single"], "--data", inputs["data"], "--out", str(tmp_path / run)]
        argv += ["--images", "2", "--formats", "png", "pdf", "--only", *CHEAP]
        outputs.append(main(argv).parent)
    first, second = outputs
    manifest = json.loads((first / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["figures"]] == [name for name in FIGURES if name in CHEAP]
    written = sorted(p.name for p in first.iterdir() if p.is_file() and p.name != "manifest.json")
    listed = sorted(name for entry in manifest["figures"] for name in entry["files"])
    assert written == listed and len(listed) == 2 * len(CHEAP)  # a PNG and a PDF each
    for entry in manifest["figures"]:
        for name, digest in entry["files"].items():
            assert sha256_file(first / name) == digest
            assert (second / name).read_bytes() == (first / name).read_bytes(), name  # byte-identical
    assert manifest["checkpoint"]["path"] == inputs["single"] and len(manifest["checkpoint"]["weights_sha256"]) == 64
    assert manifest["command"][:3] == ["python", "-m", "analysis.figures"] and manifest["multi"] is None
    for table, digest in manifest["tables"].items():
        assert sha256_file(first / "data" / table) == digest


def test_multi_model_figures(inputs: dict[str, str], tmp_path: Path) -> None:
    argv = ["--checkpoint", inputs["single"], "--multi", inputs["multi"], "--data", inputs["data"]]
    argv += ["--out", str(tmp_path), "--images", "2", "--formats", "png", "--only", "head_ablation", "head_redundancy"]
    manifest = json.loads(main(argv).read_text())
    assert manifest["multi"]["path"] == inputs["multi"]
    assert {entry["name"] for entry in manifest["figures"]} == {"head_ablation", "head_redundancy"}
    # the ablation table behind the figure: every head of the multi-head stage-2 encoder, and each site
    table = pd.read_csv(tmp_path / "data" / "ablation.csv")
    heads = table[table["site"].str.startswith("stage2.encoder")]
    assert len(heads) == 2 * 4 + 2  # 2 layers x 4 heads, plus the 2 whole sites


def test_unknown_figure_is_refused(inputs: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--checkpoint", inputs["single"], "--out", str(tmp_path), "--only", "nope"])
