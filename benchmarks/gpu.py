"""Full-scale throughput, memory and attention kernels on one CUDA GPU, against the original forward.

Needs a CUDA device (``--device cpu`` runs the same code on the CPU at a tiny scale, to check the
script). Everything runs in one process, on the same random weights (``tests/reference_impl.py``
re-states the original model; its stem and layer1 are frozen as the original training script
froze them, so both sides train the same parameters).

- **Training** at the original recipe's sizes: batches of 4 images whose short side is one of
  the multi-scale resize's 480..800 (step 32), long side at most 1333, COCO-like shapes
  (long / short 4:3 to about 3:2, landscape seven times in ten), padded to the batch's largest
  height and width; 7 random boxes per image (COCO's mean). One step is forward, the DETR
  criterion (Hungarian matching on the CPU, as in training), backward, gradient clipping 0.1 and
  AdamW (the original: foreach; ours: fused, as the trainer does). Images per second come from
  the median over rounds of a fixed list of such batches, variants timed round-robin.
- **Inference** at the validation size (short side 800, long side at most 1333), batch 4,
  ``torch.no_grad``.
- **Memory** of one round per variant: ``peak_gib``, the process's peak
  (``torch.cuda.max_memory_allocated``), which includes every model's weights and the gradients
  and optimiser state created so far (they accumulate as the run goes: the original is measured
  first), and ``round_gib``, that peak less what was allocated when the round began.
- **Attention kernels**: the CUDA kernels of one profiled step whose names belong to a fused
  attention backend, and which SDPA backends accept the model's calls at all.
- **Parity**: the largest output difference of each variant to the original on one batch.

Variants: ``original`` (float32, and under bf16 autocast), ``sdetr`` (float32; bf16 autocast;
``fast`` backbone speed, i.e. folded and channels-last, under bf16; the same compiled with
``--compile``). float32 runs with PyTorch's defaults, printed at the top (cuDNN convolutions may
use TF32; matmuls do not).

Usage: ``python benchmarks/gpu.py [--rounds 5] [--compile] [--output outputs/benchmarks/gpu.json]``.
The reference number: the original run took 56 min per COCO epoch (118287 images) with batch 4
on each of 4 RTX 3090s, i.e. 8.8 training images per second per GPU, data loading included.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import REFERENCE, float_outputs, same_trainable_parameters, targets_for, write_json

from sdetr import SetCriterion, load_model

ORIGINAL_IMAGES_PER_S_PER_GPU = 118287 / (56 * 60) / 4  # 8.8 on RTX 3090s
RECIPE_SHORT_SIDES = tuple(range(480, 801, 32))
VAL_SHORT_SIDE, MAX_LONG_SIDE = 800, 1333
ATTENTION_KERNEL = re.compile(r"flash|fmha|mem_eff|efficient_attention|cudnn.*(sdpa|attention)", re.IGNORECASE)
Batch = tuple[Tensor, Tensor, list[dict[str, Tensor]]]


def image_size(short: int, rng: random.Random) -> tuple[int, int]:
    """(height, width) of one image resized as the recipe does: short side ``short``, long side
    capped at 1333 (the short side shrinks with it). COCO-like shape: long / short drawn from
    4:3..3:2 (seven times in ten) or 4:3..1.52, then landscape seven times in ten (the draws
    that gave the README's numbers)."""
    aspect = rng.uniform(4 / 3, 3 / 2) if rng.random() < 0.7 else rng.uniform(1 / 0.75, 1 / 0.66)
    small, large = float(short), short * aspect
    if large > MAX_LONG_SIDE:
        small, large = small * MAX_LONG_SIDE / large, float(MAX_LONG_SIDE)
    h, w = (small, large) if rng.random() < 0.7 else (large, small)
    return round(h), round(w)


def make_batch(sizes: list[tuple[int, int]], generator: torch.Generator, device: torch.device) -> Batch:
    """Images ``[B, 3, H, W]`` padded bottom-right to the largest size, mask ``[B, H, W]``
    (True on padding), 7 random boxes per image (cxcywh in [0, 1] of the whole padded image)."""
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, height, width)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    targets = []
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        mask[i, :h, :w] = False
        target = targets_for(1, generator, objects=7, min_side=0.02, side_span=0.3)[0]
        targets.append({key: value.to(device) for key, value in target.items()})
    return images.to(device), mask.to(device), targets


