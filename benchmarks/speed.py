"""The project against the original code, side by side in one process per case, on the same weights.

``original``: the test suite's independent re-statement of the original forward
(``tests/reference_impl.py``: sequence-first ``nn.MultiheadAttention`` with its default
``need_weights=True``, frozen batch norm as separate ops), with the stem and layer1 frozen as the
original training script froze them (the project's models freeze the same). The project's model,
as ``load_model`` returns it, at each backbone speed (``sdetr.BACKBONE_SPEEDS``): ``exact``
(torchvision's modules and forward everywhere), ``sdetr`` (the default: torchvision's result in
inference, bit for bit, its frozen batch norms, ReLUs and residual adds computed in place, in
oneDNN's blocked layout on a CPU; frozen batch norm folded into the convolutions and
channels-last in training steps), ``fast`` (folded and channels-last everywhere) and ``fast
bf16`` (fast under bf16 autocast). For each case the variants are timed round by round, each
round in its own seeded random order, so machine noise and the order hit all alike, and each
case (and the quickstart rates) runs in a fresh Python process of its own, since a case measured
after another in one process inherits its allocator state; the medians and their ratios to
``original`` are printed:

- eval forward (``torch.no_grad``), and
- train step: forward + DETR criterion (``SetCriterion``, Hungarian matching) + backward,

for ``sdetr`` and ``detr`` at 512x512 batch 2 and at 800x1333 batch 1 (``--cases``), then the
quickstart's training steps per second (``sdetr-tiny``, batch 4 at 192x256: float32 vs bf16
autocast, each with foreach vs fused AdamW). The largest output difference of each variant to
``original`` is printed too.

Usage: ``python benchmarks/speed.py [--rounds 5] [--cases sdetr:512x512x2 detr:800x1333x1]``.
Writes JSON to ``outputs/benchmarks/speed.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdetr import SetCriterion, atomic_path, build_model, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REFERENCE: Any = importlib.import_module("tests.reference_impl")  # the test suite's re-statement (untyped)

PREDICTIONS = ("pred_logits", "pred_boxes")
DEFAULT_CASES = ("sdetr:512x512x2", "detr:512x512x2", "sdetr:800x1333x1", "detr:800x1333x1")


def targets_for(
    batch: int, generator: torch.Generator, objects: int = 3, min_side: float = 0.05, side_span: float = 0.2
) -> list[dict[str, Tensor]]:
    """``objects`` random objects per image: boxes ``[objects, 4]`` cxcywh in [0, 1], sides
    uniform in ``min_side + [0, side_span)``, COCO-style labels 1..90."""
    out = []
    for _ in range(batch):
        centres = torch.rand(objects, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(objects, 2, generator=generator) * side_span + min_side
        labels = torch.randint(1, 91, (objects,), generator=generator)
        out.append({"labels": labels, "boxes": torch.cat([centres, sides], 1)})
    return out


def same_trainable_parameters(models: dict[str, nn.Module], script: str) -> dict[str, int]:
    """Trainable parameter counts of ``models``; exits naming ``script`` when they differ (a
    timed train step would then compare different work)."""
    trainable = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    if len(set(trainable.values())) != 1:
        raise SystemExit(f"{script}: the variants train different parameters: {trainable}")
    return trainable


def autocast(dtype: torch.dtype | None) -> Any:
    """bf16 autocast on the CPU for the ``bf16`` variants, nothing otherwise."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()


def eval_step(model: nn.Module, images: Tensor, mask: Tensor, dtype: torch.dtype | None = None) -> Callable[[], Any]:
    def step() -> Any:
        with torch.no_grad(), autocast(dtype):
            return model(images, mask)

    return step


def train_step(
    model: nn.Module, images: Tensor, mask: Tensor, targets: list[dict[str, Tensor]], dtype: torch.dtype | None = None
) -> Callable[[], Any]:
    criterion = SetCriterion(num_classes=91)

    def step() -> Any:
        model.zero_grad(set_to_none=True)
        with autocast(dtype):
            outputs = model(images, mask)
        loss = criterion(float_outputs(outputs), targets)["total"]
        loss.backward()
        return loss

    return step


