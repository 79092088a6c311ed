"""The training loop: one process or many under torchrun, with checkpoints, logs and evaluation."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from sdetr.build import count_parameters
from sdetr.checkpoints import FORMAT_KEY, CheckpointError, load_model, read_checkpoint, save_model
from sdetr.config import ConfigError, ModelConfig
from sdetr.data import CocoDetection, collate
from sdetr.engine import distributed, preflight
from sdetr.engine.averaging import weight_average
from sdetr.engine.components import TrainingData, build_criterion, build_data, build_training_model
from sdetr.engine.distributed import DistributedContext
from sdetr.engine.evaluation import STAT_NAMES, coco_stats, format_stats, to_coco_results, write_json_atomic
from sdetr.engine.options import Precision, TrainConfig
from sdetr.engine.preflight import PreflightError
from sdetr.engine.schedule import LearningRateSchedule
from sdetr.errors import UserError
from sdetr.instrument import record
from sdetr.model.criterion import SetCriterion
from sdetr.model.denoising import Denoiser, DenoisingBatch
from sdetr.model.detector import Detector
from sdetr.model.postprocess import postprocess
from sdetr.model.query_groups import QueryGroups

#: The files a run writes in ``output_dir`` (probe recordings go to ``RECORDINGS_DIR`` there).
CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.txt"
DETECTIONS_NAME = "detections_val.json"
RECORDINGS_DIR = "recordings"
#: At most this many parameter or prediction names are listed in a non-finite error.
SHOWN_NAMES = 6

#: Entries of this project's training checkpoints that ``--resume`` needs.
RESUME_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "epoch", "rng", "config")
#: With an EMA (``ema_decay``), "model" holds the averaged weights (what ``load_model`` reads) and
#: these entries hold the raw trained weights and the number of averaged updates, for ``--resume``.
TRAINING_WEIGHTS_KEY = "training_model"
AVERAGE_UPDATES_KEY = "average_updates"
#: The training-only query modules, not part of the model, saved under these keys for ``--resume``:
#: the denoising-query embeddings (``denoising_groups`` > 0) and the extra query groups (``query_groups`` > 1).
DENOISER_KEY = "denoiser"
QUERY_GROUPS_KEY = "query_groups"
#: Device types whose AdamW has a fused implementation (the quickstart's step: 1.05x on the CPU, README "Speed").
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


class NonFiniteLossError(UserError, FloatingPointError):
    """Predictions, a loss or the weights became NaN or infinite; training stops and the last good
    checkpoint is kept (a checkpoint is never written with non-finite weights)."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (a CUDA GPU that supports it, or a
    CPU with AVX512-BF16 or AMX), so bf16 autocast speeds training up rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def training_precision(precision: Precision, device: torch.device) -> Precision:
    """``precision`` with "auto" resolved: bf16 where :func:`native_bf16`, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def steps_taken(scheduler_state: Any, steps_per_epoch: int, path: Path) -> int:
    """Optimiser steps a checkpoint's run took, from its saved scheduler state.

    Checkpoints written before the per-step schedule hold a per-epoch ``StepLR`` (its
    ``last_epoch`` counts epochs); they resume at the first step of the next epoch.
    """
    steps = scheduler_state.get("last_epoch") if isinstance(scheduler_state, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise CheckpointError(f"{path}: its 'lr_scheduler' entry has no step count (last_epoch: {steps!r})")
    return steps * steps_per_epoch if "step_size" in scheduler_state else steps


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


class LossAverages:
    """Means of named losses over the steps of a loop, with the criterion's ``total`` named ``loss``
    (as in the logs). Shared by :meth:`Trainer.train_one_epoch` and :meth:`Trainer.evaluate`."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        #: The number of :meth:`add` calls so far.
        self.steps = 0

    def add(self, losses: Mapping[str, float]) -> None:
        """Add one step's losses."""
        for key, value in losses.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self.steps += 1

    def means(self, ctx: DistributedContext | None = None) -> dict[str, float]:
        """The mean of each loss over the steps (empty before the first step); with ``ctx``, these
        means averaged over the processes too (every process must call it)."""
        means = {key: value / max(self.steps, 1) for key, value in self._sums.items()}
        if ctx is not None:
            means = distributed.mean_over_processes(means, ctx)
        return {("loss" if key == "total" else key): value for key, value in means.items()}