def recipe_batches(
    count: int, batch: int, short_sides: tuple[int, ...], seed: int, device: torch.device
) -> list[Batch]:
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    return [
        make_batch([image_size(rng.choice(short_sides), rng) for _ in range(batch)], generator, device)
        for _ in range(count)
    ]


class Variant:
    """One model, its autocast dtype and its optimiser."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, fused: bool, device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=fused)  # the same work; weights kept
        self.criterion = SetCriterion(num_classes=91).to(device)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def train(self, batch: Batch) -> float:
        images, mask, targets = batch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            outputs = self.model(images, mask)
        loss = self.criterion(float_outputs(outputs), targets)["total"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.1)
        self.optimizer.step()
        return float(loss.detach())  # a host sync, as the trainer's logging does

    def infer(self, batch: Batch) -> dict[str, Any]:
        images, mask, _ = batch
        self.model.eval()
        with torch.no_grad(), self.autocast():
            return self.model(images, mask)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(
    variants: dict[str, Variant], run: Callable[[Variant, Batch], Any], batches: list[Batch], rounds: int
) -> dict[str, dict[str, float]]:
    """Round-robin timing: every variant runs the whole list of batches once per round (after
    one warm-up round); images per second from the median round, and the peak memory of a round."""
    device = next(iter(variants.values())).device
    images = sum(b[0].shape[0] for b in batches)
    peak: dict[str, float] = {}
    own: dict[str, float] = {}
    for name, variant in variants.items():  # warm-up round, which also measures memory
        start = float("nan")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device) / 2**30
        for batch in batches:
            run(variant, batch)
        synchronize(device)
        peak[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        own[name] = peak[name] - start
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            synchronize(device)
            start = time.perf_counter()
            for batch in batches:
                run(variant, batch)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "images_per_s": images / statistics.median(t),
            "round_s": statistics.median(t),
            "peak_gib": peak[name],
            "round_gib": own[name],
        }
        for name, t in times.items()
    }


def attention_kernels(variant: Variant, batch: Batch, training: bool) -> dict[str, int]:
    """Names (and launch counts) of fused-attention kernels in one profiled step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if variant.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        variant.train(batch) if training else variant.infer(batch)
        synchronize(variant.device)
    counts: dict[str, int] = {}
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and ATTENTION_KERNEL.search(event.name):
            counts[event.name[:120]] = counts.get(event.name[:120], 0) + 1
        elif event.name.startswith("aten::_scaled_dot_product") or event.name.startswith("aten::_flash"):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def accepting_backends(variant: Variant, batch: Batch) -> dict[str, str]:
    """For each SDPA backend: does the model's inference run with only that backend allowed?"""
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                variant.infer(batch)
            out[backend.name] = "runs"
        except RuntimeError as error:
            out[backend.name] = "refused: " + str(error).strip().splitlines()[0][:200]
    return out


def max_difference(outputs: dict[str, Any], reference: dict[str, Any]) -> float:
    return max(float((outputs[k].float() - reference[k].float()).abs().max()) for k in ("pred_logits", "pred_boxes"))


@contextmanager
def section(name: str, results: dict[str, Any]) -> Iterator[None]:
    """Time a section; record its error instead of losing the sections after it."""
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        yield
    except Exception as error:  # a benchmark reports what failed and goes on
        results.setdefault("errors", {})[name] = traceback.format_exc(limit=4)
        print(f"   {name} failed: {error!r}", flush=True)
    finally:
        results.setdefault("section_s", {})[name] = time.perf_counter() - start


