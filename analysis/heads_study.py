"""The heads study: does the stride-16 (stage-2) encoder need more than one attention head?

One command compares single-head checkpoints (``sdetr-tiny`` / ``sdetr``) with multi-head ones
(``sdetr-tiny-multihead`` / ``sdetr-multihead``) on one split and writes ``report.md`` with its
CSVs and PNGs (figures linked by relative paths)::

    python -m analysis.heads_study --single A.pth --multi B.pth --data /data/coco --out study/
    python -m analysis.heads_study --train --data synthetic --out study/   # trains both first (cached)

Sections of the report:

- accuracy: AP, AP50, AP75, APs/m/l of every checkpoint (``analysis.evaluation.evaluate``); with
  several checkpoints per side, the mean, std and min-max of each side, and whether the
  difference between the sides exceeds the spread between checkpoints;
- cost: parameters, attention FLOPs per stage-2 encoder site, measured forward time (both
  models interleaved in one run, median), peak tensor memory of a forward, and the memory a
  recording of the stage-2 encoder maps takes (``sdetr.estimate_bytes``);
- behaviour: entropy, attention distance, locality, object mass, head redundancy and Q/K
  effective rank of the stage-2 encoder (``analysis.head_statistics``, ``analysis.qkv_statistics``);
- necessity: gate-gradient importance, ablation and pruning curves (``analysis.head_importance``).

The command is a thin CLI over :class:`StudyConfig` (named presets in :data:`STUDY_PRESETS`)
and :func:`run_study`. Everything runs on the CPU. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function

from analysis.evaluation import eval_mode, evaluate
from analysis.head_importance import (
    ablation_table,
    head_importance,
    matched_sites,
    plot_ablation,
    plot_pruning_curve,
    pruning_curve,
)
from analysis.head_statistics import (
    head_redundancy,
    head_statistics,
    plot_attention_distance,
    plot_head_entropy,
    plot_redundancy,
)
from analysis.qkv_statistics import plot_effective_rank, qkv_statistics
from analysis.quick_model import QuickRun, quick_checkpoint, quick_dataset
from analysis.writers import markdown_table, write_csv, write_figure, write_text
from sdetr import (
    CocoDetection,
    CocoPaths,
    Detector,
    Selection,
    build_transforms,
    count_parameters,
    estimate_bytes,
    format_bytes,
    load_model,
    normalize_image,
    record,
)

SIDES = ("single", "multi")
PRESET_OF_SIDE = {"single": "sdetr-tiny", "multi": "sdetr-tiny-multihead"}
ACCURACY_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FULL_SIZE = (800, 1333)
SCALES = ("full", "tiny", "synthetic", "native")
SITE_START, SITE_END = "heads_study.site_start", "heads_study.site_end"  # profiler markers


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study does.

    Attributes:
        single / multi: checkpoint files of each side (several: e.g. seeds; spread reported).
        data: ``"synthetic"`` (the embedded set's val split, see :func:`analysis.quick_model.quick_dataset`)
            or the root of a COCO-layout dataset (``annotations/instances_val2017.json``, ``val2017/``).
        out: output folder (created; files in it are replaced).
        scale: transforms of a COCO-layout ``data``: ``full`` / ``tiny`` / ``synthetic``
            (``sdetr.build_transforms``) or ``native`` (no resizing: images as stored).
        train: train both sides first with :func:`analysis.quick_model.quick_checkpoint`
            (``sdetr-tiny`` and ``sdetr-tiny-multihead``, one checkpoint per seed; cached).
        seeds / epochs / train_images / val_images: the training runs (``QuickRun`` fields);
            ``train_images`` / ``val_images`` also choose the synthetic split without ``train``.
        batch_size / limit: batching and the number of images of every dataset pass (None: all).
        size: ``(H, W)`` input of the cost section (timing, peak memory, FLOPs, recording
            bytes); None: the first image of the data.
        timing_rounds: interleaved forward rounds per model for the timing (median reported).
        sites: the sites studied (the stage-2 encoder).
        random_seed: seed of the random pruning order (the control).
        prune_steps: heads removed by each pruning curve (None: all of them).
        dpi: resolution of the PNGs.
        threads: torch CPU threads during the study (None: leave torch's setting; 1 is much faster
            than 2 on a machine whose cores other processes keep busy).
        progress: tqdm bars.
    """

    single: tuple[str, ...] = ()
    multi: tuple[str, ...] = ()
    data: str = "synthetic"
    out: str = "outputs/heads_study"
    scale: str = "full"
    train: bool = False
    seeds: tuple[int, ...] = (42,)
    epochs: int = 4
    train_images: int = 400
    val_images: int = 50
    batch_size: int = 2
    limit: int | None = None
    size: tuple[int, int] | None = None
    timing_rounds: int = 10
    sites: str = "stage2.encoder.*"
    random_seed: int = 0
    prune_steps: int | None = None
    dpi: int = 90
    threads: int | None = None
    progress: bool = True

    def replace(self, **changes: Any) -> StudyConfig:
        return dataclasses.replace(self, **changes)


