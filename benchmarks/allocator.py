"""How glibc's allocator settings change CPU inference time, for the original code and the project.

Large activations (tens of MB at 800x1333) are, by default, allocated with ``mmap`` and returned
to the system when freed, so every forward pays fresh page faults. glibc reads its settings from
the environment at start-up, so each setting runs in its own child process; the children are
interleaved round by round (setting A, B, C, A, B, C, ...), each timing the original forward and
the project's default (``load_model``) on the same weights, eval mode, ``torch.no_grad``:

- ``glibc default``: nothing set;
- ``mmap threshold 32 MiB``: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=64 GiB``
  (blocks up to 32 MiB, glibc's ceiling for this setting, come from the heap and stay there);
- ``no mmap``: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=64 GiB`` (every block from the heap,
  freed memory kept for the process's life).

Prints the median time of each, the ratios to the original under glibc's default, and each
child's peak resident memory. Linux with glibc only. Usage:
``python benchmarks/allocator.py [--rounds 2] [--cases sdetr:800x1333x1 sdetr:512x512x2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import REFERENCE, eval_step, interleaved, write_json

from sdetr import load_model

TRIM = str(64 * 2**30)
SETTINGS: dict[str, dict[str, str]] = {
    "glibc default": {},
    "mmap threshold 32 MiB": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": TRIM},
    "no mmap": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": TRIM},
}
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


def child(case: str, steps: int) -> dict[str, Any]:
    """Time the original and the default ``steps`` times each, interleaved, after one warm-up."""
    preset, size = case.split(":")
    height, width, batch = (int(v) for v in size.split("x"))
    reference = REFERENCE.randomize_(REFERENCE.RefSDETR() if preset == "sdetr" else REFERENCE.RefDETR(), seed=1)
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    runs = {
        "original": eval_step(reference, images, mask),
        "sdetr": eval_step(load_model(reference.state_dict()), images, mask),
    }
    median_s = interleaved(runs, steps)
    return {
        "median_s": median_s,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def run_child(case: str, steps: int, setting: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES} | setting
    command = [sys.executable, __file__, "--child", case, "--steps", str(steps)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="child processes per setting")
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per model in each child")
    parser.add_argument("--cases", nargs="*", default=["sdetr:800x1333x1", "sdetr:512x512x2"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="outputs/benchmarks/allocator.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    if not sys.platform.startswith("linux"):
        sys.exit("benchmarks/allocator.py: glibc's allocator settings exist on Linux only")
    results: list[dict[str, Any]] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'original':>9} {'sdetr':>9} {'x orig':>7} {'orig x':>7} {'sdetr x':>8} {'peak RSS':>9}"
    print(f"{'case':<18} {'setting':<22} {header}")
    for case in args.cases:
        children: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, setting in SETTINGS.items():
                children[name].append(run_child(case, args.steps, setting))
        medians = {
            name: {m: statistics.median(c["median_s"][m] for c in runs) for m in ("original", "sdetr")}
            for name, runs in children.items()
        }
        base = medians["glibc default"]
        for name, median in medians.items():
            rss = max(c["max_rss_gib"] for c in children[name])
            print(
                f"{case:<18} {name:<22} {median['original'] * 1e3:>7.0f}ms {median['sdetr'] * 1e3:>7.0f}ms "
                f"{median['original'] / median['sdetr']:>6.2f}x {base['original'] / median['original']:>6.2f}x "
                f"{base['sdetr'] / median['sdetr']:>7.2f}x {rss:>5.2f}GiB"
            )
        results.append({"case": case, "median_s": medians, "children": children})
    print("x orig: original / sdetr in the same setting; orig x, sdetr x: glibc default's time / this setting's")
    out = write_json(args.output, {"rounds": args.rounds, "steps": args.steps, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