def float_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Predictions in float32 (the criterion's precision, whatever the autocast dtype)."""
    out = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
    out["aux_outputs"] = [{k: aux[k].float() for k in ("pred_logits", "pred_boxes")} for aux in outputs["aux_outputs"]]
    return out


def machine_info() -> dict[str, Any]:
    """torch's version, the processor and torch's thread count, for a benchmark's JSON."""
    return {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a benchmark's results to ``path`` atomically (a crash leaves the previous file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    return Path(path)


def interleaved(steps: dict[str, Callable[[], Any]], rounds: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each step, timed round by round after one warm-up call each.

    Each round runs the steps in its own random order (seeded by ``seed``), so that no step
    systematically runs after the same other one: what a step leaves behind (freed memory, the
    allocator's thresholds) changes the time of the next, by up to a third on this project's CPU
    machine.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def variants(reference: nn.Module, compiled: bool) -> dict[str, tuple[nn.Module, torch.dtype | None]]:
    """The models compared, each with its autocast dtype (None: float32), same weights."""
    state = reference.state_dict()
    out: dict[str, tuple[nn.Module, torch.dtype | None]] = {
        "original": (reference, None),
        "exact": (load_model(state, speed="exact"), None),
        "sdetr": (load_model(state), None),
        "fast": (load_model(state, speed="fast"), None),
        "fast bf16": (load_model(state, speed="fast"), torch.bfloat16),
    }
    if compiled:
        out["fast compiled"] = (load_model(state, speed="fast", compile=True), None)
    return out


def compare_case(preset: str, height: int, width: int, batch: int, rounds: int, compiled: bool) -> dict[str, Any]:
    reference = REFERENCE.randomize_(REFERENCE.RefSDETR() if preset == "sdetr" else REFERENCE.RefDETR(), seed=1)
    REFERENCE.freeze_like_original_(reference)  # stem and layer1 frozen, as the original trained them
    models = variants(reference, compiled)
    same_trainable_parameters({name: model for name, (model, _) in models.items()}, "benchmarks/speed.py")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    outputs = {name: eval_step(model, images, mask, dtype)() for name, (model, dtype) in models.items()}
    max_diff = {
        name: max(float((outputs[name][k].float() - outputs["original"][k]).abs().max()) for k in PREDICTIONS)
        for name in models
    }
    eval_times = interleaved({name: eval_step(m, images, mask, d) for name, (m, d) in models.items()}, rounds)
    targets = targets_for(batch, generator)
    for model, _ in models.values():
        model.train()  # dropout is 0.1 in both; frozen batch norm is unaffected
    torch.manual_seed(0)
    train_steps = {name: train_step(m, images, mask, targets, d) for name, (m, d) in models.items()}
    train_times = interleaved(train_steps, rounds)
    return {
        "case": f"{preset} {height}x{width} batch {batch}",
        "eval_s": eval_times,
        "train_s": train_times,
        "eval_speedup": {n: eval_times["original"] / t for n, t in eval_times.items()},
        "train_speedup": {n: train_times["original"] / t for n, t in train_times.items()},
        "max_abs_output_diff": max_diff,
    }


def quickstart_steps(rounds: int) -> dict[str, Any]:
    """Training steps per second of the quickstart's model and batch (sdetr-tiny, 4 x 192x256):
    float32 vs bf16 autocast, each with the optimiser step (AdamW, foreach vs fused)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 192, 256, generator=generator)
    mask = torch.zeros(4, 192, 256, dtype=torch.bool)
    targets = [{**t, "labels": t["labels"] % 4 + 1} for t in targets_for(4, generator)]
    criterion = SetCriterion(num_classes=5)
    torch.manual_seed(0)
    initial = build_model("sdetr-tiny", num_classes=5).state_dict()

    def step(dtype: torch.dtype | None, fused: bool) -> Callable[[], Any]:
        model = build_model("sdetr-tiny", num_classes=5)
        model.load_state_dict(initial)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, fused=fused)

        def run() -> Any:
            optimizer.zero_grad(set_to_none=True)
            with autocast(dtype):
                outputs = model(images, mask)
            loss = criterion(float_outputs(outputs), targets)["total"]
            loss.backward()
            optimizer.step()
            return loss

        return run

    steps = {
        "fp32": step(None, False),
        "fp32 fused AdamW": step(None, True),
        "bf16": step(torch.bfloat16, False),
        "bf16 fused AdamW": step(torch.bfloat16, True),
    }
    times = interleaved(steps, rounds)
    return {
        "case": "quickstart sdetr-tiny 192x256 batch 4",
        "steps_per_s": {n: 1 / t for n, t in times.items()},
        "speedup": {n: times["fp32"] / t for n, t in times.items()},
    }


def parse_case(text: str) -> tuple[str, int, int, int]:
    """Preset, height, width and batch of a case written ``PRESET:HxWxB`` (``sdetr:512x512x2``).

    Raises:
        argparse.ArgumentTypeError: not that form, or a preset other than ``sdetr`` and ``detr``.
    """
    preset, _, size = text.partition(":")
    parts = size.split("x")
    if preset not in ("sdetr", "detr") or len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: write a case as PRESET:HxWxB, e.g. sdetr:512x512x2 or detr:800x1333x1"
        )
    height, width, batch = (int(p) for p in parts)
    return preset, height, width, batch


def case_name(text: str) -> str:
    """``text``, checked by :func:`parse_case` when the arguments are parsed, before any case runs."""
    parse_case(text)
    return text


def run_one(name: str, rounds: int, compiled: bool) -> dict[str, Any]:
    """One case (``PRESET:HxWxB``, e.g. ``sdetr:512x512x2``) or ``quickstart``, in this process;
    the result records the process id (``pid``)."""
    result = quickstart_steps(rounds) if name == "quickstart" else compare_case(*parse_case(name), rounds, compiled)
    return {**result, "pid": os.getpid()}


class CaseFailedError(RuntimeError):
    """A case's child process exited with an error (its traceback is on stderr above)."""


def in_fresh_process(name: str, rounds: int, compiled: bool) -> dict[str, Any]:
    """:func:`run_one` in a new Python interpreter (this script with ``--only``); its JSON result
    comes back through a temporary file. The parent only waits, so it takes no CPU meanwhile.

    Raises:
        CaseFailedError: the child exited with an error.
    """
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--only", name, "--rounds", str(rounds), "--output", str(result)]
        child = subprocess.run(command + (["--compile"] if compiled else []), check=False)
        if child.returncode != 0:
            raise CaseFailedError(f"case {name} failed in its process (exit status {child.returncode})")
        return dict(json.loads(result.read_text()))


def print_result(result: dict[str, Any]) -> None:
    """One row per variant: times and ratios of a case, or steps per second of the quickstart."""
    if "steps_per_s" in result:
        for name, rate in result["steps_per_s"].items():
            print(f"{result['case']:<26} {name:<18} {rate:>6.2f} steps/s {result['speedup'][name]:>6.2f}x", flush=True)
        return
    for name in result["eval_s"]:
        print(
            f"{result['case']:<26} {name:<14} {result['eval_s'][name] * 1e3:>7.1f}ms "
            f"{result['eval_speedup'][name]:>6.2f}x {result['train_s'][name] * 1e3:>7.1f}ms "
            f"{result['train_speedup'][name]:>6.2f}x {result['max_abs_output_diff'][name]:>11.1e}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", type=case_name, default=list(DEFAULT_CASES), help="PRESET:HxWxB")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd fast mode (minutes to compile)")
    parser.add_argument("--no_quickstart", dest="quickstart", action="store_false", help="skip the quickstart rates")
    parser.add_argument("--output", default="outputs/benchmarks/speed.json")
    # What each child runs: one case (or "quickstart") in this process, its bare result dict to --output.
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only is not None:
        write_json(args.output, run_one(args.only, args.rounds, args.compile))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'case':<26} {'variant':<14} {'eval':>9} {'x orig':>7} {'train':>9} {'x orig':>7} {'max |diff|':>11}")
    results: list[dict[str, Any]] = []
    failed = None
    for name in args.cases + (["quickstart"] if args.quickstart else []):
        try:
            results.append(in_fresh_process(name, args.rounds, args.compile))
        except CaseFailedError as error:
            failed = error
            break
        print_result(results[-1])
    out = write_json(args.output, {"rounds": args.rounds, "torch": torch.__version__, "results": results})
    if failed is not None:  # the finished cases are kept in the file
        raise SystemExit(f"benchmarks/speed.py: {failed}; the {len(results)} finished case(s) are in {out}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