def print_table(results: dict[str, Any], steps: tuple[str, ...]) -> None:
    """Images per second, the ratio to the original's float32 and to the original run's 8.8
    training images per second per RTX 3090 (compute only here; that run's figure includes data
    loading and 4-GPU gradient averaging), the process's peak memory and the round's own."""
    print(
        f"\n{results['device']}, torch {results['torch']}; original run: {ORIGINAL_IMAGES_PER_S_PER_GPU:.1f} img/s/GPU"
    )
    print(f"{'step':<18} {'variant':<26} {'img/s':>8} {'x orig':>7} {'x 3090':>7} {'peak GiB':>9} {'round GiB':>10}")
    for step in steps:
        base = results.get(step.removeprefix("compiled_"), {}).get("original fp32", {}).get("images_per_s")
        for name, row in results.get(step, {}).items():
            ratio = row["images_per_s"] / base if base else float("nan")
            vs_3090 = row["images_per_s"] / ORIGINAL_IMAGES_PER_S_PER_GPU if "training" in step else float("nan")
            print(
                f"{step:<18} {name:<26} {row['images_per_s']:>8.1f} {ratio:>6.2f}x {vs_3090:>6.2f}x "
                f"{row['peak_gib']:>9.2f} {row['round_gib']:>10.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train_batches", type=int, default=8, help="recipe-sized batches per round")
    parser.add_argument("--eval_batches", type=int, default=4, help="validation-sized batches per round")
    parser.add_argument("--scale", type=float, default=1.0, help="image side scale (e.g. 0.2 for a CPU check)")
    parser.add_argument("--compile", action="store_true", help="add the compiled fast bf16 variant")
    parser.add_argument("--output", default="outputs/benchmarks/gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine (or --device cpu --scale 0.2)")
    out = Path(args.output)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "rounds": args.rounds,
    }
    print(json.dumps(results), flush=True)

    def save() -> None:
        write_json(out, results)

    short_sides = tuple(max(32, round(s * args.scale)) for s in RECIPE_SHORT_SIDES)
    train_batches = recipe_batches(args.train_batches, 4, short_sides, seed=0, device=device)
    eval_batches = recipe_batches(args.eval_batches, 4, (round(VAL_SHORT_SIDE * args.scale),), seed=1, device=device)
    results["train_batch_shapes"] = [list(b[0].shape) for b in train_batches]
    results["eval_batch_shapes"] = [list(b[0].shape) for b in eval_batches]

    torch.manual_seed(0)
    reference = REFERENCE.freeze_like_original_(REFERENCE.randomize_(REFERENCE.RefSDETR(), seed=1))
    state = reference.state_dict()
    ours = load_model(state).to(device)
    fast = load_model(state, speed="fast").to(device)
    results["trainable_parameters"] = same_trainable_parameters(
        {"original": reference, "sdetr": ours}, "benchmarks/gpu.py"
    )
    reference.to(device)
    variants = {
        "original fp32": Variant(reference, None, fused=False, device=device),
        "original bf16": Variant(reference, torch.bfloat16, fused=False, device=device),
        "sdetr fp32": Variant(ours, None, fused=True, device=device),
        "sdetr bf16": Variant(ours, torch.bfloat16, fused=True, device=device),
        "sdetr fast bf16": Variant(fast, torch.bfloat16, fused=True, device=device),
    }

    with section("parity", results):
        batch = eval_batches[0]
        reference_out = variants["original fp32"].infer(batch)
        results["max_abs_output_diff"] = {
            name: max_difference(v.infer(batch), reference_out) for name, v in variants.items()
        }
        print("   ", results["max_abs_output_diff"], flush=True)
    with section("attention kernels", results):
        results["attention_kernels"] = {
            f"{name} {mode}": attention_kernels(variants[name], train_batches[0], training=mode == "train")
            for name in ("sdetr fp32", "sdetr bf16")
            for mode in ("eval", "train")
        }
        results["sdpa_backends_accepting"] = {
            name: accepting_backends(variants[name], eval_batches[0]) for name in ("sdetr fp32", "sdetr bf16")
        }
        print("   ", json.dumps(results["attention_kernels"], indent=1), flush=True)
        print("   ", results["sdpa_backends_accepting"], flush=True)
    save()
    with section("inference", results):
        results["inference"] = images_per_second(variants, Variant.infer, eval_batches, args.rounds)
    save()
    with section("training", results):
        results["training"] = images_per_second(variants, Variant.train, train_batches, args.rounds)
    save()
    print_table(results, ("inference", "training"))
    if args.compile:
        with section("compiled", results):
            compiled = load_model(state, speed="fast", compile=True).to(device)
            pair = {"sdetr fast bf16": variants["sdetr fast bf16"]}
            pair["sdetr fast bf16 compiled"] = Variant(compiled, torch.bfloat16, fused=True, device=device)
            start = time.perf_counter()
            pair["sdetr fast bf16 compiled"].infer(eval_batches[0])
            results["compile_first_inference_s"] = time.perf_counter() - start
            results["compiled_inference"] = images_per_second(pair, Variant.infer, eval_batches, args.rounds)
            save()
            start = time.perf_counter()
            pair["sdetr fast bf16 compiled"].train(train_batches[0])
            results["compile_first_train_s"] = time.perf_counter() - start
            results["compiled_training"] = images_per_second(pair, Variant.train, train_batches, args.rounds)
        save()
        print_table(results, ("compiled_inference", "compiled_training"))

    print(f"wrote {out}")


if __name__ == "__main__":
    main()
