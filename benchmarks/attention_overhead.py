"""Cost of the attention instrumentation, measured side by side in one run (CPU).

Prints three timings of the same model and input, interleaved round by round so that machine
noise hits all of them alike, and their ratios:
- ``stripped``: Attention.forward replaced by a fused-only copy with no probe check at all
  (the instrumentation removed);
- ``normal``: the shipped forward with nothing attached (target: <= 2 % over ``stripped``);
- ``record all``: every site recorded (q, k, v, a as float16 on the CPU).

Usage: ``python benchmarks/attention_overhead.py [--preset sdetr] [--size 384 512] [--rounds 15]``.
Writes the numbers as JSON to ``outputs/benchmarks/attention_overhead.json``.
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

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from sdetr import build_model, record
from sdetr.model.attention import Attention, blocked_pairs


def stripped_forward(
    self: Attention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Attention.forward without the probe check: always fused."""
    q, k, v = self.project(query, key, value)  # [B, heads, L, d]
    blocked = blocked_pairs(key_padding_mask, attn_mask)
    heads_out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if blocked is None else ~blocked)
    batch, _, length, _ = heads_out.shape
    return self.out_proj(heads_out.transpose(1, 2).reshape(batch, length, self.embed_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdetr")
    parser.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", default="outputs/benchmarks/attention_overhead.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.preset).eval()
    images = torch.randn(1, 3, *args.size)
    shipped_forward = Attention.forward

    def run(setup: Callable[[], AbstractContextManager[object]], patch: bool) -> float:
        Attention.forward = stripped_forward if patch else shipped_forward  # type: ignore[method-assign]
        try:
            with torch.no_grad(), setup():
                start = time.perf_counter()
                model(images)
                return time.perf_counter() - start
        finally:
            Attention.forward = shipped_forward  # type: ignore[method-assign]

    variants: dict[str, tuple[Callable[[], AbstractContextManager[object]], bool]] = {
        "stripped": (nullcontext, True),
        "normal": (nullcontext, False),
        "record_all": (lambda: record(model), False),
    }
    for setup, patch in variants.values():  # warm-up
        run(setup, patch)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, (setup, patch) in variants.items():
            times[name].append(run(setup, patch))

    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "preset": args.preset,
        "input": list(args.size),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "median_seconds": median,
        "normal_over_stripped": median["normal"] / median["stripped"],
        "record_all_over_normal": median["record_all"] / median["normal"],
    }
    print(f"{args.preset} at {args.size[0]}x{args.size[1]}, {args.rounds} interleaved rounds, median forward:")
    for name, value in median.items():
        print(f"  {name:<11} {value * 1000:8.1f} ms")
    print(f"normal / stripped    = {result['normal_over_stripped']:.3f}  (instrumentation overhead when off)")
    print(f"record all / normal  = {result['record_all_over_normal']:.3f}  (cost of recording every site)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
