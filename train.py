"""Train or evaluate SDETR / DETR. ``python train.py`` trains sdetr-tiny on the embedded set (CPU).

Examples:
    python train.py                                              # CPU quickstart, a few minutes
    torchrun --nproc_per_node=4 train.py --recipe original --coco_path /data/coco
    python train.py --eval --resume outputs/checkpoint.pth
    python train.py --preset sdetr-multihead --set hidden_dim=128 --set dropout=0.0
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sdetr.config import ModelConfig
from sdetr.engine import ORIGINAL_RECIPE, TrainConfig, Trainer, distributed
from sdetr.typed_fields import parse_assignments


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
        default="quickstart",
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
    p.add_argument("--lr_drop", type=int)
    p.add_argument("--batch_size", type=int, help="images per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr_backbone", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--clip_max_norm", type=float)
    p.add_argument(
        "--encoder_loss",
        type=float,
        help="weight of the dense encoder losses (0: the original criterion; default 3.0 for the quickstart)",
    )
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--output_dir")
    p.add_argument("--resume", help="checkpoint to continue from (or to evaluate with --eval)")
    p.add_argument("--eval", dest="eval_only", action="store_true", default=None, help="only evaluate --resume")
    p.add_argument("--eval_every", type=int)
    p.add_argument("--num_workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--skip_bad_data", action="store_true", default=None, help="skip bad annotations and images")
    p.add_argument("--no_augment", dest="augment", action="store_false", default=None)
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


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = dict(ORIGINAL_RECIPE) if args.recipe == "original" else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    values["model_overrides"] = parse_overrides(args.overrides)
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    try:
        Trainer(config).run()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
