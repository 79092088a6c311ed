"""The training run's typed configuration (the CLI in ``train.py`` only fills this in)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Precision = Literal["fp32", "bf16", "fp16"]


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
    augment: bool = True
    skip_bad_data: bool = False
    max_train_images: int | None = None  # a subset, for quick experiments and tests
    epochs: int = 8  # the CPU quickstart: measured 7 min 40 s on 2 cores
    lr_drop: int = 7
    batch_size: int = 4
    lr: float = 5e-4
    lr_backbone: float = 5e-4  # the tiny backbone trains from scratch: same rate
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    # Weight of the dense encoder losses (sdetr.model.encoder_loss): the from-scratch quickstart
    # needs them to leave DETR's initial plateau in minutes; 0 is the original criterion.
    encoder_loss: float = 3.0
    precision: Precision = "fp32"
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    "scale": "full",
}
