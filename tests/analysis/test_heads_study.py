"""The heads study command (``python -m analysis.heads_study``), run in-process on tiny models."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from analysis.heads_study import (
    STUDY_PRESETS,
    accuracy_verdict,
    attention_flops,
    get_study_config,
    grid_cells,
    main,
    memory_peaks,
    parse_args,
    replay_peak,
)
from sdetr import SyntheticSpec, build_model, generate_synthetic_coco, record, save_model


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study on two random-weight checkpoints and a 4-image 64x96 synthetic split (native size)."""
    folder = tmp_path_factory.mktemp("study")
    root = generate_synthetic_coco(
        SyntheticSpec(height=64, width=96, num_train=1, num_val=4, min_side=8), cache_dir=folder / "cache"
    )
    torch.manual_seed(0)
    single = save_model(build_model("sdetr-tiny", num_classes=5), folder / "single.pth")
    multi = save_model(build_model("sdetr-tiny-multihead", num_classes=5), folder / "multi.pth")
    argv = ["--preset", "quick", "--single", str(single), "--multi", str(multi), "--data", str(root),
            "--scale", "native", "--out", str(folder / "out"), "--limit", "2", "--no_progress",
            "--threads", "1"]  # fmt: skip
    # one thread: on this shared 2-core machine two threads contend with other processes (many times slower)
    torch.set_num_threads(2)
    path = main(argv)
    assert torch.get_num_threads() == 2  # --threads 1 held during the study only
    torch.set_num_threads(1)
    return path


def test_report_has_every_section_and_its_linked_files_exist(study: Path) -> None:
    text = study.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == ["Accuracy", "Cost", "Behaviour", "Necessity"]
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    tables = re.findall(r"`([\w.]+\.csv)`", text)
    assert len(figures) == 2 * 3 + 1 + 3  # distance, entropy, rank per side; redundancy; 2 ablations; pruning
    assert set(tables) >= {"accuracy.csv", "cost.csv", "statistics.csv", "ablation_multi.csv", "pruning.csv"}
    for name in figures + tables:
        path = study.parent / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(study.parent.glob(".*"))  # no temporary files left behind
    assert "one checkpoint per side there is no spread" in text


