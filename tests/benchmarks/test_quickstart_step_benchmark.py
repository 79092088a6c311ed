"""benchmarks/quickstart_step.py on a tiny synthetic set: each variant is the trainer its
train.py flags build, every variant takes every batch in every pass, and the report's ratios
are to the first variant."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks import ROOT, load_benchmark

TINY = "--synthetic_train 8 --synthetic_val 2 --batch_size 4 --denoising_groups 2"
NARROW = TINY + " --set backbone_width=0.25"


def test_each_variant_is_built_from_its_flags_and_takes_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDETR_CACHE", str(tmp_path / "cache"))
    benchmark = load_benchmark("quickstart_step")
    result = benchmark.measure([TINY, NARROW], images=8, rounds=2, low_res=False)
    assert result["steps_per_pass"] == 2  # 8 images, batch 4
    # a warm-up pass and two timed passes of two steps each, for both variants
    assert result["optimizer_steps"] == {TINY: 6, NARROW: 6}
    assert result["parameters"][NARROW] < result["parameters"][TINY]  # the narrower backbone
    assert all(math.isfinite(ms) and ms > 0 for ms in result["ms_per_step"].values())


def test_the_report_gives_each_variant_its_ratio_to_the_first() -> None:
    benchmark = load_benchmark("quickstart_step")
    result = {"steps_per_pass": 5, "size": "full", "threads": 2, "ms_per_step": {"": 200.0, "--x 1": 150.0}}
    assert benchmark.report(result).splitlines() == [
        "5 steps per pass, full size, 2 threads",
        "   200.0 ms  1.000x  (default)",
        "   150.0 ms  0.750x  --x 1",
    ]


def test_the_same_variant_twice_is_refused_before_anything_is_built_even_after_a_double_dash(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SDETR_CACHE": str(tmp_path)}
    script = str(ROOT / "benchmarks" / "quickstart_step.py")
    run = subprocess.run(
        [sys.executable, script, "--output", str(tmp_path / "out.json"), "--", "--compile", "--compile"],
        capture_output=True, text=True, check=False, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "each variant must differ from the others" in run.stderr
    assert not any(tmp_path.iterdir())  # no synthetic set made, no output written
