"""The training run's typed configuration (the CLI in ``train.py`` only fills this in)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sdetr.config import get_config
from sdetr.data.transforms import SCALES
from sdetr.engine.schedule import ScheduleName
from sdetr.typed_fields import ConfigError, check_fields, field_types, unknown_field_message

#: The smallest image side progressive resizing may train at: one cell of the backbone's stride-32 grid.
MIN_LOW_RES_SIDE = 32

#: Autocast precision of the training forward; "auto" is bf16 where the device runs it natively, else fp32.
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Everything a training or evaluation run needs besides the model preset.

    Defaults are the CPU quickstart (``python train.py``): ``sdetr-tiny`` on the embedded
    synthetic set. The original 4-GPU recipe is ``ORIGINAL_RECIPE`` below.
    """

    preset: str = "sdetr-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    coco_path: str | None = None  # None: the embedded synthetic set
    synthetic_seed: int = 0
    synthetic_train: int = 1200  # images in the synthetic train split
    synthetic_val: int = 200
    synthetic_class_hues: bool = True  # False: shapes in any colour (class only from outline; harder)
    scale: str | None = None  # transforms scale preset; None: "synthetic" or "full" by dataset
    # DETR's augmentation of the train split; None: on for COCO, off on the embedded synthetic set
    # (the 10-minute quickstart underfits: without augmentation it reaches about twice the AP50).
    augment: bool | None = None
    skip_bad_data: bool = False
    # Progressive resizing: the first ``low_res_epochs`` epochs train at ``low_res_factor`` x the
    # scale's sizes (cheaper steps), the rest and every evaluation at full size; 0 is off (the
    # original recipe). The quickstart's first 12 of 21 epochs at short side 128 instead of 160 take
    # about 0.8x the time each (0.77x with ResNet-18, 0.85x with today's model), so more epochs fit the 10 minutes: with
    # ResNet-18, 13 where 12 did, AP50 0.416 -> 0.480 (docs/results.md).
    low_res_epochs: int = 12
    low_res_factor: float = 0.8
    max_train_images: int | None = None  # a subset, for quick experiments and tests
    epochs: int = 21  # the CPU quickstart: fits 10 minutes on 2 cores (README, "Training and evaluation")
    schedule: ScheduleName = "step"  # per optimiser step: "step" (x0.1 every lr_drop epochs) or "cosine"
    lr_drop: int = 20  # the quickstart: the rate / 10 for its last epoch
    # Linear learning-rate warm-up over the first steps. The quickstart's 150 (two epochs) let batch
    # 16 train at lr 1e-3: AP50 0.391 -> 0.416 against 5e-4 without warm-up (docs/results.md).
    warmup_steps: int = 150
    # Images per process. The quickstart's 16: with ResNet-18, an epoch took 45 s instead of batch
    # 4's 68 s on 2 cores (larger matrix products); measured with 12 full-size epochs against batch
    # 4's 8 in the same time, AP50 0.391 against 0.343 at lr 5e-4 (docs/results.md), though per epoch batch 16
    # learns less.
    batch_size: int = 16
    lr: float = 1e-3
    lr_backbone: float = 1e-3  # the tiny backbone trains from scratch: same rate
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    # Weight of the dense encoder losses (sdetr.model.encoder_loss): the from-scratch quickstart
    # needs them to leave DETR's initial plateau in minutes; 0 is the original criterion.
    # (Measured in 8 quickstart epochs: weight 6 reaches AP50 0.343 where 3 reaches 0.248.)
    encoder_loss: float = 6.0
    # One-to-many matching in the first epochs (H-DETR's hybrid epoch scheme): each object is
    # matched to up to ``one_to_many`` queries for ``one_to_many_epochs`` epochs, then one-to-one.
    one_to_many: int = 3
    one_to_many_epochs: int = 3
    # Evaluate and save an exponential moving average of the weights (sdetr.engine.averaging), its
    # decay warmed up from 0.1 to this; 0 is off (the original recipe).
    ema_decay: float = 0.99
    # Denoising queries (DN-DETR, sdetr.model.denoising): noisy copies of each object, in this many
    # groups, reconstructed by the decoder without matching; 0 is off (the original recipe).
    denoising_groups: int = 20
    # Contrastive denoising (DINO): each denoising group also holds a negative copy of every object,
    # its box moved further, that must predict "no object". Off: on the ResNet-18 quickstart (seed
    # 42) it raised AP 0.218 -> 0.237 but lowered AP50 0.480 -> 0.458 (README, "Training and evaluation").
    contrastive_denoising: bool = False
    # Extra groups of object queries (Group DETR, sdetr.model.query_groups), each matched one-to-one
    # on its own; the number of groups with the model's own. 1 is off, the default: 3 groups gave the
    # quickstart no gain over five seeds (README, "Training and evaluation").
    query_groups: int = 1
    precision: Precision = "auto"  # of training steps; evaluation always runs in float32
    compile: bool = False  # torch.compile the backbone and stages (opt-in; minutes of compiling first)
    output_dir: str = "outputs"
    resume: str | None = None
    eval_only: bool = False
    eval_every: int = 1
    num_workers: int = 0
    seed: int = 42
    device: str = "auto"  # auto: cuda when available, else cpu
    probe_sites: str | None = None  # glob of attention sites to record on a fixed val batch
    probe_every: int = 1
    probe_images: int = 2
    overwrite: bool = False  # replace a finished or interrupted run in output_dir instead of refusing

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range (the trainer calls it again before starting).

        Raises:
            ConfigError: naming the field (as its command-line flag) and the accepted values.
        """
        check_fields(self)
        positive = (
            "epochs",
            "lr_drop",
            "batch_size",
            "synthetic_train",
            "synthetic_val",
            "probe_every",
            "probe_images",
            "one_to_many",
            "query_groups",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: use a positive integer")
        for name in (
            "eval_every",
            "num_workers",
            "seed",
            "synthetic_seed",
            "warmup_steps",
            "one_to_many_epochs",
            "denoising_groups",
            "low_res_epochs",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: use 0 or more")
        if self.contrastive_denoising and self.denoising_groups == 0:
            raise ConfigError(
                "--contrastive_denoising adds negative copies to the denoising queries, and --denoising_groups is 0 "
                "(given, resumed from a checkpoint's options, or set by --recipe original): set --denoising_groups "
                "to 1 or more, or pass --no-contrastive_denoising"
            )
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ConfigError(f"--max_train_images {self.max_train_images}: use a positive integer (or leave it out)")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: use a positive learning rate")
        for name in ("lr_backbone", "weight_decay", "clip_max_norm", "encoder_loss"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: use 0 or more")
        if not 0.0 < self.low_res_factor <= 1.0:
            raise ConfigError(
                f"--low_res_factor {self.low_res_factor}: use a factor in (0, 1] of the scale's sizes, e.g. 0.8"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay {self.ema_decay}: use 0 (off) or a decay in (0, 1), e.g. 0.998")
        if self.scale is not None and self.scale not in SCALES:
            raise ConfigError(f"--scale {self.scale!r}: use one of {', '.join(SCALES)}")
        self._check_low_res()
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N") from None
        if self.eval_only and not self.resume:
            raise ConfigError("--eval needs --resume CHECKPOINT (the model to evaluate)")
        try:
            get_config(self.preset, **self.model_overrides)  # an unknown preset, field or a wrong type
        except ConfigError as error:
            raise type(error)(f"model overrides (--preset {self.preset} --set ...): {error}") from None

    def _check_low_res(self) -> None:
        """Progressive resizing must end at full size and keep images larger than the backbone's stride."""
        if self.low_res_epochs == 0 or self.low_res_factor == 1.0 or self.eval_only:
            return
        if self.low_res_epochs >= self.epochs:
            raise ConfigError(
                f"--low_res_epochs {self.low_res_epochs} with --epochs {self.epochs}: the last epoch must train "
                f"at full size, the size the model is evaluated at; use --low_res_epochs {self.epochs - 1} or "
                "fewer (0: off)"
            )
        name = self.scale_name()
        full, small = SCALES[name], SCALES[name].scaled(self.low_res_factor)
        smallest, smallest_scaled = min(*full.train_sizes, full.val_size), min(*small.train_sizes, small.val_size)
        if smallest_scaled < MIN_LOW_RES_SIDE:
            raise ConfigError(
                f"--low_res_factor {self.low_res_factor}: the {name!r} scale's smallest size ({smallest} px) "
                f"would become {smallest_scaled} px, under {MIN_LOW_RES_SIDE} px (one stride-32 cell); use a "
                f"factor of at least {MIN_LOW_RES_SIDE / smallest:.2f}"
            )

    def scale_name(self) -> str:
        """The transforms' scale preset: ``scale``, or when None, ``synthetic`` for the embedded set
        and ``full`` for COCO."""
        if self.scale is not None:
            return self.scale
        return "synthetic" if self.coco_path is None else "full"

    def augments(self) -> bool:
        """Whether the train split is augmented: ``augment``, or when None, only for COCO."""
        return self.coco_path is not None if self.augment is None else self.augment

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "train config") -> TrainConfig:
        """A config from :meth:`to_dict`'s output (as stored in checkpoints); unknown fields are refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a dict of TrainConfig fields, got {type(data).__name__}")
        for name in data:
            if name not in field_types(cls):
                raise ConfigError(f"{where}: {unknown_field_message(cls, str(name))}")
        return cls(**data)


#: The original SDETR run: 150 epochs, lr drop at 100, batch 4 per GPU on 4 GPUs, COCO.
ORIGINAL_RECIPE = {
    "preset": "sdetr",
    "epochs": 150,
    "lr_drop": 100,
    "batch_size": 4,
    "lr": 1e-4,
    "lr_backbone": 1e-5,
    "weight_decay": 1e-4,
    "clip_max_norm": 0.1,
    "encoder_loss": 0.0,
    "one_to_many": 1,
    "one_to_many_epochs": 0,
    "warmup_steps": 0,
    "ema_decay": 0.0,
    "augment": True,
    "denoising_groups": 0,
    "contrastive_denoising": False,
    "query_groups": 1,
    "low_res_epochs": 0,
    "schedule": "step",
    "scale": "full",
    "precision": "fp32",
}

#: Options added after runs were already saved, with the value that reproduces how such a run
#: trained; ``--resume`` of a checkpoint whose stored options lack one uses this, not the default.
BEFORE_THE_OPTION = {
    "schedule": "step",
    "warmup_steps": 0,
    "one_to_many": 1,
    "one_to_many_epochs": 0,
    "precision": "fp32",
    "compile": False,
    "ema_decay": 0.0,
    "denoising_groups": 0,
    "augment": True,
    "low_res_epochs": 0,
    "query_groups": 1,
    "contrastive_denoising": False,
}