def test_report_tables_hold_the_expected_rows(study: Path) -> None:
    folder = study.parent
    accuracy = pd.read_csv(folder / "accuracy.csv")
    assert accuracy["side"].tolist() == ["single", "multi"]
    assert list(accuracy.columns) == ["side", "checkpoint", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    cost = pd.read_csv(folder / "cost.csv")
    assert cost["stage2_encoder_heads"].tolist() == ["1, 1", "4, 4"]
    assert cost["parameters"].iloc[0] == cost["parameters"].iloc[1]  # splitting into heads adds no weights
    # 64x96 at stride 16: 4x6 = 24 cells; E = 64; two sites: 2 * 4 * 24^2 * 64 FLOPs whatever the heads
    assert cost["attention_flops"].tolist() == [2 * 4 * 24**2 * 64] * 2
    assert cost["softmax_scores"].tolist() == [2 * 1 * 24**2, 2 * 4 * 24**2]
    assert cost["recording_bytes"].tolist() == [2 * 1 * 24**2 * 2, 2 * 4 * 24**2 * 2]  # float16 maps
    # inside a recorded site call the explicit path holds the float32 map [heads, 24, 24] (at least)
    recorded = (cost["peak_site_recording_kib"] * 1024).tolist()
    assert recorded[0] >= 1 * 24**2 * 4 and recorded[1] - recorded[0] >= 3 * 24**2 * 4
    assert (cost["forward_ms"] > 0).all() and (cost["peak_forward_mib"] > cost["peak_site_kib"] / 1024).all()
    ablation = pd.read_csv(folder / "ablation_multi.csv")
    assert len(ablation) == 1 + 8 + 2 and len(pd.read_csv(folder / "ablation_single.csv")) == 1 + 2
    pruning = pd.read_csv(folder / "pruning.csv")
    assert pruning.groupby("order")["removed"].max().to_dict() == {"importance": 3, "random": 3}  # quick: 3 steps
    importance = pd.read_csv(folder / "importance.csv")
    multi = importance[importance["side"] == "multi"].sort_values("importance_norm", kind="stable")
    steps = pruning[(pruning["order"] == "importance") & (pruning["step"] > 0)]
    assert (
        list(zip(steps["site"], steps["head"], strict=True)) == list(zip(multi["site"], multi["head"], strict=True))[:3]
    )  # least important first
    statistics = pd.read_csv(folder / "statistics.csv")
    assert statistics.groupby("side").size().to_dict() == {"multi": 8, "single": 2}


def test_grid_cells_match_the_recorded_grid() -> None:
    model = build_model("sdetr-tiny").eval()
    for height, width in [(64, 96), (70, 101)]:
        with torch.no_grad(), record(model, sites="stage2.encoder.0.self_attn", tensors=("k",)) as rec:
            model(torch.zeros(1, 3, height, width))
        rows, cols = rec["stage2.encoder.0.self_attn"].k.shape[2:4]  # type: ignore[union-attr]
        assert grid_cells((height, width), 16) == rows * cols
    flops = attention_flops(model, (70, 101), "stage2.encoder.*")
    assert flops["cells"].tolist() == [5 * 7] * 2  # ceil(70/16) x ceil(101/16)
    assert flops["projection_flops"].tolist() == [8 * 35 * 64**2] * 2


def test_verdict_compares_the_difference_with_the_spread() -> None:
    def summary(single: list[float], multi: list[float]) -> pd.DataFrame:
        rows = []
        for side, values in (("single", single), ("multi", multi)):
            rows.append({"side": side, "stat": "AP", "n": len(values), "mean": sum(values) / len(values),
                         "std": math.nan, "min": min(values), "max": max(values)})  # fmt: skip
        return pd.DataFrame(rows)

    wide = accuracy_verdict(summary([0.10, 0.20], [0.16, 0.18]))
    assert "0.0200 higher" in wide and "spread" in wide and "does not exceed" in wide and "0.1000" in wide
    narrow = accuracy_verdict(summary([0.10, 0.11], [0.20, 0.21]))
    assert "0.1000 higher" in narrow and "the difference exceeds it" in narrow


def test_cli_config_presets_and_errors(tmp_path: Path) -> None:
    config = parse_args(["--single", "a.pth", "--single", "b.pth", "--multi", "c.pth", "--limit", "3"])
    assert config.single == ("a.pth", "b.pth") and config.multi == ("c.pth",) and config.limit == 3
    assert config.timing_rounds == STUDY_PRESETS["default"].timing_rounds and config.progress
    quick = parse_args(["--preset", "quick", "--train", "--seeds", "1", "2", "--epochs", "2"])
    assert quick.train and quick.seeds == (1, 2) and quick.epochs == 2 and quick.limit == 4
    assert get_study_config("quick", dpi=50).dpi == 50
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "1"])  # seeds without --train
    with pytest.raises(ValueError, match="unknown study preset"):
        get_study_config("huge")
    with pytest.raises(ValueError, match="no --single checkpoint"):
        main(["--multi", "x.pth", "--out", str(tmp_path / "o"), "--data", str(tmp_path)])
    with pytest.raises(ValueError, match="use it with --data synthetic"):
        main(["--train", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        main(["--single", str(tmp_path / "a.pth"), "--multi", "x.pth", "--out", str(tmp_path / "o")])


def test_memory_replay_by_hand() -> None:
    def event(start: float, end: float, delta: int) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), self_cpu_memory_usage=delta)

    # a parent op (0..100) whose own frees (-12) come at its end; three children allocate 4 each;
    # a [memory] free of 4 between ops at t=50; an op at 60..70 that allocates 2 and frees 2 of its own
    events = [event(0, 100, -8), event(10, 20, 4), event(30, 40, 4), event(50, 50, -4), event(60, 70, 0),
              event(80, 90, 4)]  # fmt: skip
    assert replay_peak(events) == 8  # 4 + 4, then -4 at 50, then +4 at 80: peak 8
    assert replay_peak(events, window=(25, 95)) == 4  # only what the window allocates: +4, -4, +4
    assert replay_peak([event(0, 1, -5)]) == 0


def test_memory_peaks_of_a_plain_computation() -> None:
    model = build_model("sdetr-tiny").eval()

    def run() -> None:  # three float32 1000x1000 tensors live at once (12 MB), freed on return
        a = torch.empty(1000, 1000)
        b = torch.empty(1000, 1000)
        c = torch.empty(1000, 1000)
        del a, b, c

    peaks = memory_peaks(model, "stage2.encoder.*", run)
    assert peaks.forward == 12_000_000 and peaks.site == 0  # no site ran
