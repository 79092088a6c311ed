"""Checks the trainer runs before the first training step, so no epoch is lost to a late error.

Everything that can be known before training is checked here: the output folder (writable,
not holding another run), the data (every image of both splits readable; at least one step
per epoch), the probe (sites exist, the recording fits its budget) and, when resuming, that
the checkpoint fits the model and still has epochs to train. Each problem is one
:class:`PreflightError` (or ``BadDataError`` for data) whose message names the flag or file.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from sdetr.config import ModelConfig
from sdetr.data.annotations import SKIP_HINT, BadDataError
from sdetr.data.coco import CocoDetection, describe_bad_images
from sdetr.engine.options import TrainConfig
from sdetr.errors import UserError
from sdetr.instrument.catalog import select_sites
from sdetr.instrument.recorder import DEFAULT_BUDGET_BYTES, estimate_bytes, format_bytes
from sdetr.model.detector import Detector

#: Files that mark a folder as holding a run.
RUN_FILES = ("checkpoint.pth", "log.txt")


class PreflightError(UserError, ValueError):
    """A run that would fail or do nothing, found before its first training step."""


def check_output_dir(config: TrainConfig, checkpoint: Path) -> None:
    """``output_dir`` is (or can be made) a writable folder that holds no other run.

    A folder holding ``checkpoint.pth`` or ``log.txt`` is refused unless the run continues it
    (``resume`` is that checkpoint) or replaces it (``overwrite``). Evaluation only writes
    detections, so it may use a run's folder.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"--output_dir {out} is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PreflightError(f"--output_dir {out} is not writable ({reason}); choose another folder") from None
    if config.eval_only or config.overwrite:
        return
    held = [name for name in RUN_FILES if (out / name).exists()]
    if not held:
        return
    if config.resume is not None and os.path.realpath(config.resume) == os.path.realpath(checkpoint):
        return
    raise PreflightError(
        f"--output_dir {out} already holds a run ({', '.join(held)}); continue it with --resume {checkpoint}, "
        "replace it with --overwrite, or choose another --output_dir"
    )


def clear_run(output_dir: Path) -> list[Path]:
    """Remove the files of an earlier run (``--overwrite``): checkpoint, log, detections, probe recordings."""
    removed = []
    candidates = [output_dir / name for name in (*RUN_FILES, "detections_val.json")]
    recordings = output_dir / "recordings"
    if recordings.is_dir():
        candidates += sorted(recordings.glob("epoch_*.safetensors"))
    for path in candidates:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def check_images(datasets: dict[str, CocoDetection], skip: bool, progress: bool = False) -> list[str]:
    """Every image of every split opens and has its entry's size (headers only).

    Bad files are all listed in one :class:`BadDataError`, or with ``skip`` left out of their
    split, counted and listed in one warning per split.
    Returns:
        notes for the log (one per split with skipped images).
    """
    bad = {split: dataset.find_bad_images(progress=progress) for split, dataset in datasets.items()}
    total = sum(len(items) for items in bad.values())
    if total == 0:
        return []
    if not skip:
        listing = "\n".join(describe_bad_images(items) for items in bad.values() if items)
        raise BadDataError(f"{total} image file(s) cannot be used:\n{listing}\n{SKIP_HINT}")
    notes = []
    for split, items in bad.items():
        if items:
            datasets[split].drop_images(image_id for image_id, _, _ in items)
            note = f"skipped {len(items)} unreadable image(s) of the {split} split:\n{describe_bad_images(items)}"
            warnings.warn(note, stacklevel=2)
            notes.append(note)
    return notes


def train_steps(config: TrainConfig, train_images: int, world_size: int) -> int:
    """Optimiser steps per epoch on each process (the sampler and the loader drop partial batches)."""
    used = train_images if config.max_train_images is None else min(train_images, config.max_train_images)
    return (used // world_size) // config.batch_size


def check_steps(config: TrainConfig, train_images: int, val_images: int, world_size: int) -> None:
    """At least one training step per epoch, and a validation image whenever evaluation or probes run."""
    needs_val = config.eval_only or config.eval_every > 0 or config.probe_sites is not None
    if needs_val and val_images == 0:
        raise PreflightError(
            "the val split has no usable images (after skipping bad data); evaluation and probes need at least one "
            "(--eval_every 0 turns evaluation off)"
        )
    if config.eval_only or train_steps(config, train_images, world_size) > 0:
        return
    used = train_images if config.max_train_images is None else min(train_images, config.max_train_images)
    if used == 0:
        raise PreflightError("the train split has no usable images (after skipping bad data); nothing to train on")
    subset = f" (--max_train_images {config.max_train_images})" if config.max_train_images is not None else ""
    per_process = used // world_size
    fix = (
        f"use --batch_size {per_process} or less"
        if per_process > 0
        else f"use fewer than {world_size} processes or more images"
    )
    raise PreflightError(
        f"an epoch would have 0 training steps: {used} training image(s){subset} over {world_size} process(es) "
        f"with --batch_size {config.batch_size}, and the last partial batch is dropped; {fix}"
    )


def check_classes(model: Detector, datasets: dict[str, CocoDetection]) -> None:
    """Every category id of the data is a class of the model (ids are labels: ``id < num_classes``)."""
    for split, dataset in datasets.items():
        largest = max(dataset.coco.cats)
        if largest >= model.config.num_classes:
            raise PreflightError(
                f"the {split} split has category id {largest}, but the model predicts num_classes="
                f"{model.config.num_classes} (ids 0..{model.config.num_classes - 1}); "
                f"use --set num_classes={largest + 1} or a checkpoint trained on these categories"
            )


def check_probe(model: Detector, config: TrainConfig, val: CocoDetection) -> None:
    """``probe_sites`` matches sites and the probe recording fits the recorder's default budget."""
    if config.probe_sites is None:
        return
    try:
        chosen = select_sites(model, config.probe_sites)
    except KeyError as error:
        raise PreflightError(f"--probe_sites {config.probe_sites!r}: {error.args[0]}") from None
    count = min(config.probe_images, len(val))
    if count == 0:
        return
    sizes = [tuple(val[i][0].shape[-2:]) for i in range(count)]
    padded = (max(h for h, _ in sizes), max(w for _, w in sizes))
    total = sum(estimate_bytes(model, padded, count, list(chosen)).values())
    if total > DEFAULT_BUDGET_BYTES:
        raise PreflightError(
            f"--probe_sites {config.probe_sites!r} with --probe_images {config.probe_images} would record "
            f"{format_bytes(total)}, over the recorder's budget of {format_bytes(DEFAULT_BUDGET_BYTES)}; "
            "choose fewer sites or images"
        )


def config_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """``"hidden_dim: checkpoint 64, this run 32"`` for every architecture field that differs (not the name)."""
    return [f"{name}: checkpoint {old!r}, this run {new!r}" for name, (old, new) in saved.differences(current).items()]


def flag_changes(saved: dict[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Training options that differ between a checkpoint's stored ``train_config`` and this run."""
    ignored = {"resume", "eval_only", "overwrite", "output_dir"}
    current = config.to_dict()
    return {
        name: (saved[name], value)
        for name, value in current.items()
        if name not in ignored and name in saved and saved[name] != value
    }
