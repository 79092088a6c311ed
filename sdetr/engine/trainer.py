"""The training loop: one process or many under torchrun, with checkpoints, logs and evaluation."""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from sdetr.build import build_model, count_parameters
from sdetr.checkpoints import load_model, read_checkpoint, save_model
from sdetr.data import CocoDetection, CocoPaths, SyntheticSpec, build_transforms, collate, generate_synthetic_coco
from sdetr.data.coco import OnBadData
from sdetr.data.synthetic import synthetic_root
from sdetr.engine import distributed
from sdetr.engine.distributed import DistributedContext
from sdetr.engine.evaluation import coco_stats, format_stats, to_coco_results, write_json_atomic
from sdetr.engine.options import TrainConfig
from sdetr.instrument import record
from sdetr.model.criterion import CriterionConfig, SetCriterion
from sdetr.model.detector import Detector
from sdetr.model.postprocess import postprocess

CHECKPOINT_NAME = "checkpoint.pth"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stops and the last good checkpoint is kept."""


@dataclass
class Data:
    train: CocoDetection
    val: CocoDetection
    root: Path


def prepare_data(config: TrainConfig, ctx: DistributedContext) -> Data:
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
        scale = config.scale or "synthetic"
    else:
        root, scale = Path(config.coco_path), config.scale or "full"
    on_bad: OnBadData = "skip" if config.skip_bad_data else "error"
    train = CocoDetection(CocoPaths(root, "train"), build_transforms(scale, True, config.augment), on_bad)
    val = CocoDetection(CocoPaths(root, "val"), build_transforms(scale, False), on_bad)
    return Data(train, val, root)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


class Trainer:
    """Builds data, model, optimiser and schedule from a :class:`TrainConfig` and runs them."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or distributed.setup(config.device)
        self.output_dir = Path(config.output_dir)
        torch.manual_seed(config.seed + self.ctx.rank)
        random.seed(config.seed + self.ctx.rank)
        self.data = prepare_data(config, self.ctx)
        num_classes = max(self.data.train.coco.cats) + 1
        self.start_epoch = 0
        self.model = self._build_model(num_classes)
        self.n_parameters = count_parameters(self.model)
        self.criterion = SetCriterion(
            self.model.config.num_classes, CriterionConfig(encoder_weight=config.encoder_loss)
        ).to(self.ctx.device)
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": rest, "lr": config.lr}, {"params": backbone, "lr": config.lr_backbone}],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_drop)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=config.precision == "fp16")
        self.ddp: nn.Module = self.model
        if self.ctx.enabled:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        if config.resume and not config.eval_only:
            self._resume(Path(config.resume))

    # ------------------------------------------------------------------ set-up
    def _build_model(self, num_classes: int) -> Detector:
        config = self.config
        if config.eval_only:
            if not config.resume:
                raise ValueError("--eval needs --resume CHECKPOINT (the model to evaluate)")
            return load_model(config.resume, device=self.ctx.device)
        overrides = {"num_classes": num_classes, **config.model_overrides}
        return build_model(config.preset, **overrides).to(self.ctx.device)

    def _resume(self, path: Path) -> None:
        state = read_checkpoint(path)
        if "sdetr_format" not in state:  # an original checkpoint: weights only
            self.model.load_state_dict(load_model(path).state_dict())
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        rng = state["rng"][self.ctx.rank] if self.ctx.rank < len(state["rng"]) else state["rng"][0]
        _set_rng_state(rng)

    def _loader(self, dataset: CocoDetection, train: bool, epoch: int = 0) -> DataLoader:
        subset: Any = dataset
        if train and self.config.max_train_images is not None:
            subset = Subset(dataset, range(min(len(dataset), self.config.max_train_images)))
        sampler: DistributedSampler[Any] = DistributedSampler(
            subset, self.ctx.world_size, self.ctx.rank, shuffle=train, seed=self.config.seed, drop_last=train
        )
        sampler.set_epoch(epoch)
        return DataLoader(
            subset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.num_workers,
            drop_last=train,
        )

    def _forward(self, images: list[Tensor]) -> dict[str, Any]:
        """The model's outputs in float32 (with the encoders' dense predictions when the criterion uses them)."""
        with self._autocast():
            outputs = self.ddp(images, encoder_outputs=self.criterion.config.encoder_weight > 0)
        return _float_outputs(outputs)

    def _autocast(self) -> Any:
        precision = self.config.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    # ------------------------------------------------------------------ loops
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.ddp.train()
        loader = self._loader(self.data.train, train=True, epoch=epoch)
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not self.ctx.is_main, leave=False)
        for images, targets in bar:
            images = [image.to(self.ctx.device) for image in images]
            targets = _targets_to(targets, self.ctx.device)
            losses = self.criterion(self._forward(images), targets)
            logged = distributed.mean_over_processes({k: float(v.detach()) for k, v in losses.items()}, self.ctx)
            if not math.isfinite(logged["total"]):
                bad = {k: v for k, v in logged.items() if not math.isfinite(v)}
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {steps} (non-finite: {bad}; total {logged['total']}). "
                    f"Training stopped; the last good checkpoint is {self.output_dir / CHECKPOINT_NAME} "
                    "(if an epoch finished). Lower --lr or use --clip_max_norm."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["total"]).backward()
            if self.config.clip_max_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_max_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for key, value in logged.items():
                sums[key] = sums.get(key, 0.0) + value
            steps += 1
            bar.set_postfix(loss=f"{logged['total']:.3f}", ce=f"{logged['loss_ce']:.3f}")
        averages = {("loss" if k == "total" else k): v / max(steps, 1) for k, v in sums.items()}
        averages["lr"] = self.optimizer.param_groups[0]["lr"]
        return averages

    @torch.no_grad()
    def evaluate(self, save_detections: Path | None = None) -> tuple[list[float], dict[str, float]]:
        """COCO stats and mean losses on the validation split."""
        self.ddp.eval()
        loader = self._loader(self.data.val, train=False)
        results: list[dict[str, Any]] = []
        image_ids: list[int] = []
        sums: dict[str, float] = {}
        steps = 0
        for images, targets in tqdm(loader, desc="evaluate", disable=not self.ctx.is_main, leave=False):
            images = [image.to(self.ctx.device) for image in images]
            targets = _targets_to(targets, self.ctx.device)
            outputs = self._forward(images)
            for key, value in self.criterion(outputs, targets).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            steps += 1
            sizes = torch.stack([t["orig_size"] for t in targets])
            ids = [int(t["image_id"]) for t in targets]
            results += to_coco_results(postprocess(outputs, sizes), ids)
            image_ids += ids
        results = distributed.gather_objects(results, self.ctx)
        image_ids = distributed.gather_objects(image_ids, self.ctx)
        losses = distributed.mean_over_processes({k: v / max(steps, 1) for k, v in sums.items()}, self.ctx)
        stats = coco_stats(self.data.val.coco, results, image_ids) if self.ctx.is_main else [0.0] * 12
        if save_detections is not None and self.ctx.is_main:
            write_json_atomic(results, save_detections)
        return stats, {("loss" if k == "total" else k): v for k, v in losses.items()}

    def record_probe(self, epoch: int) -> Path | None:
        """Record ``probe_sites`` on the first ``probe_images`` validation images (main process)."""
        if not self.config.probe_sites or not self.ctx.is_main:
            return None
        images = [
            self.data.val[i][0].to(self.ctx.device) for i in range(min(self.config.probe_images, len(self.data.val)))
        ]
        self.model.eval()
        with torch.no_grad(), record(self.model, sites=self.config.probe_sites) as rec:
            self.model(images)
        return rec.save(self.output_dir / "recordings" / f"epoch_{epoch:04d}.safetensors")

    def save_checkpoint(self, epoch: int) -> Path | None:
        """All processes' RNG states are gathered; the main process writes atomically."""
        rng = distributed.gather_objects([_rng_state()], self.ctx)
        if not self.ctx.is_main:
            return None
        return save_model(
            self.model,
            self.output_dir / CHECKPOINT_NAME,
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            rng=rng,
            train_config=self.config.to_dict(),
        )

    def fit(self) -> list[dict[str, Any]]:
        """Train from ``start_epoch`` to ``epochs``; returns the log entries written."""
        config = self.config
        if self.ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for epoch in range(self.start_epoch, config.epochs):
            start = time.perf_counter()
            train_stats = self.train_one_epoch(epoch)
            self.scheduler.step()
            entry: dict[str, Any] = {f"train_{k}": v for k, v in train_stats.items()}
            last = epoch == config.epochs - 1
            if config.eval_every > 0 and ((epoch + 1) % config.eval_every == 0 or last):
                detections = self.output_dir / "detections_val.json" if last else None
                stats, val_losses = self.evaluate(detections)
                entry.update({f"test_{k}": v for k, v in val_losses.items()})
                entry["test_coco_eval_bbox"] = stats
                if self.ctx.is_main:
                    tqdm.write(f"epoch {epoch} COCO bbox:\n{format_stats(stats)}")
            if config.probe_sites and (epoch + 1) % config.probe_every == 0:
                self.record_probe(epoch)
            entry.update(
                {"epoch": epoch, "n_parameters": self.n_parameters, "epoch_time_s": time.perf_counter() - start}
            )
            self.save_checkpoint(epoch)
            if self.ctx.is_main:
                with (self.output_dir / "log.txt").open("a") as log:
                    log.write(json.dumps(entry) + "\n")
            entries.append(entry)
        return entries

    def run(self) -> list[dict[str, Any]]:
        """``fit``, or with ``eval_only`` one evaluation (stats printed, detections saved)."""
        if not self.config.eval_only:
            return self.fit()
        stats, losses = self.evaluate(self.output_dir / "detections_val.json")
        if self.ctx.is_main:
            print(format_stats(stats))
        return [{"test_coco_eval_bbox": stats, **{f"test_{k}": v for k, v in losses.items()}}]


def _float_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Losses and post-processing in float32, whatever the autocast precision."""

    def cast(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v.float() if v.is_floating_point() else v for k, v in d.items() if isinstance(v, Tensor)}

    out = cast(outputs)
    for key in ("aux_outputs", "encoder_outputs"):
        if key in outputs:
            out[key] = [cast(part) for part in outputs[key]]
    return out
