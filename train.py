"""Train or evaluate SDETR / DETR. ``python train.py`` trains sdetr-tiny on the embedded set (CPU).

Examples:
    python train.py                                              # CPU quickstart, under 10 minutes
    torchrun --nproc_per_node=4 train.py --recipe original --coco_path /data/coco
    python train.py --eval --resume outputs/checkpoint.pth
    python train.py --preset sdetr-multihead --set hidden_dim=128 --set dropout=0.0
    python train.py --resume outputs/checkpoint.pth --epochs 25     # continue a run (its options, these flags win)

Errors in flags, data or files are printed as one message (exit status 2); Ctrl-C prints where
the last checkpoint is and the command that resumes from it (exit status 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sdetr.checkpoints import CheckpointError, read_checkpoint
from sdetr.config import ConfigError, ModelConfig, get_config
from sdetr.engine import BEFORE_THE_OPTION, ORIGINAL_RECIPE, TrainConfig, Trainer, distributed
from sdetr.errors import USER_ERROR_EXIT, UserError
from sdetr.typed_fields import parse_assignments

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["hidden_dim=128", "norm_first=false"]`` -> model config overrides, parsed by each field's type.

    Raises:
        ConfigError: an unknown field (with the closest one) or a value that is not of the field's type.
    """
    return parse_assignments(ModelConfig, items)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipe",
        choices=["quickstart", "original"],
        default=None,
        help="'original': the paper's 150-epoch COCO run (flags given explicitly still win)",
    )
    p.add_argument("--preset", help=f"model preset (default {defaults.preset})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="model config override, repeatable",
    )
    p.add_argument("--coco_path", help="COCO folder (annotations/, train2017/, val2017/); default: synthetic set")
    p.add_argument("--scale", choices=["full", "tiny", "synthetic"], help="augmentation / resize scale")
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--low_res_epochs",
        type=int,
        help="progressive resizing: train the first N epochs at --low_res_factor x the sizes "
        f"(0: off; default {defaults.low_res_epochs})",
    )
    p.add_argument(
        "--low_res_factor", type=float, help=f"size factor of the --low_res_epochs (default {defaults.low_res_factor})"
    )
    p.add_argument("--schedule", choices=["step", "cosine"], help="learning-rate schedule, per optimiser step")
    p.add_argument("--lr_drop", type=int, help="epochs between x0.1 decays (--schedule step)")
    p.add_argument("--warmup_steps", type=int, help="linear learning-rate warm-up steps (0: none)")
    p.add_argument("--batch_size", type=int, help="images per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr_backbone", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--clip_max_norm", type=float)
    p.add_argument(
        "--encoder_loss",
        type=float,
        help="weight of the dense encoder losses (0: the original criterion; default 6.0 for the quickstart)",
    )
    p.add_argument("--one_to_many", type=int, help="queries matched to each object in the first epochs (1: one-to-one)")
    p.add_argument("--one_to_many_epochs", type=int, help="epochs of --one_to_many matching before one-to-one")
    p.add_argument(
        "--denoising_groups",
        type=int,
        help="groups of DN-DETR denoising queries in training (0: off, the original recipe; default 20)",
    )
    p.add_argument(
        "--contrastive_denoising",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also a negative copy of each object per denoising group, to predict 'no object' (DINO; default off)",
    )
    p.add_argument(
        "--query_groups",
        type=int,
        help="groups of object queries in training, the model's own included (Group DETR; 1: off, the default)",
    )
    p.add_argument(
        "--ema_decay",
        type=float,
        help="evaluate and save an EMA of the weights with this decay (0: off, the original recipe; default 0.99)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast precision of training steps (default auto: bf16 where the CPU/GPU runs it natively, "
        "else fp32; evaluation is always float32)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the backbone and stages (opt-in; compiling takes minutes, see the README's Speed)",
    )
    p.add_argument("--output_dir")
    p.add_argument(
        "--resume",
        help="checkpoint to continue from (its run's options are the defaults, flags given win) or to --eval",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace the run already in --output_dir (its checkpoint, log, detections and recordings)",
    )
    p.add_argument("--eval", dest="eval_only", action="store_true", default=None, help="only evaluate --resume")
    p.add_argument("--eval_every", type=int)
    p.add_argument("--num_workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--skip_bad_data", action="store_true", default=None, help="skip bad annotations and images")
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="DETR's augmentation of the train split (default: on for COCO, off on the synthetic set)",
    )
    p.add_argument("--no_augment", dest="augment", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--max_train_images", type=int)
    p.add_argument("--synthetic_seed", type=int)
    p.add_argument("--synthetic_train", type=int, help="images in the synthetic train split")
    p.add_argument("--synthetic_val", type=int, help="images in the synthetic val split")
    p.add_argument(
        "--synthetic_any_colour",
        dest="synthetic_class_hues",
        action="store_false",
        default=None,
        help="synthetic shapes in any colour, not their class's hue band (harder)",
    )
    p.add_argument("--probe_sites", help="record these attention sites on a fixed val batch (glob)")
    p.add_argument("--probe_every", type=int, help="epochs between probe recordings")
    p.add_argument("--probe_images", type=int)
    return p


def resumed_options(path: str) -> dict[str, Any]:
    """The training options stored in a checkpoint (the defaults of a resumed run); {} for original files.
    An option the checkpoint predates takes the value its run trained with (``BEFORE_THE_OPTION``).

    Raises:
        CheckpointError: an unreadable checkpoint, or stored options that are not valid.
    """
    state = read_checkpoint(Path(path))
    saved = state.get("train_config") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        return {}
    per_run = {"resume", "eval_only", "overwrite", "output_dir"}
    known = {k: v for k, v in saved.items() if k in TRAIN_FIELDS and k not in per_run}
    known = {**{k: v for k, v in BEFORE_THE_OPTION.items() if k not in saved}, **known}  # as that run trained
    try:
        TrainConfig.from_dict(known)
    except ConfigError as error:
        raise CheckpointError(f"{path}: its stored training options are not valid ({error})") from None
    changed = _preset_changes(state.get("config"), known)
    if changed:  # the preset changed since (sdetr-tiny's backbone did): keep the checkpoint's model
        known["model_overrides"] = {**changed, **known.get("model_overrides", {})}
    return known


def _preset_changes(stored: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The scalar model fields where a checkpoint's stored model differs from what its options'
    preset and overrides build today (``num_classes`` aside: it comes from the data); {} when they
    cannot be compared. ``stages`` differences are left to the trainer's check, which names them."""
    if not isinstance(stored, dict) or "preset" not in options:
        return {}
    try:
        saved = ModelConfig.from_dict(stored)
        today = get_config(options["preset"], **options.get("model_overrides", {}))
    except ConfigError:
        return {}  # the trainer reports an invalid stored config with the file's name
    return {name: old for name, (old, _) in saved.differences(today).items() if name not in ("num_classes", "stages")}


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> :class:`TrainConfig`. With ``--resume`` (training), the checkpoint's options are the
    defaults and the flags given explicitly win (the trainer prints each difference)."""
    args = build_parser().parse_args(argv)
    explicit = {k: v for k, v in vars(args).items() if k in TRAIN_FIELDS and v is not None}
    overrides = parse_overrides(args.overrides)
    values: dict[str, Any] = {}
    if args.resume and not args.eval_only:
        values.update(resumed_options(args.resume))
        explicit.setdefault("output_dir", str(Path(args.resume).parent))  # continue in the run's folder
    if args.recipe == "original":
        values.update(ORIGINAL_RECIPE)
    values.update(explicit)
    values["model_overrides"] = {**values.get("model_overrides", {}), **overrides}
    return TrainConfig(**values)


#: Errors of the user's input: printed without a traceback (other exceptions are bugs and keep theirs).
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def resume_hint(trainer: Trainer | None, argv: list[str]) -> str:
    """What to tell the user after Ctrl-C: the last checkpoint and the command that continues from it."""
    if trainer is None or trainer.last_checkpoint is None:
        return "interrupted before a checkpoint was written; nothing to resume (run the command again)"
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--resume", "--output_dir"):
            skip_next = True
        elif not arg.startswith(("--resume=", "--output_dir=")) and arg != "--overwrite":
            kept.append(arg)
    command = shlex.join(["python", "train.py", *kept, "--resume", str(trainer.last_checkpoint)])
    return (
        f"interrupted; the last checkpoint is {trainer.last_checkpoint} (epoch {trainer.last_epoch} finished). "
        f"Continue with:\n  {command}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0, 2 for a user error, 130 for Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    rank = int(os.environ.get("RANK", "0"))
    prefix = "train.py: " if rank == 0 else f"train.py [rank {rank}]: "
    trainer: Trainer | None = None
    try:
        trainer = Trainer.from_config(config_from_args(argv))
        trainer.run()
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\n{prefix}{resume_hint(trainer, argv)}", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        print(f"{prefix}error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
