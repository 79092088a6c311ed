"""Cost of head gates (``sdetr.gate_heads``), measured side by side in one run (CPU).

Gates act on the per-head outputs, so gated sites keep the fused attention path. This prints
three timings of the same model and input, interleaved round by round so that machine noise
hits all of them alike, and their ratios:
- ``plain``: the forward with nothing attached;
- ``gated_ones``: every site gated with ones (``gate_heads(model, sites="*")``; target: within
  5 % of ``plain``);
- ``one_head_zero``: one head of the first multi-head encoder site gated to 0.

Usage: ``python benchmarks/gated_forward.py [--presets sdetr sdetr-tiny] [--size 384 512] [--rounds 15] [--threads N]``.
Writes the numbers as JSON to ``outputs/benchmarks/gated_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sdetr import Detector, build_model, gate_heads, sites

Setup = Callable[[], AbstractContextManager[object]]


def one_head_off(model: Detector) -> tuple[str, list[float]]:
    """The first encoder site with more than one head (any site otherwise) and gates with head 0 off."""
    infos = sites(model)
    info = next((i for i in infos if i.kind == "encoder_self" and i.heads > 1), infos[0])
    return info.name, [0.0] + [1.0] * (info.heads - 1)


def time_preset(preset: str, size: tuple[int, int], rounds: int) -> dict[str, Any]:
    """Median forward seconds of ``preset`` at ``size`` (batch 1) in the three variants, interleaved."""
    torch.manual_seed(0)
    model = build_model(preset).eval()
    images = torch.randn(1, 3, *size)
    site, gate = one_head_off(model)
    variants: dict[str, Setup] = {
        "plain": nullcontext,
        "gated_ones": lambda: gate_heads(model, sites="*"),
        "one_head_zero": lambda: gate_heads(model, {site: gate}),
    }

    def run(setup: Setup) -> float:
        with torch.no_grad(), setup():
            start = time.perf_counter()
            model(images)
            return time.perf_counter() - start

    for setup in variants.values():  # warm-up
        run(setup)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(rounds), desc=f"{preset} rounds"):
        for name, setup in variants.items():
            times[name].append(run(setup))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "preset": preset,
        "input": list(size),
        "rounds": rounds,
        "ablated_site": site,
        "median_seconds": median,
        "gated_ones_over_plain": median["gated_ones"] / median["plain"],
        "one_head_zero_over_plain": median["one_head_zero"] / median["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["sdetr", "sdetr-tiny"])
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", default="outputs/benchmarks/gated_forward.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    results = [time_preset(preset, tuple(args.size), args.rounds) for preset in args.presets]
    for result in results:
        median = result["median_seconds"]
        print(f"{result['preset']} at {args.size[0]}x{args.size[1]}, {args.rounds} interleaved rounds, median forward:")
        for name, value in median.items():
            print(f"  {name:<14} {value * 1000:8.1f} ms")
        print(f"  gated ones / plain     = {result['gated_ones_over_plain']:.3f}  (target: within 5 %)")
        ratio, site = result["one_head_zero_over_plain"], result["ablated_site"]
        print(f"  one head zero / plain  = {ratio:.3f}  ({site}, head 0)")
    payload = {
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
