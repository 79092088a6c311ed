"""The project against the original code, side by side in one process, on the same weights.

``original``: the test suite's independent re-statement of the original forward
(``tests/reference_impl.py``: sequence-first ``nn.MultiheadAttention`` with its default
``need_weights=True``, frozen batch norm as separate ops). ``sdetr``: the shipped model as
``load_model`` returns it (the default path). ``sdetr fast``: the same model after
``model.set_fast(True)`` (frozen batch norm folded into the convolutions, channels-last
backbone). For each case the three are timed round-robin, round by round, so machine noise
hits all alike; the medians and their ratios to ``original`` are printed:

- eval forward (``torch.no_grad``), and
- train step: forward + DETR criterion (``SetCriterion``, Hungarian matching) + backward,

for ``sdetr`` and ``detr`` at 512x512 batch 2 and at 800x1333 batch 1 (``--cases``), then the
quickstart's training steps per second (``sdetr-tiny``, batch 4 at 192x256, default vs fast).
The largest output difference between the three is printed too (float32 rounding only).

Usage: ``python benchmarks/speed.py [--rounds 5] [--cases sdetr:512x512x2 detr:800x1333x1]``.
Writes JSON to ``outputs/benchmarks/speed.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdetr import SetCriterion, build_model, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REFERENCE: Any = importlib.import_module("tests.reference_impl")  # the test suite's re-statement (untyped)

DEFAULT_CASES = ("sdetr:512x512x2", "detr:512x512x2", "sdetr:800x1333x1", "detr:800x1333x1")


def targets_for(batch: int, generator: torch.Generator) -> list[dict[str, Tensor]]:
    """Three random objects per image (cxcywh in [0, 1]), COCO-style labels."""
    out = []
    for _ in range(batch):
        centres = torch.rand(3, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(3, 2, generator=generator) * 0.2 + 0.05
        out.append({"labels": torch.randint(1, 91, (3,), generator=generator), "boxes": torch.cat([centres, sizes], 1)})
    return out


def eval_step(model: nn.Module, images: Tensor, mask: Tensor) -> Callable[[], Any]:
    def step() -> Any:
        with torch.no_grad():
            return model(images, mask)

    return step


def train_step(model: nn.Module, images: Tensor, mask: Tensor, targets: list[dict[str, Tensor]]) -> Callable[[], Any]:
    criterion = SetCriterion(num_classes=91)

    def step() -> Any:
        model.zero_grad(set_to_none=True)
        loss = criterion(model(images, mask), targets)["total"]
        loss.backward()
        return loss

    return step


def interleaved(steps: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each step, timed round-robin after one warm-up call each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def compare_case(preset: str, height: int, width: int, batch: int, rounds: int) -> dict[str, Any]:
    reference = REFERENCE.randomize_(REFERENCE.RefSDETR() if preset == "sdetr" else REFERENCE.RefDETR(), seed=1)
    ours = load_model(reference.state_dict())
    fast = load_model(reference.state_dict()).set_fast(True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    models = {"original": reference, "sdetr": ours, "sdetr fast": fast}
    outputs = {name: eval_step(model, images, mask)() for name, model in models.items()}
    max_diff = {
        name: max(float((outputs[name][k] - outputs["original"][k]).abs().max()) for k in ("pred_logits", "pred_boxes"))
        for name in ("sdetr", "sdetr fast")
    }
    eval_times = interleaved({name: eval_step(m, images, mask) for name, m in models.items()}, rounds)
    targets = targets_for(batch, generator)
    for model in models.values():
        model.train()  # dropout is 0.1 in both; frozen batch norm is unaffected
    torch.manual_seed(0)
    train_times = interleaved({name: train_step(m, images, mask, targets) for name, m in models.items()}, rounds)
    return {
        "case": f"{preset} {height}x{width} batch {batch}",
        "eval_s": eval_times,
        "train_s": train_times,
        "eval_speedup": {n: eval_times["original"] / t for n, t in eval_times.items()},
        "train_speedup": {n: train_times["original"] / t for n, t in train_times.items()},
        "max_abs_output_diff": max_diff,
    }


def quickstart_steps(rounds: int) -> dict[str, Any]:
    """Training steps per second of the quickstart's model and batch (sdetr-tiny, 4 x 192x256)."""
    torch.manual_seed(0)
    plain = build_model("sdetr-tiny", num_classes=5)
    fast = build_model("sdetr-tiny", num_classes=5)
    fast.load_state_dict(plain.state_dict())
    fast.set_fast(True)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 192, 256, generator=generator)
    mask = torch.zeros(4, 192, 256, dtype=torch.bool)
    targets = [{**t, "labels": t["labels"] % 4 + 1} for t in targets_for(4, generator)]
    criterion = SetCriterion(num_classes=5)

    def step(model: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            model.zero_grad(set_to_none=True)
            loss = criterion(model(images, mask, encoder_outputs=False), targets)["total"]
            loss.backward()
            return loss

        return run

    times = interleaved({"sdetr": step(plain.train()), "sdetr fast": step(fast.train())}, rounds)
    return {"case": "quickstart sdetr-tiny 192x256 batch 4", "steps_per_s": {n: 1 / t for n, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), help="PRESET:HxWxB, PRESET in sdetr/detr")
    parser.add_argument("--output", default="outputs/benchmarks/speed.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results: list[dict[str, Any]] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'case':<28} {'step':<6} {'original':>10} {'sdetr':>10} {'fast':>10} {'sdetr/orig':>11} {'fast/orig':>10}")
    for case in args.cases:
        preset, size = case.split(":")
        height, width, batch = (int(v) for v in size.split("x"))
        result = compare_case(preset, height, width, batch, args.rounds)
        results.append(result)
        for kind in ("eval", "train"):
            t, s = result[f"{kind}_s"], result[f"{kind}_speedup"]
            print(
                f"{result['case']:<28} {kind:<6} {t['original'] * 1e3:>8.1f}ms {t['sdetr'] * 1e3:>8.1f}ms "
                f"{t['sdetr fast'] * 1e3:>8.1f}ms {s['sdetr']:>10.2f}x {s['sdetr fast']:>9.2f}x"
            )
        print(f"{'':<28} max |output - original|: {result['max_abs_output_diff']}")
    quick = quickstart_steps(args.rounds)
    results.append(quick)
    print(f"{quick['case']}: steps/s {quick['steps_per_s']}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
