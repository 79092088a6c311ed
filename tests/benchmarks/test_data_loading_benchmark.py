"""benchmarks/data_loading.py on a tiny synthetic set: both ways load every batch, the cached
way from samples filled once, and a run that augments is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.benchmarks import load_benchmark

TINY = ["--synthetic_train", "12", "--synthetic_val", "2", "--batch_size", "4"]


def test_both_ways_load_the_same_batches_and_the_cache_is_filled_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path / "cache"))
    benchmark = load_benchmark("data_loading")
    calls = {"cached": 0, "transformed": 0}
    original = benchmark.CocoDetection._transformed

    def counting(self, image_id):  # type: ignore[no-untyped-def]
        calls["cached" if self.samples is not None else "transformed"] += 1
        return original(self, image_id)

    monkeypatch.setattr(benchmark.CocoDetection, "_transformed", counting)
    result = benchmark.measure(TINY, images=10, rounds=2, low_res=False)
    assert result["batches_per_pass"] == 3 and result["images"] == 10  # 4 + 4 + 2
    # a warm-up pass and two timed passes: 30 transforms without the cache, 10 with it
    assert calls == {"transformed": 30, "cached": 10}
    assert all(math.isfinite(ms) and ms > 0 for ms in result["ms_per_batch"].values())
    ways = benchmark.ways_of_loading(TINY, low_res=False)
    pairs = zip(ways["transformed"], ways["cached"], strict=True)
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in pairs] == [True] * 12
    small = benchmark.measure([*TINY, "--low_res_epochs", "1", "--epochs", "2"], images=4, rounds=1, low_res=True)
    assert small["size"] == "low_res" and small["batches_per_pass"] == 1


def test_the_report_gives_the_cached_ratio() -> None:
    benchmark = load_benchmark("data_loading")
    result = {
        "batches_per_pass": 20,
        "batch_size": 16,
        "size": "full",
        "ms_per_batch": {"transformed": 30.0, "cached": 0.6},
    }
    assert benchmark.report(result).splitlines() == [
        "20 batches of 16 per pass, full size",
        "   30.00 ms per batch  transformed every epoch (decoded once)",
        "    0.60 ms per batch  cached samples (0.020x)",
    ]


def test_a_run_that_augments_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path / "cache"))
    benchmark = load_benchmark("data_loading")
    with pytest.raises(SystemExit, match="caches no samples: it augments its training images"):
        benchmark.measure([*TINY, "--augment"], images=8, rounds=1, low_res=False)
