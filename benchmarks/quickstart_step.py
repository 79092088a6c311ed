"""Training-step time of ``train.py`` variants, interleaved step by step in one process.

Each variant is a string of ``train.py`` flags (the first one is the reference; ``""`` is the
default quickstart). Every variant gets its own :class:`~sdetr.engine.Trainer`, built as
``train.py`` builds it (model, data, criterion, optimiser, EMA, denoising queries), from the same
seed. The batches are the reference's first ``--images`` training images at full size (or the
small size of progressive resizing with ``--low_res``), loaded once; then every batch is given to
every variant's :meth:`~sdetr.engine.Trainer.train_step` (forward, criterion, backward, clipping,
optimiser and EMA updates: the whole step but loading the batch), round after round, each round
in its own random order (``benchmarks/speed.py``'s ``interleaved``). On this project's noisy
2-core machine, times of one variant measured minutes apart from another's differ by up to a
fifth; interleaved, the drift hits all alike. Prints the median milliseconds per step of each
variant and its ratio to the reference, and writes them as JSON.

Usage (``--`` ends the script's own options: every argument after it is a variant)::

    python benchmarks/quickstart_step.py [--images 160] [--rounds 3] [--low_res] -- \\
        "" "--denoising_groups 0" "--set backbone_width=1 --set backbone_stem=resnet"

What a variant's flags change is its trainer: the model, criterion, training aids, optimiser and
precision. The batches are the reference's for all (its data, batch size, augmentation and
sizes), and so is the epoch that sets one-to-many matching (the first full-size epoch, or the
first small one with ``--low_res``), so flags of the data or the schedule have no effect here.
Variants whose models differ in architecture start from different random weights, so their
losses differ; the steps' cost barely depends on the weights. Written for the CPU: on a GPU the
passes end with ``torch.cuda.synchronize()`` so that the time is the kernels'.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from sdetr.data import collate
from sdetr.engine import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed import interleaved, machine_info, write_json  # benchmarks/speed.py (this script's folder is on the path)

from train import config_from_args  # the repository's CLI (importable through the path inserted above)


def build_trainer(flags: str, images: int, output_dir: Path) -> Trainer:
    """The trainer ``train.py FLAGS`` would build, on the first ``images`` training images,
    writing nothing outside ``output_dir``."""
    config = config_from_args([*shlex.split(flags), "--output_dir", str(output_dir), "--overwrite"])
    config.max_train_images = images
    return Trainer.from_config(config)


def optimizer_steps(trainer: Trainer) -> int:
    """How many updates the trainer's optimiser has made (AdamW's per-parameter step count)."""
    states = list(trainer.optimizer.state.values())
    return int(states[0]["step"]) if states else 0


def measure(variants: list[str], images: int, rounds: int, low_res: bool) -> dict[str, Any]:
    """Median milliseconds per training step of each variant over the same batches (see the module doc).

    Raises:
        SystemExit: fewer training images than one batch; ``low_res`` without progressive resizing.
    """
    with tempfile.TemporaryDirectory() as folder:
        trainers = {flags: build_trainer(flags, images, Path(folder) / str(i)) for i, flags in enumerate(variants)}
        reference = trainers[variants[0]]
        if low_res and reference.config.low_res_epochs == 0:
            raise SystemExit("--low_res needs a reference with progressive resizing (low_res_epochs > 0)")
        epoch = 0 if low_res else reference.config.low_res_epochs  # the first small / full-size epoch
        data = reference.data.train_split(low_res)
        split = Subset(data, range(min(images, len(data))))
        batches = list(DataLoader(split, batch_size=reference.config.batch_size, collate_fn=collate, drop_last=True))
        if not batches:
            raise SystemExit(f"{len(split)} training images are less than one batch of {reference.config.batch_size}")

        def one_pass(trainer: Trainer) -> Callable[[], None]:
            def run() -> None:
                for batch_images, targets in batches:
                    trainer.train_step(batch_images, targets, epoch)
                if trainer.ctx.device.type == "cuda":
                    torch.cuda.synchronize(trainer.ctx.device)

            return run

        per_pass = interleaved({flags: one_pass(trainer) for flags, trainer in trainers.items()}, rounds)
    steps = len(batches)
    return {
        "parameters": {flags: trainer.n_parameters for flags, trainer in trainers.items()},
        "optimizer_steps": {flags: optimizer_steps(trainer) for flags, trainer in trainers.items()},
        **machine_info(),
        "images": images,
        "steps_per_pass": steps,
        "size": "low_res" if low_res else "full",
        "rounds": rounds,
        "ms_per_step": {flags: 1000 * seconds / steps for flags, seconds in per_pass.items()},
    }


def report(result: dict[str, Any]) -> str:
    """One line per variant: median ms per step and the ratio to the reference (the first)."""
    times = result["ms_per_step"]
    reference = next(iter(times.values()))
    lines = [f"{result['steps_per_pass']} steps per pass, {result['size']} size, {result['threads']} threads"]
    lines += [f"{ms:8.1f} ms  {ms / reference:5.3f}x  {flags or '(default)'}" for flags, ms in times.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("variants", nargs="+", help='train.py flags of each variant, quoted ("" = defaults)')
    parser.add_argument("--images", type=int, default=160, help="training images per pass (default 160)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per variant after a warm-up")
    parser.add_argument("--low_res", action="store_true", help="the small size of progressive resizing")
    parser.add_argument("--output", default="outputs/benchmarks/quickstart_step.json")
    args = parser.parse_args()
    if len(set(args.variants)) != len(args.variants):
        parser.error("each variant must differ from the others")
    result = measure(args.variants, args.images, args.rounds, args.low_res)
    print(report(result))
    print(f"wrote {write_json(args.output, result)}")


if __name__ == "__main__":
    main()