#: Named configurations: ``default`` (the command's defaults) and ``quick`` (tests, a first look).
STUDY_PRESETS: dict[str, StudyConfig] = {
    "default": StudyConfig(),
    "quick": StudyConfig(limit=4, timing_rounds=2, epochs=1, train_images=16, val_images=4, prune_steps=3, dpi=60),
}


def get_study_config(preset: str = "default", **overrides: Any) -> StudyConfig:
    """A preset of :data:`STUDY_PRESETS` with some fields changed."""
    if preset not in STUDY_PRESETS:
        raise ValueError(f"unknown study preset {preset!r}; choose from {sorted(STUDY_PRESETS)}")
    return STUDY_PRESETS[preset].replace(**overrides)


# ---------------------------------------------------------------------------------- data and models
def native_transforms(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Evaluation transforms without resizing: ``[3, H, W]`` uint8 -> normalised float, boxes
    (xyxy pixels) -> cxcywh in [0, 1] of the image, plus ``size``."""
    height, width = image.shape[-2:]
    boxes = target["boxes"].as_subclass(Tensor).reshape(-1, 4)  # [N, 4] x0 y0 x1 y1
    cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=-1)  # [N, 4]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    pixels = normalize_image(image.as_subclass(Tensor).float() / 255)  # [3, H, W]
    return pixels, dict(target, boxes=cxcywh / scale, size=torch.tensor([height, width]))


def quick_run(config: StudyConfig, side: str, seed: int) -> QuickRun:
    """The training run of one side and seed (``lr_drop`` one epoch before the end)."""
    return QuickRun(
        preset=PRESET_OF_SIDE[side],
        epochs=config.epochs,
        lr_drop=max(config.epochs - 1, 1),
        train_images=config.train_images,
        val_images=config.val_images,
        seed=seed,
    )


def load_data(config: StudyConfig) -> CocoDetection:
    """The evaluation split: the synthetic val split, or ``config.data``'s val split."""
    if config.data == "synthetic":
        return quick_dataset(quick_run(config, "single", config.seeds[0]))
    root = Path(config.data)
    if not (root / "annotations").is_dir():
        raise FileNotFoundError(
            f"--data {config.data}: expected 'synthetic' or a COCO-layout folder with "
            "annotations/instances_val2017.json and val2017/"
        )
    if config.scale not in SCALES:
        raise ValueError(f"--scale {config.scale!r}: choose from {', '.join(SCALES)}")
    transforms = native_transforms if config.scale == "native" else build_transforms(config.scale, False)
    return CocoDetection(CocoPaths(root, "val"), transforms)


def checkpoints(config: StudyConfig) -> dict[str, list[Path]]:
    """Checkpoint files per side: the given ones, or (``train``) one trained per seed."""
    if config.train:
        if config.data != "synthetic":
            raise ValueError("--train trains on the embedded synthetic set: use it with --data synthetic")
        if config.single or config.multi:
            raise ValueError("give --train or --single/--multi checkpoints, not both")
        return {side: [quick_checkpoint(quick_run(config, side, seed)) for seed in config.seeds] for side in SIDES}
    found: dict[str, list[Path]] = {}
    for side in SIDES:
        paths = [Path(p) for p in getattr(config, side)]
        if not paths:
            raise ValueError(f"no --{side} checkpoint: give --single A.pth --multi B.pth, or --train")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--{side}: no such checkpoint file {', '.join(missing)}")
        found[side] = paths
    return found


def stage2_heads(model: Detector, sites: str) -> str:
    """Head counts of the studied sites, e.g. ``"1, 1"``."""
    return ", ".join(str(info.heads) for info in matched_sites(model, sites))


# ---------------------------------------------------------------------------------- accuracy
def accuracy_tables(
    models: dict[str, list[Detector]], paths: dict[str, list[Path]], dataset: CocoDetection, config: StudyConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per checkpoint: ``side, checkpoint, AP, ...``; per side and stat: ``side, stat, n, mean, std, min, max``."""
    rows = []
    for side in SIDES:
        for model, path in zip(models[side], paths[side], strict=True):
            stats = evaluate(model, dataset, config.batch_size, config.limit, config.progress, desc=f"evaluate {side}")
            rows.append({"side": side, "checkpoint": path.name, **{name: stats[name] for name in ACCURACY_STATS}})
    per_checkpoint = pd.DataFrame(rows)
    summary = []
    for side in SIDES:
        part = per_checkpoint[per_checkpoint["side"] == side]
        for name in ACCURACY_STATS:
            values = part[name].to_numpy(dtype=float)
            summary.append(
                {"side": side, "stat": name, "n": len(values), "mean": float(values.mean()),
                 "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                 "min": float(values.min()), "max": float(values.max())}
            )  # fmt: skip
    return per_checkpoint, pd.DataFrame(summary)


def accuracy_verdict(summary: pd.DataFrame, stat: str = "AP") -> str:
    """In words: the difference of the sides' mean ``stat`` against the spread between checkpoints."""
    by_side = {side: summary[(summary["side"] == side) & (summary["stat"] == stat)].iloc[0] for side in SIDES}
    single, multi = by_side["single"], by_side["multi"]
    difference = float(multi["mean"] - single["mean"])
    direction = "higher" if difference > 0 else "lower" if difference < 0 else "the same"
    said = f"The multi-head side's mean {stat} is {abs(difference):.4f} {direction} than the single-head side's"
    said = said if difference else f"Both sides have the same mean {stat}"
    if single["n"] < 2 and multi["n"] < 2:
        return (
            f"{said} ({multi['mean']:.4f} vs {single['mean']:.4f}). With one checkpoint per side there is no "
            "spread to compare it with: the difference is one draw of training noise or more (train several "
            "seeds with --train --seeds, or give --single / --multi several times)."
        )
    spread = max(float(single["max"] - single["min"]), float(multi["max"] - multi["min"]))
    exceeds = abs(difference) > spread
    return (
        f"{said} ({multi['mean']:.4f} vs {single['mean']:.4f}, {int(multi['n'])} and {int(single['n'])} "
        f"checkpoints). The spread between checkpoints of one side (the larger min-max range) is {spread:.4f}: "
        + (
            "the difference exceeds it."
            if exceeds
            else "the difference does not exceed it, so these checkpoints do not tell the two sides apart."
        )
    )


# ---------------------------------------------------------------------------------- cost
def grid_cells(size: tuple[int, int], stride: int) -> int:
    """Cells ``L = ceil(H / s) * ceil(W / s)`` of a stride-``s`` grid over an ``H x W`` input."""
    return math.ceil(size[0] / stride) * math.ceil(size[1] / stride)


def attention_flops(model: Detector, size: tuple[int, int], sites: str) -> pd.DataFrame:
    """FLOPs of each matched encoder site for one ``size`` image (a multiply-add counts 2).

    With ``L`` grid cells, ``heads`` heads of width ``d`` and ``E = heads * d``:
    ``QK^T`` and ``AV`` take ``2 * 2 * heads * L^2 * d = 4 L^2 E`` FLOPs (the same for any head
    count); the q, k, v and output projections ``4 * 2 * L * E^2``; the softmax runs over
    ``heads * L^2`` scores, which grows with the heads (as does the map a recording keeps).
    """
    rows = []
    for info in matched_sites(model, sites):
        if info.stride is None:
            continue
        cells = grid_cells(size, info.stride)
        width = info.heads * info.head_dim
        rows.append(
            {"site": info.name, "heads": info.heads, "head_dim": info.head_dim, "cells": cells,
             "attention_flops": 2 * 2 * info.heads * cells**2 * info.head_dim,
             "projection_flops": 4 * 2 * cells * width**2, "softmax_scores": info.heads * cells**2}
        )  # fmt: skip
    return pd.DataFrame(rows)


def interleaved_times(models: dict[str, Detector], images: Tensor, rounds: int) -> dict[str, float]:
    """Median seconds of one no-grad forward of each model on ``images``, the models taking turns
    within each round (after one warm-up forward each) so that machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(images)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(images)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class MemoryPeaks:
    """Peak tensor bytes of one forward (see :func:`memory_peaks`).

    Attributes:
        forward: peak over the whole forward, above what was live before it.
        site: the largest, over the studied sites, of the peak inside one call of the site (its
            projections, attention and output; with a recorder also the map it keeps), above what
            was live when the call started.
    """

    forward: int
    site: int


def replay_peak(events: Sequence[Any], window: tuple[float, float] | None = None) -> int:
    """Peak of the running sum of the events' own allocations (+) and frees (-), in time order.

    The profiler charges each allocation or free to the innermost op running at the time (or to a
    ``[memory]`` event between ops); an op's net positive bytes count at its start, net negative
    bytes at its end. ``window``: only events inside ``(start, end)`` (profiler microseconds).
    """
    points = []
    for event in events:
        delta = event.self_cpu_memory_usage
        begin, end = event.time_range.start, event.time_range.end
        if not delta or (window is not None and not (window[0] <= begin and end <= window[1])):
            continue
        points.append((begin if delta > 0 else end, delta))
    live = peak = 0
    for _, delta in sorted(points):
        live += delta
        peak = max(peak, live)
    return peak


def memory_peaks(model: Detector, sites: str, run: Callable[[], Any]) -> MemoryPeaks:
    """Peak bytes of tensors allocated by torch's CPU allocator while ``run()`` does one forward
    (torch.profiler memory events), for the whole forward and inside the studied sites.

    Each call of a studied site is bracketed by two empty ``record_function`` markers (forward
    pre-hook and hook, removed afterwards), whose times delimit the site's window.
    """
    studied = {info.name for info in matched_sites(model, sites)}
    modules = [module for name, module in model.attention_sites().items() if name in studied]

    def mark(label: str) -> Callable[..., None]:
        def hook(*_args: Any) -> None:
            with record_function(label):
                pass

        return hook

    handles = [m.register_forward_pre_hook(mark(SITE_START)) for m in modules]
    handles += [m.register_forward_hook(mark(SITE_END)) for m in modules]
    try:
        with torch.no_grad():
            run()  # warm-up: lazily made buffers are not part of the peak
            with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                run()
    finally:
        for handle in handles:
            handle.remove()
    events = list(prof.events())
    starts = sorted(e.time_range.end for e in events if e.name == SITE_START)
    ends = sorted(e.time_range.start for e in events if e.name == SITE_END)
    windows = list(zip(starts, ends, strict=True))
    return MemoryPeaks(
        forward=replay_peak(events),
        site=max((replay_peak(events, window) for window in windows), default=0),
    )


def recording_bytes(model: Detector, size: tuple[int, int], sites: str) -> int:
    """``sdetr.estimate_bytes`` of the maps A of ``sites`` (float16, batch 1) at input ``size``."""
    return sum(estimate_bytes(model, size, 1, sites=sites, selection=Selection(tensors=("a",))).values())


def cost_table(models: dict[str, Detector], size: tuple[int, int], config: StudyConfig) -> pd.DataFrame:
    """One row per side: parameters, heads, attention FLOPs, time, peak memory and recording bytes."""
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    times = interleaved_times(models, images, config.timing_rounds)
    rows = []
    for side, model in models.items():
        flops = attention_flops(model, size, config.sites)

        def forward(model: Detector = model) -> None:
            model(images)

        def recorded(model: Detector = model) -> None:
            with record(model, sites=config.sites, tensors=("a",)):
                model(images)

        plain, recording = memory_peaks(model, config.sites, forward), memory_peaks(model, config.sites, recorded)

        rows.append(
            {
                "side": side,
                "preset": model.config.name,
                "parameters": count_parameters(model),
                "stage2_encoder_heads": stage2_heads(model, config.sites),
                "attention_flops": int(flops["attention_flops"].sum()),
                "projection_flops": int(flops["projection_flops"].sum()),
                "softmax_scores": int(flops["softmax_scores"].sum()),
                "forward_ms": times[side] * 1000,
                "peak_forward_mib": plain.forward / 2**20,
                "peak_site_kib": plain.site / 2**10,
                "peak_site_recording_kib": recording.site / 2**10,
                "recording_bytes": recording_bytes(model, size, config.sites),
                "recording_bytes_800x1333": recording_bytes(model, FULL_SIZE, config.sites),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- behaviour
def behaviour_tables(
    models: dict[str, Detector], dataset: CocoDetection, config: StudyConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``head_statistics``, ``head_redundancy`` and ``qkv_statistics`` of both sides, with a ``side`` column."""
    found: dict[str, list[pd.DataFrame]] = {"stats": [], "redundancy": [], "qkv": []}
    common: dict[str, Any] = {"sites": config.sites, "batch_size": config.batch_size, "limit": config.limit,
              "progress": config.progress}  # fmt: skip
    for side, model in models.items():
        with eval_mode(model):
            parts = {
                "stats": head_statistics(model, dataset, **common),
                "redundancy": head_redundancy(model, dataset, **common),
                "qkv": qkv_statistics(model, dataset, **common),
            }
        for name, frame in parts.items():
            found[name].append(frame.assign(side=side)[["side", *frame.columns]])
    stats, redundancy, qkv = (pd.concat(found[name], ignore_index=True) for name in ("stats", "redundancy", "qkv"))
    return stats, redundancy, qkv


def behaviour_summary(stats: pd.DataFrame, redundancy: pd.DataFrame, qkv: pd.DataFrame) -> pd.DataFrame:
    """Per side x site x head: the attention statistics, the effective rank of Q and K and the
    head's mean JS divergence to the other heads of its site (NaN for a one-head site)."""
    columns = [c for c in ("norm_entropy", "distance_px", "local_mass", "object_mass") if c in stats.columns]
    table = stats[["side", "site", "head", *columns]].copy()
    for tensor in ("q", "k"):
        part = qkv[qkv["tensor"] == tensor][["side", "site", "head", "effective_rank"]]
        table = table.merge(part.rename(columns={"effective_rank": f"rank_{tensor}"}), on=["side", "site", "head"])
    others = redundancy[redundancy["head_i"] != redundancy["head_j"]]
    js = others.groupby(["side", "site", "head_i"], as_index=False)["js_divergence"].mean()
    js = js.rename(columns={"head_i": "head", "js_divergence": "js_to_others"})
    table = table.merge(js, on=["side", "site", "head"], how="left")
    table["site"] = table["site"].str.removesuffix(".self_attn")
    return table


# ---------------------------------------------------------------------------------- report
@dataclass
class Report:
    """Markdown being assembled, and the files written next to it (relative names)."""

    out: Path
    dpi: int
    lines: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def csv(self, frame: pd.DataFrame, name: str) -> str:
        write_csv(frame, self.out / name)
        self.files.append(name)
        return name

    def figure(self, figure: Figure, name: str, caption: str) -> None:
        write_figure(figure, self.out / name, self.dpi)
        self.files.append(name)
        self.add(f"![{caption}]({name})", "", f"*{caption}*", "")


def necessity_summary(ablation: dict[str, pd.DataFrame]) -> str:
    """In words: the baseline AP of each side and what removing heads or sites does to it."""

    def changes(table: pd.DataFrame, ablated: str) -> str:
        part = table[table["ablated"] == ablated]
        return ", ".join(
            f"{r.site.removesuffix('.self_attn')}{'' if ablated == 'site' else f' h{r.head}'} {r.dAP:+.4f}"
            for r in part.itertuples()
        )

    multi, single = ablation["multi"], ablation["single"]
    heads = multi[multi["ablated"] == "head"]
    said = [
        f"Baseline AP: multi {multi['AP'].iloc[0]:.4f}, single {single['AP'].iloc[0]:.4f}.",
        f"Multi, one head removed: dAP from {heads['dAP'].min():+.4f} to {heads['dAP'].max():+.4f}"
        f" ({changes(multi, 'head')}).",
    ]
    if (multi["ablated"] == "site").any():
        said.append(f"Multi, a whole site removed: {changes(multi, 'site')}.")
    said.append(f"Single, its one head (the whole site) removed: {changes(single, 'head')}.")
    return " ".join(said)


def _side_models(paths: dict[str, list[Path]]) -> dict[str, list[Detector]]:
    return {side: [load_model(path) for path in paths[side]] for side in SIDES}


def run_study(config: StudyConfig) -> Path:
    """Run every section and write ``config.out/report.md`` (and its CSVs / PNGs); returns its path."""
    previous = torch.get_num_threads()
    if config.threads is not None:
        if config.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {config.threads}")
        torch.set_num_threads(config.threads)
    try:
        return _run_study(config)
    finally:
        torch.set_num_threads(previous)


def _run_study(config: StudyConfig) -> Path:
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(config)
    checkpoints_s = time.perf_counter() - started
    dataset = load_data(config)
    if len(dataset) == 0:
        raise ValueError(f"--data {config.data}: the val split has no images")
    models = _side_models(paths)
    first = {side: models[side][0] for side in SIDES}
    images_used = len(dataset) if config.limit is None else min(config.limit, len(dataset))
    size = config.size or tuple(int(v) for v in dataset[0][0].shape[-2:])
    assert len(size) == 2
    report = Report(out, config.dpi)
    report.add(
        "# Heads study: one head or several in the stage-2 encoder",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m analysis.heads_study` "
        f"(torch {torch.__version__}, torch threads: {torch.get_num_threads()}, {platform.machine()} CPU).",
        "",
        f"- data: `{config.data}` val split, {images_used} of {len(dataset)} images"
        + ("" if config.data == "synthetic" else f", scale `{config.scale}`"),
        f"- sites studied: `{config.sites}`",
        *[
            f"- {side}: {', '.join(f'`{p}`' for p in paths[side])} (preset `{first[side].config.name}`, "
            f"stage-2 encoder heads {stage2_heads(first[side], config.sites)})"
            for side in SIDES
        ],
        "- behaviour, necessity and cost use the first checkpoint of each side.",
        "",
    )

    # accuracy
    per_checkpoint, summary = accuracy_tables(models, paths, dataset, config)
    report.add("## Accuracy", "", "COCO bbox stats (pycocotools COCOeval) of each checkpoint on the same split:", "")
    report.add(
        markdown_table(per_checkpoint, digits=4), "", "Per side (std over checkpoints; `-` with one checkpoint):", ""
    )
    report.add(markdown_table(summary[summary["stat"].isin(["AP", "AP50", "APs"])], digits=4), "")
    report.add(accuracy_verdict(summary, "AP"), "", accuracy_verdict(summary, "AP50"), "")
    report.add(
        f"Files: `{report.csv(per_checkpoint, 'accuracy.csv')}`, `{report.csv(summary, 'accuracy_summary.csv')}`.", ""
    )

    # cost
    cost = cost_table(first, size, config)
    flops = pd.concat([attention_flops(first[s], size, config.sites).assign(side=s) for s in SIDES], ignore_index=True)
    shown = cost.copy()
    for column in ("recording_bytes", "recording_bytes_800x1333"):
        shown[column] = [format_bytes(v) for v in shown[column]]
    flops_shown = flops[["side", *[c for c in flops.columns if c != "side"]]].copy()
    for frame in (shown, flops_shown):
        for column in ("parameters", "attention_flops", "projection_flops", "softmax_scores"):
            if column in frame:
                frame[column] = [f"{v:,}" for v in frame[column]]
    report.add(
        "## Cost",
        "",
        f"At input {size[0]}x{size[1]} (batch 1) unless stated. `parameters`: trainable "
        "(`sdetr.count_parameters`). Attention FLOPs per image of a stride-s encoder site with "
        "L = ceil(H/s) * ceil(W/s) cells, h heads of width d (E = h d), a multiply-add counted as 2: "
        "QK^T and AV take 2 * 2 * h * L^2 * d = 4 L^2 E (`attention_flops`, summed over the studied "
        "sites; the same for any head count), the q/k/v/output projections 4 * 2 * L * E^2 "
        "(`projection_flops`); the softmax runs over h * L^2 scores (`softmax_scores`), which grows "
        "with the heads.",
        "",
        f"`forward_ms`: median of {config.timing_rounds} no-grad forwards of a random image, the two models "
        "taking turns in each round (one process, after a warm-up). Memory is the peak of the bytes of "
        "tensors allocated by torch's CPU allocator (torch.profiler memory events, allocations minus frees "
        "in time order): `peak_forward_mib` over one forward, above what was live before it; "
        "`peak_site_kib` inside one call of a studied site (projections, attention, output), above what "
        "was live when the call started, the largest over the sites; `peak_site_recording_kib` the same "
        "while the studied sites' maps are recorded (explicit attention path, float16 copies kept). "
        "`recording_bytes`: `sdetr.estimate_bytes` of the studied sites' maps A (float16, batch 1) at "
        f"{size[0]}x{size[1]} and at 800x1333.",
        "",
        markdown_table(shown, digits=3),
        "",
        "Per site:",
        "",
        markdown_table(flops_shown),
        "",
    )
    ratio = cost["forward_ms"].iloc[1] / cost["forward_ms"].iloc[0]
    report.add(
        f"Forward time multi / single: {ratio:.3f}. The machine's other load moves these timings; only "
        "their ratio within this run is comparable.",
        "",
        f"Files: `{report.csv(cost, 'cost.csv')}`, `{report.csv(flops, 'cost_sites.csv')}`.",
        "",
    )

    # behaviour
    stats, redundancy, qkv = behaviour_tables(first, dataset, config)
    report.add(
        "## Behaviour",
        "",
        "Statistics of the studied sites over the split (`analysis.head_statistics`, "
        "`analysis.qkv_statistics`): `norm_entropy` (entropy / log(keys); 1 = uniform), `distance_px` "
        "(mean attention distance in input pixels), `local_mass` (attention on the 3x3 cells around the "
        "query), `object_mass` (attention of a query cell inside a ground-truth box on cells of the same "
        "box), `rank_q` / `rank_k` (effective rank of the head's queries / keys), `js_to_others` (mean "
        "Jensen-Shannon divergence to the other heads of the site, nats, at most log 2 = 0.693; low = "
        "redundant heads).",
        "",
        markdown_table(behaviour_summary(stats, redundancy, qkv)),
        "",
    )
    for side in SIDES:
        part = stats[stats["side"] == side]
        report.figure(plot_attention_distance(part), f"attention_distance_{side}.png", f"Attention distance, {side}")
        report.figure(plot_head_entropy(part), f"entropy_{side}.png", f"Normalised attention entropy, {side}")
        report.figure(plot_effective_rank(qkv[qkv["side"] == side]), f"effective_rank_{side}.png",
                      f"Effective rank of Q and K, {side}")  # fmt: skip
    multi_redundancy = redundancy[redundancy["side"] == "multi"]
    if (multi_redundancy["head_i"] != multi_redundancy["head_j"]).any():
        report.figure(
            plot_redundancy(multi_redundancy), "redundancy_multi.png", "Head redundancy (JS divergence), multi"
        )
    report.add(
        f"Files: `{report.csv(stats, 'statistics.csv')}`, `{report.csv(redundancy, 'redundancy.csv')}`, "
        f"`{report.csv(qkv, 'qkv.csv')}`.",
        "",
    )

    # necessity
    common: dict[str, Any] = {"sites": config.sites, "batch_size": config.batch_size, "limit": config.limit,
              "progress": config.progress}  # fmt: skip
    importance = pd.concat(
        [head_importance(first[side], dataset, **common).assign(side=side) for side in SIDES], ignore_index=True
    )
    importance = importance[["side", *[c for c in importance.columns if c != "side"]]]
    ablation = {side: ablation_table(first[side], dataset, **common) for side in SIDES}
    multi_importance = importance[importance["side"] == "multi"]
    curve = pd.concat(
        [
            pruning_curve(
                first["multi"],
                dataset,
                order="importance",
                importance=multi_importance,
                max_removed=config.prune_steps,
                **common,
            ),
            pruning_curve(
                first["multi"],
                dataset,
                order="random",
                seed=config.random_seed,
                max_removed=config.prune_steps,
                **common,
            ),
        ],
        ignore_index=True,
    )
    report.add(
        "## Necessity",
        "",
        "Importance (Michel et al., 2019): every head gets a gate g = 1 on its output before the output "
        "projection; `importance` = mean over batches of |dL/dg| for the DETR loss L, `importance_norm` "
        "= importance / L2 norm of the site's importances. Ablation: COCO AP with one head (or a whole "
        "site, head -1 / `site`) gated to 0; `dAP` = AP - baseline AP (`-`: COCOeval has no objects of "
        "that size). Pruning: AP as the multi-head model's heads are gated to 0 cumulatively, least "
        "important (`importance_norm`) first, and in a random order (seed "
        f"{config.random_seed}) as the control.",
        "",
        markdown_table(importance.drop(columns=["stage", "kind"]), digits=4),
        "",
        "Ablation, multi:",
        "",
        markdown_table(ablation["multi"], digits=4),
        "",
        "Ablation, single:",
        "",
        markdown_table(ablation["single"], digits=4),
        "",
    )
    report.figure(plot_ablation(ablation["multi"], title="Ablation, multi: dAP per head"), "ablation_multi.png",
                  "Ablation of each head (hatched: the whole site), multi")  # fmt: skip
    report.figure(plot_ablation(ablation["single"], title="Ablation, single: dAP per site"), "ablation_single.png",
                  "Ablation of each site's single head, single")  # fmt: skip
    report.add(necessity_summary(ablation), "", "Pruning curve, multi:", "", markdown_table(curve, digits=4), "")
    report.figure(plot_pruning_curve(curve), "pruning_multi.png", "AP as heads are removed, multi")
    report.add(
        f"Files: `{report.csv(importance, 'importance.csv')}`, "
        f"`{report.csv(ablation['multi'], 'ablation_multi.csv')}`, "
        f"`{report.csv(ablation['single'], 'ablation_single.csv')}`, `{report.csv(curve, 'pruning.csv')}`.",
        "",
        f"Study time: {time.perf_counter() - started:.0f} s, of which {checkpoints_s:.0f} s finding or training "
        "the checkpoints (training only when they were not cached yet).",
        "",
    )
    return write_text(out / "report.md", "\n".join(report.lines))


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> StudyConfig:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.heads_study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="default", choices=sorted(STUDY_PRESETS), help="starting configuration")
    parser.add_argument("--single", action="append", help="a single-head checkpoint (repeat for several)")
    parser.add_argument("--multi", action="append", help="a multi-head checkpoint (repeat for several)")
    parser.add_argument("--data", help="'synthetic' or a COCO-layout root (default synthetic)")
    parser.add_argument("--out", help="output folder (default outputs/heads_study)")
    parser.add_argument("--scale", choices=SCALES, help="transforms for a COCO-layout --data (default full)")
    parser.add_argument("--train", action="store_true", default=None, help="train both sides first (cached)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds with --train (one checkpoint each)")
    parser.add_argument("--epochs", type=int, help="training epochs with --train")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--limit", type=int, help="at most this many images in every pass")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size of the cost section")
    parser.add_argument("--rounds", type=int, dest="timing_rounds", help="interleaved timing rounds")
    parser.add_argument("--prune_steps", type=int, help="heads removed by each pruning curve (default all)")
    parser.add_argument("--dpi", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads during the study (default: torch's)")
    parser.add_argument("--no_progress", action="store_false", dest="progress", default=None)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    overrides = {key: value for key, value in args.items() if value is not None}
    for key in ("single", "multi", "seeds", "size"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    if "seeds" in overrides and not overrides.get("train"):
        parser.error("--seeds applies to --train (the seeds of the trained checkpoints)")
    return get_study_config(preset, **overrides)


def main(argv: Sequence[str] | None = None) -> Path:
    config = parse_args(argv)
    path = run_study(config)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