class Trainer:
    """Trains and evaluates a model on its data with its criterion: optimiser, learning-rate
    schedule, mixed precision, several processes, checkpoints, logs and probes.

    :meth:`from_config` builds the parts from a :class:`TrainConfig` and checks them before the
    first step; the constructor takes parts built elsewhere (:mod:`sdetr.engine.components`).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Detector,
        data: TrainingData,
        criterion: SetCriterion,
        ctx: DistributedContext,
        notes: Sequence[str] = (),
    ) -> None:
        """Build the optimiser, schedule, gradient scaler and (with several processes) the DDP
        wrapper around ``model``, then resume ``config.resume`` or clear the run with ``overwrite``.

        ``model`` and ``criterion`` must be on ``ctx.device``; the parts are used as given (the
        pre-flight checks are :meth:`from_config`'s). ``notes``: what the pre-flight changed or
        skipped; the main process prints them with the resume notes.

        Raises:
            CheckpointError, PreflightError: ``config.resume`` cannot be continued.
            ValueError: ``config.low_res_epochs`` without ``data.low_res_transforms``.
        """
        self.config = config
        self.ctx = ctx
        self.model = model
        self.data = data
        if config.low_res_epochs > 0 and not config.eval_only and data.low_res_transforms is None:
            raise ValueError(
                f"TrainConfig.low_res_epochs={config.low_res_epochs} needs TrainingData.low_res_transforms "
                "(build_data makes them; or set low_res_epochs=0)"
            )
        self.criterion = criterion
        self.output_dir = Path(config.output_dir)
        #: The last checkpoint known to be good (written by this run, or resumed from), and its epoch.
        self.last_checkpoint: Path | None = None
        self.last_epoch: int | None = None
        self.notes: list[str] = list(notes)  # what the pre-flight changed or skipped (printed by the main process)
        self.start_epoch = 0
        self.n_parameters = count_parameters(self.model)
        dims = model.config
        #: Makes the training-only denoising queries (``denoising_groups`` > 0); not part of the model.
        self.denoiser: Denoiser | None = None
        if config.denoising_groups > 0 and not config.eval_only:
            self.denoiser = Denoiser(
                dims.num_classes,
                dims.hidden_dim,
                dims.num_queries,
                config.denoising_groups,
                negatives=config.contrastive_denoising,
            )
        #: Makes Group DETR's extra query groups (``query_groups`` > 1); not part of the model.
        self.query_groups: QueryGroups | None = None
        if config.query_groups > 1 and not config.eval_only:
            self.query_groups = QueryGroups(dims.num_queries, dims.hidden_dim, config.query_groups)
        #: The training-only modules by checkpoint key: trained, wrapped, saved and resumed beside the model.
        self.training_modules: dict[str, nn.Module] = {
            key: module.to(ctx.device)
            for key, module in ((DENOISER_KEY, self.denoiser), (QUERY_GROUPS_KEY, self.query_groups))
            if module is not None
        }
        backbone = [p for n, p in self.model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        rest += [p for module in self.training_modules.values() for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(
            [{"params": rest, "lr": config.lr}, {"params": backbone, "lr": config.lr_backbone}],
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=ctx.device.type in FUSED_ADAMW_DEVICES,  # one kernel for all parameters: same update, faster
        )
        steps_per_epoch = len(self._loader(data.train, train=True))
        self.schedule = LearningRateSchedule(
            config.schedule, steps_per_epoch, config.epochs, config.lr_drop, config.warmup_steps
        )
        schedule = self.schedule  # a plain function: LambdaLR's state_dict then stores nothing for it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: schedule.factor(step))
        self.precision = training_precision(config.precision, ctx.device)
        if config.precision == "auto":
            self.notes.append(f"--precision auto: {self.precision} training steps on {ctx.device.type}")
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.precision == "fp16")
        #: The EMA of the weights (``ema_decay`` > 0): evaluated, probed and saved as the run's model.
        averaging = config.ema_decay > 0 and not config.eval_only
        self.average = weight_average(model, config.ema_decay) if averaging else None
        self.ddp: nn.Module = self.model
        #: The training-only modules as called in training steps (DDP-wrapped with several processes).
        self.training_calls: dict[str, nn.Module] = dict(self.training_modules)
        if self.ctx.enabled:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
            for key, module in self.training_modules.items():  # their gradients are averaged over processes too
                self.training_calls[key] = DistributedDataParallel(module, device_ids=ids)
        if config.resume and not config.eval_only:
            self._resume(Path(config.resume))
        elif config.overwrite and self.ctx.is_main:
            removed = preflight.clear_run(self.output_dir)
            if removed:
                self.notes.append(f"--overwrite: removed the earlier run's {', '.join(p.name for p in removed)}")
        distributed.barrier(self.ctx)
        if self.ctx.is_main:
            for note in self.notes:
                tqdm.write(note)

    @classmethod
    def from_config(cls, config: TrainConfig, ctx: DistributedContext | None = None) -> Trainer:
        """Build data, model and criterion from ``config`` and run the pre-flight checks
        (:mod:`sdetr.engine.preflight`): any problem that can be known before the first training
        step is raised here.

        Without ``ctx``, the processes are set up from torchrun's environment.

        Raises:
            ConfigError, PreflightError, BadDataError, CheckpointError: with the flag or file to fix.
        """
        config.validate()
        ctx = ctx or distributed.setup(config.device)
        preflight.check_output_dir(config, Path(config.output_dir) / CHECKPOINT_NAME)
        torch.manual_seed(config.seed + ctx.rank)
        random.seed(config.seed + ctx.rank)
        data = build_data(config, ctx)
        splits = {"val": data.val} if config.eval_only else {"train": data.train, "val": data.val}
        notes = preflight.check_images(splits, config.skip_bad_data, progress=ctx.is_main)
        preflight.check_steps(config, len(data.train), len(data.val), ctx.world_size)
        model = build_training_model(config, data.num_classes, ctx.device)
        preflight.check_classes(model, splits)
        preflight.check_probe(model, config, data.val)
        criterion = build_criterion(config, model.config.num_classes, ctx.device)
        return cls(config, model=model, data=data, criterion=criterion, ctx=ctx, notes=notes)

    @property
    def evaluated_model(self) -> Detector:
        """The model that is evaluated, probed and saved: the weights' EMA when ``ema_decay`` > 0
        (once a step was averaged), else the trained model itself."""
        if self.average is None or int(self.average.n_averaged) == 0:
            return self.model
        return cast(Detector, self.average.module)

    # ------------------------------------------------------------------ set-up
    def _resume(self, path: Path) -> None:
        """Continue a run: weights, optimiser, schedule, scaler and RNG states from ``path``.

        The run's own options win over the checkpoint's (``lr``, ``lr_backbone``,
        ``weight_decay`` and ``lr_drop`` are applied to the restored optimiser and schedule);
        every difference is noted. A checkpoint of another architecture, an incomplete one or
        one that already finished ``epochs`` is refused before training.
        """
        state = read_checkpoint(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
        if FORMAT_KEY not in state:  # an original checkpoint: weights only
            self.model.load_state_dict(load_model(path, config=self.model.config).state_dict())
            self.notes.append(f"--resume {path}: an original checkpoint; its weights only (epoch 0, fresh optimiser)")
            return
        missing = [key for key in RESUME_KEYS if key not in state]
        if missing:
            raise CheckpointError(
                f"{path}: not a complete training checkpoint (missing {', '.join(missing)}); "
                "it cannot be resumed (sdetr.load_model reads its weights)"
            )
        try:
            saved_config = ModelConfig.from_dict(state["config"])
        except ConfigError as error:
            raise CheckpointError(f"{path}: its stored model config is not valid ({error})") from None
        conflicts = preflight.config_differences(saved_config, self.model.config)
        if conflicts:
            raise PreflightError(
                f"--resume {path}: the checkpoint's model differs from this run's (--preset/--set, or the data's "
                "categories for num_classes):\n  " + "\n  ".join(conflicts) + "\nResume with the checkpoint's "
                "options, or start a new run in another --output_dir"
            )
        epoch = state["epoch"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise CheckpointError(f"{path}: its 'epoch' entry is {epoch!r}, not an epoch number")
        if epoch + 1 >= self.config.epochs:
            raise PreflightError(
                f"--resume {path}: that run finished epoch {epoch} ({epoch + 1} epoch(s)) and --epochs is "
                f"{self.config.epochs}, so there is nothing left to train; pass --epochs N with N > {epoch + 1} "
                "to train further, or --eval to evaluate it"
            )
        try:
            # A run with an EMA saved its raw weights as "training_model" and the average as "model".
            trained = state[TRAINING_WEIGHTS_KEY] if TRAINING_WEIGHTS_KEY in state else state["model"]
            self.model.load_state_dict(trained)
            if self.average is not None and TRAINING_WEIGHTS_KEY in state:
                self.average.module.load_state_dict(state["model"])
                self.average.n_averaged.fill_(int(state.get(AVERAGE_UPDATES_KEY, 0)))
            for key, module in self.training_modules.items():
                if key in state:
                    module.load_state_dict(state[key])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            rng = state["rng"][self.ctx.rank] if self.ctx.rank < len(state["rng"]) else state["rng"][0]
            _set_rng_state(rng)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            text = str(error).split("\n")[0]
            raise CheckpointError(
                f"{path}: its training state cannot be restored ({type(error).__name__}: {text})"
            ) from None
        self.start_epoch = epoch + 1
        self.last_checkpoint, self.last_epoch = path, epoch
        self._continue_schedule(steps_taken(state["lr_scheduler"], self.schedule.steps_per_epoch, path))
        saved = state.get("train_config")
        changes = preflight.flag_changes(saved, self.config) if isinstance(saved, dict) else {}
        for name, (old, new) in changes.items():
            self.notes.append(f"--resume: --{name} {new!r} (the checkpoint's run had {old!r}); this run's value wins")

    def _continue_schedule(self, steps: int) -> None:
        """Put the schedule at optimiser step ``steps`` with this run's lr, lr_backbone,
        weight_decay and schedule options (they win over the checkpoint's)."""
        config = self.config
        self.scheduler.last_epoch = steps
        self.scheduler.base_lrs = [config.lr, config.lr_backbone]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * self.schedule.factor(steps)
            group["weight_decay"] = config.weight_decay
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # type: ignore[attr-defined]

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
            pin_memory=self.ctx.device.type == "cuda",  # page-locked batches: faster host-to-GPU copies
            drop_last=train,
        )

    def _forward(self, images: list[Tensor], train: bool, denoising: DenoisingBatch | None = None) -> dict[str, Any]:
        """The outputs in float32 (with the encoders' dense predictions when the criterion uses
        them): training steps run the trained model under ``precision``'s autocast, evaluation runs
        :attr:`evaluated_model` in float32."""
        model = self.ddp if train else self.evaluated_model
        with self._autocast() if train else nullcontext(), self._attention_kernel() if train else nullcontext():
            outputs = model(images, encoder_outputs=self.criterion.config.encoder_weight > 0, denoising=denoising)
        return _float_outputs(outputs)

    def _attention_kernel(self) -> Any:
        """CPU training steps run SDPA's math kernel: at the quickstart's sizes its backward is
        faster than the CPU flash kernel's (1.05x steps/s, measured side by side), at 512x512 and
        800x1333 the two are even. Elsewhere torch picks."""
        return sdpa_kernel([SDPBackend.MATH]) if self.ctx.device.type == "cpu" else nullcontext()

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    # ------------------------------------------------------------------ loops
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the train split (:meth:`train_step` per batch); the mean losses and the rate used last."""
        low_res = self.low_res(epoch)
        loader = self._loader(self.data.train_split(low_res), train=True, epoch=epoch)
        averages = LossAverages()  # of the per-step means over processes
        used_lr = self.optimizer.param_groups[0]["lr"]  # logged: the rate of the epoch's last step
        desc = f"epoch {epoch}" + (f" (x{self.config.low_res_factor:g} size)" if low_res else "")
        bar = tqdm(loader, desc=desc, disable=not self.ctx.is_main, leave=False)
        for images, targets in bar:
            logged = self.train_step(images, targets, epoch, step=averages.steps)
            used_lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()  # the learning rate of the next step
            averages.add(logged)
            bar.set_postfix(loss=f"{logged['total']:.3f}", ce=f"{logged['loss_ce']:.3f}")
        means = averages.means()
        means["lr"] = used_lr
        return means

    def train_step(
        self, images: list[Tensor], targets: list[dict[str, Any]], epoch: int, step: int = 0
    ) -> dict[str, float]:
        """One optimiser step on a batch, at the optimiser's current learning rate: the schedule is
        the caller's to advance (``trainer.scheduler.step()``, as :meth:`train_one_epoch` does after
        each step; without it every step keeps the first warm-up step's rate).

        Args:
            images: ``[3, H_i, W_i]`` normalised images, as the loader gives them.
            targets: per image, ``labels [N]`` and ``boxes [N, 4]`` (cx, cy, w, h in [0, 1]).
            epoch: sets the one-to-many matching of the early epochs.
            step: the step's index in its epoch, for error messages.
        Returns:
            The losses as floats, averaged over processes (``total`` included).
        Raises:
            NonFiniteLossError: a prediction or loss is NaN or infinite; nothing was updated.
        """
        if not self.model.training:  # after evaluation; walking every module each step would cost ~0.7 ms
            self.ddp.train()
        images = [image.to(self.ctx.device) for image in images]
        targets = _targets_to(targets, self.ctx.device)
        denoising = self.training_queries(targets)
        outputs = self._forward(images, train=True, denoising=denoising)
        self._check_outputs(outputs, f"epoch {epoch}, step {step}")  # before the matcher sees them
        losses = self.criterion(outputs, targets, one_to_many=self.one_to_many(epoch), denoising=denoising)
        logged = distributed.mean_over_processes({k: float(v.detach()) for k, v in losses.items()}, self.ctx)
        bad = {k: v for k, v in logged.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step} "
                f"(non-finite: {bad}; total {logged['total']}). "
                f"Training stopped; {self._last_good()}. Lower --lr or use --clip_max_norm."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        if self.config.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update_parameters(self.model)
        return logged

    def training_queries(self, targets: list[dict[str, Any]]) -> DenoisingBatch | None:
        """The batch's training-only decoder queries: the extra query groups, then the denoising
        queries (either may be off; None when both are)."""
        denoiser, groups = self.training_calls.get(DENOISER_KEY), self.training_calls.get(QUERY_GROUPS_KEY)
        queries = None if denoiser is None else denoiser(targets)
        return queries if groups is None else groups(len(targets), queries)

    def low_res(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` trains at reduced sizes (progressive resizing)."""
        return epoch < self.config.low_res_epochs

    def one_to_many(self, epoch: int) -> int:
        """How many queries each object is matched to in epoch ``epoch`` (1: DETR's one-to-one)."""
        return self.config.one_to_many if epoch < self.config.one_to_many_epochs else 1

    @torch.no_grad()
    def evaluate(self, save_detections: Path | None = None) -> tuple[list[float], dict[str, float]]:
        """COCO stats and mean losses on the validation split."""
        self.evaluated_model.eval()
        loader = self._loader(self.data.val, train=False)
        results: list[dict[str, Any]] = []
        image_ids: list[int] = []
        averages = LossAverages()  # of this process's steps
        for images, targets in tqdm(loader, desc="evaluate", disable=not self.ctx.is_main, leave=False):
            images = [image.to(self.ctx.device) for image in images]
            targets = _targets_to(targets, self.ctx.device)
            outputs = self._forward(images, train=False)
            self._check_outputs(outputs, f"evaluation step {averages.steps}")
            averages.add({key: float(value) for key, value in self.criterion(outputs, targets).items()})
            sizes = torch.stack([t["orig_size"] for t in targets])
            ids = [int(t["image_id"]) for t in targets]
            results += to_coco_results(postprocess(outputs, sizes), ids)
            image_ids += ids
        results = distributed.gather_objects(results, self.ctx)
        image_ids = distributed.gather_objects(image_ids, self.ctx)
        losses = averages.means(self.ctx)  # this process's means, averaged over the processes
        stats = coco_stats(self.data.val.coco, results, image_ids) if self.ctx.is_main else [0.0] * len(STAT_NAMES)
        if save_detections is not None and self.ctx.is_main:
            write_json_atomic(results, save_detections)
        return stats, losses

    def record_probe(self, epoch: int) -> Path | None:
        """Record ``probe_sites`` on the first ``probe_images`` validation images (main process)."""
        if not self.config.probe_sites or not self.ctx.is_main:
            return None
        images = [
            self.data.val[i][0].to(self.ctx.device) for i in range(min(self.config.probe_images, len(self.data.val)))
        ]
        model = self.evaluated_model
        model.eval()
        with torch.no_grad(), record(model, sites=self.config.probe_sites) as rec:
            model(images)
        return rec.save(self.output_dir / RECORDINGS_DIR / f"epoch_{epoch:04d}.safetensors")

    def save_checkpoint(self, epoch: int) -> Path | None:
        """All processes' RNG states are gathered; the main process writes atomically.

        Raises:
            NonFiniteLossError: the weights are not all finite (nothing is written).
        """
        self._check_weights(f"the end of epoch {epoch}")
        rng = distributed.gather_objects([_rng_state()], self.ctx)
        if not self.ctx.is_main:
            return None
        extra: dict[str, Any] = {key: module.state_dict() for key, module in self.training_modules.items()}
        if self.average is not None:
            extra[TRAINING_WEIGHTS_KEY] = self.model.state_dict()
            extra[AVERAGE_UPDATES_KEY] = int(self.average.n_averaged)
        path = save_model(
            self.evaluated_model,
            self.output_dir / CHECKPOINT_NAME,
            **extra,
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            epoch=epoch,
            rng=rng,
            train_config=self.config.to_dict(),
        )
        self.last_checkpoint, self.last_epoch = path, epoch
        return path

    # ------------------------------------------------------------------ finite checks
    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.last_checkpoint} (epoch {self.last_epoch})"

    def _check_outputs(self, outputs: dict[str, Any], where: str) -> None:
        """Stop with :class:`NonFiniteLossError` if any prediction of any process is NaN or infinite."""
        tensors = _prediction_tensors(outputs)
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all())
        if distributed.all_processes(finite, self.ctx):
            return
        names = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
        shown = ", ".join(names[:SHOWN_NAMES])
        shown += f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
        source = shown if names else "on another process"
        raise NonFiniteLossError(
            f"non-finite predictions at {where} ({source}), before the losses: the weights diverged. "
            f"Training stopped; {self._last_good()}. Lower --lr or use --clip_max_norm."
        )

    def _check_weights(self, where: str) -> None:
        """Stop with :class:`NonFiniteLossError` if a parameter is NaN or infinite (so it is never saved)."""
        parameters = dict(self.model.named_parameters())
        if bool(torch.stack([torch.isfinite(p).all() for p in parameters.values()]).all()):
            return
        names = [name for name, p in parameters.items() if not torch.isfinite(p).all()]
        raise NonFiniteLossError(
            f"non-finite weights at {where} ({', '.join(names[:SHOWN_NAMES])}"
            f"{' ...' if len(names) > SHOWN_NAMES else ''}); "
            f"no checkpoint was written. Training stopped; {self._last_good()}. Lower --lr or use --clip_max_norm."
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
            self._check_weights(f"the end of epoch {epoch}")  # before evaluation and saving
            entry: dict[str, Any] = {f"train_{k}": v for k, v in train_stats.items()}
            last = epoch == config.epochs - 1
            if config.eval_every > 0 and ((epoch + 1) % config.eval_every == 0 or last):
                detections = self.output_dir / DETECTIONS_NAME if last else None
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
                with (self.output_dir / LOG_NAME).open("a") as log:
                    log.write(json.dumps(entry) + "\n")
            entries.append(entry)
        return entries

    def run(self) -> list[dict[str, Any]]:
        """``fit``, or with ``eval_only`` one evaluation (stats printed, detections saved)."""
        if not self.config.eval_only:
            return self.fit()
        stats, losses = self.evaluate(self.output_dir / DETECTIONS_NAME)
        if self.ctx.is_main:
            print(format_stats(stats))
        return [{"test_coco_eval_bbox": stats, **{f"test_{k}": v for k, v in losses.items()}}]


def _prediction_tensors(outputs: dict[str, Any]) -> dict[str, Tensor]:
    """Every prediction tensor of the model's outputs by a readable name (``aux_outputs[2].pred_boxes``)."""
    tensors = {key: outputs[key] for key in ("pred_logits", "pred_boxes")}
    for group in ("aux_outputs", "encoder_outputs", "denoising"):
        for index, part in enumerate(outputs.get(group, [])):
            for key in ("pred_logits", "pred_boxes"):
                tensors[f"{group}[{index}].{key}"] = part[key]
    return tensors


def _float_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Losses and post-processing in float32, whatever the autocast precision."""

    def cast(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v.float() if v.is_floating_point() else v for k, v in d.items() if isinstance(v, Tensor)}

    out = cast(outputs)
    for key in ("aux_outputs", "encoder_outputs", "denoising"):
        if key in outputs:
            out[key] = [cast(part) for part in outputs[key]]
    return out
