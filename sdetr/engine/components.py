"""The parts of a training run built from a :class:`TrainConfig`: the data, the model and the criterion.

:meth:`sdetr.engine.Trainer.from_config` builds them (with the pre-flight checks between) and hands
them to the :class:`~sdetr.engine.Trainer`; built by hand, they can be changed before they are handed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdetr.build import build_model
from sdetr.checkpoints import load_model
from sdetr.data import SCALES, CocoDetection, CocoPaths, SyntheticSpec, build_transforms, generate_synthetic_coco
from sdetr.data.annotations import OnBadData
from sdetr.data.synthetic import synthetic_root
from sdetr.engine import distributed
from sdetr.engine.distributed import DistributedContext
from sdetr.engine.options import TrainConfig
from sdetr.model.criterion import CriterionConfig, SetCriterion
from sdetr.model.detector import Detector


@dataclass
class TrainingData:
    """The training and validation splits of a run, and the COCO folder they are read from."""

    train: CocoDetection
    val: CocoDetection
    root: Path
    #: The train split's transforms at reduced sizes, for progressive resizing
    #: (``TrainConfig.low_res_epochs``); None where the run does not use it. ``build_data`` makes
    #: them from the config's scale and augmentation: whoever replaces ``train``'s transforms by
    #: hand replaces these too.
    low_res_transforms: Callable[..., tuple[torch.Tensor, dict[str, Any]]] | None = None
    #: The view :meth:`train_split` gave for ``low_res`` last time and what it was made from (train,
    #: its ids, the transforms), kept so that its sample cache (if the train split caches samples)
    #: lasts from one small epoch to the next.
    _low_res_view: tuple[CocoDetection, list[int], Any, CocoDetection] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def train_split(self, low_res: bool = False) -> CocoDetection:
        """The train split; with ``low_res``, the same images (index and decoded-image cache shared)
        through :attr:`low_res_transforms`, as one view from call to call while ``train`` and
        ``low_res_transforms`` stay the same objects.

        Raises:
            ValueError: ``low_res`` without :attr:`low_res_transforms`.
        """
        if not low_res:
            return self.train
        if self.low_res_transforms is None:
            raise ValueError(
                "low-resolution epochs need TrainingData.low_res_transforms "
                "(build_data makes them when TrainConfig.low_res_epochs > 0)"
            )
        kept = self._low_res_view
        if kept is None or not (
            kept[0] is self.train and kept[1] is self.train.ids and kept[2] is self.low_res_transforms
        ):
            kept = self._low_res_view = (
                self.train,
                self.train.ids,
                self.low_res_transforms,
                self.train.with_transforms(self.low_res_transforms),
            )
        return kept[3]

    @property
    def num_classes(self) -> int:
        """One more than the largest category id of either split (the model's ``num_classes``)."""
        return max(max(self.train.coco.cats), max(self.val.coco.cats)) + 1


def build_data(config: TrainConfig, ctx: DistributedContext) -> TrainingData:
    """The COCO folder at ``coco_path``, or the synthetic set (made by the main process first)."""
    if config.coco_path is None:
        spec = SyntheticSpec(
            num_train=config.synthetic_train,
            num_val=config.synthetic_val,
            seed=config.synthetic_seed,
            class_hues=config.synthetic_class_hues,
        )
        if ctx.is_main:
            generate_synthetic_coco(spec)
        distributed.barrier(ctx)  # the others wait for the main process, then read its folder
        root = synthetic_root(spec)
    else:
        root = Path(config.coco_path)
    scale = config.scale_name()
    on_bad: OnBadData = "skip" if config.skip_bad_data else "error"
    cache = config.coco_path is None  # the synthetic set is small: decode each image once, not every epoch
    augment = config.augments()
    train_transforms = build_transforms(scale, True, augment)
    # without augmentation a sample is the same every epoch: keep it, transformed, in memory too
    # (in the training process only: a loader's worker processes end with each epoch, their caches too)
    samples = cache and config.num_workers == 0
    train = CocoDetection(CocoPaths(root, "train"), train_transforms, on_bad, cache, samples and not augment)
    val = CocoDetection(CocoPaths(root, "val"), build_transforms(scale, False), on_bad, cache, samples)
    low_res = None
    if config.low_res_epochs > 0:
        low_res = build_transforms(SCALES[scale].scaled(config.low_res_factor), True, augment)
    return TrainingData(train, val, root, low_res)


def build_training_model(config: TrainConfig, num_classes: int, device: torch.device) -> Detector:
    """A new ``preset`` model with ``model_overrides`` and ``num_classes`` classes on ``device``, or
    with ``eval_only`` the ``resume`` checkpoint's model (its own ``num_classes``); ``compile``
    compiles its backbone and stages (:meth:`~sdetr.model.detector.Detector.compile_parts`)."""
    if config.eval_only:
        assert config.resume is not None  # TrainConfig.validate
        return load_model(config.resume, device=device, compile=config.compile)
    overrides = {"num_classes": num_classes, **config.model_overrides}
    model = build_model(config.preset, **overrides).to(device)
    return model.compile_parts(dynamic=True) if config.compile else model


def build_criterion(config: TrainConfig, num_classes: int, device: torch.device) -> SetCriterion:
    """DETR's set criterion for ``num_classes`` classes, with the dense encoder losses weighted by
    ``encoder_loss`` (0: the original criterion)."""
    return SetCriterion(num_classes, CriterionConfig(encoder_weight=config.encoder_loss)).to(device)
