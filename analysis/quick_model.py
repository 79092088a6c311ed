"""A small trained model on the embedded synthetic set, made once and cached.

Notebooks, the heads study (``--train``) and the figures command need a checkpoint to look at
when the user gives none. :func:`quick_checkpoint` trains one with ``sdetr.Trainer`` and keeps
it under ``$SDETR_CACHE/models/<key>/checkpoint.pth``, keyed by everything that shapes the run,
so the second call is instant. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdetr import (
    CocoDetection,
    CocoPaths,
    SyntheticSpec,
    TrainConfig,
    Trainer,
    build_transforms,
    default_cache_dir,
    generate_synthetic_coco,
    get_config,
    synthetic_root,
)


@dataclass(frozen=True)
class QuickRun:
    """What to train. Every field enters the cache key.

    Attributes:
        preset: model preset (``sdetr-tiny``, ``sdetr-tiny-multihead``, ...).
        epochs / lr_drop / batch_size / lr: the schedule (lr also for the backbone).
        train_images / val_images: sizes of the synthetic splits (generated on first use).
        seed: the training seed (initial weights, data order).
        encoder_loss: weight of the dense encoder losses (the quickstart's training aid).
        model_overrides: extra ``ModelConfig`` fields.
    """

    preset: str = "sdetr-tiny"
    epochs: int = 4
    lr_drop: int = 3
    batch_size: int = 4
    lr: float = 5e-4
    train_images: int = 400
    val_images: int = 50
    seed: int = 42
    encoder_loss: float = 3.0
    model_overrides: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def key(self) -> str:
        """The cache folder's name: the run's fields, every training option it implies and the model
        its preset builds (so a change of the trainer's defaults, such as a new training aid, or of
        the preset, such as ``sdetr-tiny``'s backbone, trains a new model)."""
        options = {k: v for k, v in self.train_config("").to_dict().items() if k != "output_dir"}
        model = get_config(self.preset, **dict(self.model_overrides)).to_dict()
        payload = json.dumps({**asdict(self), "train_config": options, "model": model}, sort_keys=True, default=str)
        return (
            f"{self.preset}-e{self.epochs}-n{self.train_images}-s{self.seed}-"
            + hashlib.sha1(payload.encode()).hexdigest()[:10]
        )

    def train_config(self, output_dir: str | os.PathLike[str]) -> TrainConfig:
        return TrainConfig(
            preset=self.preset,
            model_overrides=dict(self.model_overrides),
            synthetic_train=self.train_images,
            synthetic_val=self.val_images,
            epochs=self.epochs,
            lr_drop=self.lr_drop,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_backbone=self.lr,
            warmup_steps=0,  # as these runs were measured (TrainConfig's default warms up the quickstart)
            low_res_epochs=0,  # and trains its first epochs smaller
            encoder_loss=self.encoder_loss,
            seed=self.seed,
            eval_every=0,
            precision="fp32",  # the same model on every machine, whether or not its CPU has bf16
            output_dir=str(output_dir),
            device="cpu",
        )


def quick_checkpoint(run: QuickRun | None = None, **fields: Any) -> Path:
    """Path of a checkpoint trained as ``run`` describes (fields may be given as keywords),
    training it first when the cache has none. Training writes to a temporary folder that is
    renamed into place, so an interrupted run leaves nothing half-made."""
    run = run or QuickRun(**fields)
    final = default_cache_dir() / "models" / run.key()
    checkpoint = final / "checkpoint.pth"
    if checkpoint.is_file():
        return checkpoint
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{run.key()}.", dir=final.parent))
    try:
        Trainer.from_config(run.train_config(building)).fit()
        (building / "quick_run.json").write_text(json.dumps(asdict(run), default=str, indent=1))
        try:
            building.rename(final)
        except OSError:  # another process finished the same run first
            if not checkpoint.is_file():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return checkpoint


def quick_dataset(run: QuickRun | None = None, split: str = "val", **fields: Any) -> CocoDetection:
    """The synthetic split a :class:`QuickRun` trains / validates on, with evaluation transforms
    (generated on first use)."""
    run = run or QuickRun(**fields)
    config = run.train_config(default_cache_dir())
    spec = SyntheticSpec(
        num_train=config.synthetic_train,
        num_val=config.synthetic_val,
        seed=config.synthetic_seed,
        class_hues=config.synthetic_class_hues,
    )
    generate_synthetic_coco(spec)
    return CocoDetection(CocoPaths(synthetic_root(spec), split), build_transforms("synthetic", False))
