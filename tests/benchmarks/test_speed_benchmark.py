"""benchmarks/speed.py end to end on a tiny case: each case runs in a child process whose JSON
comes back to the parent, and the project's variants compute what the original does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_case_runs_in_its_own_process_and_its_variants_match_the_original(tmp_path: Path) -> None:
    output = tmp_path / "speed.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--rounds", "1", "--cases", "detr:64x96x1"]
    run = subprocess.run(
        [*command, "--no_quickstart", "--output", str(output)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    payload = json.loads(output.read_text())
    assert payload["rounds"] == 1 and len(payload["results"]) == 1
    result = payload["results"][0]
    assert result["case"] == "detr 64x96 batch 1"
    assert set(result["eval_s"]) == {"original", "exact", "sdetr", "fast", "fast bf16"}
    assert result["eval_speedup"]["original"] == 1.0 and result["train_speedup"]["original"] == 1.0
    assert all(t > 0 for t in [*result["eval_s"].values(), *result["train_s"].values()])
    # float32 variants: the original's outputs within float tolerance; bf16 within its rounding
    assert max(result["max_abs_output_diff"][n] for n in ("exact", "sdetr", "fast")) < 1e-4
    assert result["max_abs_output_diff"]["fast bf16"] < 0.5
    # the parent printed the child's rows, one per variant
    assert sum(line.startswith("detr 64x96 batch 1") for line in run.stdout.splitlines()) == 5
