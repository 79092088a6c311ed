"""benchmarks/speed.py end to end on tiny cases: each case runs in a child process of its own
whose JSON comes back to the parent, the project's variants compute what the original does, a
malformed case is refused before anything runs, and a failed case keeps the finished ones."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.benchmarks import ROOT, load_benchmark

SCRIPT = str(ROOT / "benchmarks" / "speed.py")
# one thread, as the other xdist worker runs beside it; the repository importable without an install
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_speed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, check=False, cwd=ROOT, env=ENV, timeout=300
    )


def test_each_case_runs_in_its_own_process_and_its_variants_match_the_original(tmp_path: Path) -> None:
    output = tmp_path / "speed.json"
    cases = ("--cases", "detr:64x96x1", "detr:64x64x1")
    run = run_speed("--rounds", "1", *cases, "--no_quickstart", "--output", str(output))
    assert run.returncode == 0, run.stderr
    payload = json.loads(output.read_text())
    assert payload["rounds"] == 1
    results = payload["results"]
    assert [r["case"] for r in results] == ["detr 64x96 batch 1", "detr 64x64 batch 1"]
    assert len({r["pid"] for r in results} | {os.getpid()}) == 3  # two children, neither of them this process
    for result in results:
        assert set(result["eval_s"]) == {"original", "exact", "sdetr", "fast", "fast bf16"}
        # float32 variants: the original's outputs within float tolerance; bf16 only finite
        assert max(result["max_abs_output_diff"][n] for n in ("exact", "sdetr", "fast")) < 1e-4
        assert math.isfinite(result["max_abs_output_diff"]["fast bf16"])
        # the parent printed each child's rows, one per variant
        assert sum(line.startswith(result["case"]) for line in run.stdout.splitlines()) == 5


def test_a_malformed_case_is_refused_before_any_case_runs(tmp_path: Path) -> None:
    output = tmp_path / "speed.json"
    run = run_speed("--cases", "detr:64x96x1", "sdetr:512x512", "--output", str(output))
    assert run.returncode == 2  # argparse's usage error
    assert "'sdetr:512x512': write a case as PRESET:HxWxB" in run.stderr
    assert not output.exists()


def test_a_failed_case_stops_the_run_and_keeps_the_finished_cases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    speed = load_benchmark("speed")
    ran: list[str] = []

    def first_fine_then_failing(name: str, rounds: int, compiled: bool) -> dict[str, Any]:
        ran.append(name)
        if len(ran) == 2:
            raise speed.CaseFailedError(f"case {name} failed in its process (exit status 1)")
        return {"case": name, "eval_s": {}}

    output = tmp_path / "speed.json"
    monkeypatch.setattr(speed, "in_fresh_process", first_fine_then_failing)
    cases = ["detr:64x96x1", "detr:64x64x1", "sdetr:64x64x1"]
    monkeypatch.setattr(sys, "argv", ["speed.py", "--cases", *cases, "--output", str(output)])
    with pytest.raises(SystemExit, match=r"case detr:64x64x1 failed .* the 1 finished case\(s\) are in"):
        speed.main()
    assert ran == cases[:2]  # nothing ran after the failure
    assert [r["case"] for r in json.loads(output.read_text())["results"]] == ["detr:64x96x1"]
