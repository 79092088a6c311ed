"""Time to load a training batch of the synthetic set, with and without the sample cache.

``train.py`` keeps each synthetic training sample in memory after its first transform when the
run does not augment (``CocoDetection(cache_samples=True)``, the quickstart's case): later epochs
skip the resize and the normalisation. This script builds the quickstart's data as ``train.py``
does (flags after ``--`` change it), fills both caches with one pass, then times passes over the
first ``--images`` training images (batches of the run's size, through a ``DataLoader`` in the
training process, as the trainer loads them) interleaved in one process with ``benchmarks/speed.py``'s
``interleaved``: the images decoded once and transformed every time (the previous default), and
the samples cached. Prints milliseconds per batch and the ratio, and writes them as JSON.

Usage::

    python benchmarks/data_loading.py [--images 320] [--rounds 5] [--low_res] [-- TRAIN_FLAGS...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from sdetr.data import CocoDetection, collate
from sdetr.engine import build_data
from sdetr.engine.distributed import DistributedContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import interleaved, machine_info, write_json  # benchmarks/speed.py (this script's folder is on the path)

from train import config_from_args  # the repository's CLI (importable through the path inserted above)


def ways_of_loading(flags: list[str], low_res: bool) -> dict[str, CocoDetection]:
    """The run's train split (its small view with ``low_res``) read two ways: ``"transformed"``
    (images decoded once, samples transformed at every read) and ``"cached"`` (the run's own,
    samples cached).

    Raises:
        SystemExit: the run caches no samples (it augments, reads COCO or loads in workers).
    """
    config = config_from_args([*flags, "--output_dir", "outputs/benchmarks/data_loading"])
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cached = build_data(config, ctx).train_split(low_res)
    if cached.samples is None:
        raise SystemExit(
            "this run caches no samples: it augments its training images, reads COCO or loads in worker processes"
        )
    transformed = CocoDetection(cached.paths, cached.transforms, cached.on_bad_data, cache_decoded=True)
    return {"transformed": transformed, "cached": cached}


def measure(flags: list[str], images: int, rounds: int, low_res: bool) -> dict[str, Any]:
    """Median milliseconds per batch, transformed every time against cached (see the module doc).

    Raises:
        SystemExit: a run that caches no samples, or fewer images than one batch.
    """
    ways = ways_of_loading(flags, low_res)
    batch_size = config_from_args(flags).batch_size
    count = min(images, len(ways["cached"]))
    if count < batch_size:
        raise SystemExit(f"{count} training images are less than one batch of {batch_size}")

    def one_pass(dataset: CocoDetection) -> Any:
        loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, collate_fn=collate)

        def run() -> None:
            for _ in loader:
                pass

        return run

    per_pass = interleaved({name: one_pass(dataset) for name, dataset in ways.items()}, rounds)
    batches = count // batch_size + (count % batch_size > 0)
    return {
        **machine_info(),
        "images": count,
        "batch_size": batch_size,
        "batches_per_pass": batches,
        "size": "low_res" if low_res else "full",
        "rounds": rounds,
        "ms_per_batch": {name: 1000 * seconds / batches for name, seconds in per_pass.items()},
    }


def report(result: dict[str, Any]) -> str:
    """Milliseconds per batch of each way, and the cached one's ratio to transforming every time."""
    times = result["ms_per_batch"]
    return (
        f"{result['batches_per_pass']} batches of {result['batch_size']} per pass, {result['size']} size\n"
        f"{times['transformed']:8.2f} ms per batch  transformed every epoch (decoded once)\n"
        f"{times['cached']:8.2f} ms per batch  cached samples ({times['cached'] / times['transformed']:.3f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("flags", nargs="*", help="train.py flags of the run (after --)")
    parser.add_argument("--images", type=int, default=320, help="training images per pass (default 320)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes of each way after a warm-up")
    parser.add_argument("--low_res", action="store_true", help="the small size of progressive resizing")
    parser.add_argument("--output", default="outputs/benchmarks/data_loading.json")
    args = parser.parse_args()
    result = measure(args.flags, args.images, args.rounds, args.low_res)
    print(report(result))
    print(f"wrote {write_json(args.output, result)}")


if __name__ == "__main__":
    main()
