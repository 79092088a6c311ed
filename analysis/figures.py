"""Every figure of the README and the heads study from a checkpoint, in one command.

``python -m analysis.figures --checkpoint CKPT [--multi CKPT] [--data synthetic|COCO_PATH] --out figures/``

writes each figure as PNG and PDF in one style (:mod:`analysis.style`), deterministically (the
same inputs give byte-identical files: fixed seeds, fixed thread count, no dates in the files),
and ``manifest.json``: every figure with its files and their SHA-256, the checkpoints and their
weights' SHA-256, the data and the command. ``--checkpoint quick`` trains (once, cached) the
small model of :mod:`analysis.quick_model`.

The figures come from a registry (:data:`FIGURES`): name -> a function of a :class:`Context`
returning a matplotlib Figure. ``--only NAME ...`` makes a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure

from analysis.attribution import attribute, plot_attributions
from analysis.batches import boxes_in_pixels
from analysis.breakdowns import class_breakdown, stage_breakdown
from analysis.detection_plots import plot_class_breakdown, plot_detections, plot_error_breakdown, plot_size_breakdown
from analysis.error_breakdown import error_breakdown
from analysis.evaluation import detect
from analysis.explorer import unnormalize_image
from analysis.head_importance import ablation_table, plot_ablation, plot_pruning_curve, pruning_curve
from analysis.head_statistics import (
    head_redundancy,
    head_statistics,
    plot_attention_distance,
    plot_head_entropy,
    plot_redundancy,
)
from analysis.qkv_statistics import plot_effective_rank, qkv_statistics
from analysis.qkva import plot_qkva
from analysis.quick_model import quick_checkpoint
from analysis.relevance import attention_rollout, plot_relevance, relevance
from analysis.style import paper_style
from analysis.writers import sha256_file, write_csv, write_figure, write_text
from sdetr import (
    CocoDetection,
    CocoPaths,
    Detector,
    SyntheticSpec,
    build_transforms,
    generate_synthetic_coco,
    load_model,
    postprocess,
    record,
    weights_sha256,
)


@dataclass
class Context:
    """What the figures are made from; statistics are computed once and shared between figures.

    Attributes:
        model: the main checkpoint's model (eval mode).
        multi: a second model (the multi-head side of the heads study), or None.
        dataset: the evaluation split (``CocoDetection`` with evaluation transforms).
        images: how many images the dataset-level statistics and evaluations use.
        batch_size: batch size of those passes.
    """

    model: Detector
    multi: Detector | None
    dataset: CocoDetection
    images: int = 16
    batch_size: int = 2
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_sites(self) -> str:
        return "*.encoder.*"

    def last_encoder_site(self, model: Detector) -> str:
        stage = model.num_stages
        layers = model.config.stages[-1].encoder_layers
        return f"stage{stage}.encoder.{layers - 1}.self_attn"

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def tables(self) -> dict[str, pd.DataFrame]:
        """The DataFrames computed so far, by key, in key order."""
        return {key: value for key, value in sorted(self._cache.items()) if isinstance(value, pd.DataFrame)}

    @cached_property
    def first_image(self) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.dataset[0]

    def stats(self, model: Detector, key: str) -> pd.DataFrame:
        return self.memo(
            f"stats/{key}",
            lambda: head_statistics(model, self.dataset, self.encoder_sites, self.batch_size, limit=self.images),
        )

    def detections(self) -> tuple[list[dict[str, Any]], list[int]]:
        def run() -> tuple[list[dict[str, Any]], list[int]]:
            found = detect(self.model, self.dataset, self.batch_size, limit=self.images, desc="detect")
            return next(iter(found.results.values()), []), found.image_ids

        result: tuple[list[dict[str, Any]], list[int]] = self.memo("detections", run)
        return result


# ---------------------------------------------------------------------------------- figures
def qkva_grid(ctx: Context) -> Figure:
    image, _ = ctx.first_image
    site = ctx.last_encoder_site(ctx.model)
    with torch.no_grad(), record(ctx.model, sites=site, dtype=torch.float32) as rec:
        ctx.model([image])
    return plot_qkva(rec[site], unnormalize_image(image))


def attention_distance(ctx: Context) -> Figure:
    return plot_attention_distance(ctx.stats(ctx.model, "main"))


def head_entropy(ctx: Context) -> Figure:
    return plot_head_entropy(ctx.stats(ctx.model, "main"))


def head_redundancy_map(ctx: Context) -> Figure:
    model = ctx.multi or ctx.model
    frame = ctx.memo(
        "redundancy",
        lambda: head_redundancy(model, ctx.dataset, ctx.encoder_sites, ctx.batch_size, limit=ctx.images),
    )
    return plot_redundancy(frame)


def effective_rank(ctx: Context) -> Figure:
    frame = ctx.memo(
        "qkv", lambda: qkv_statistics(ctx.model, ctx.dataset, ctx.encoder_sites, ctx.batch_size, limit=ctx.images)
    )
    return plot_effective_rank(frame)


def size_by_decoder_output(ctx: Context) -> Figure:
    frame = ctx.memo("stages", lambda: stage_breakdown(ctx.model, ctx.dataset, ctx.batch_size, limit=ctx.images))
    return plot_size_breakdown(frame)


def class_aps(ctx: Context) -> Figure:
    results, image_ids = ctx.detections()
    return plot_class_breakdown(class_breakdown(ctx.dataset.coco, results, image_ids=image_ids))


def error_types(ctx: Context) -> Figure:
    results, image_ids = ctx.detections()
    return plot_error_breakdown(error_breakdown(ctx.dataset.coco, results, ("all", "small"), image_ids=image_ids))


def detections_viewer(ctx: Context) -> Figure:
    image, target = ctx.first_image
    with torch.no_grad():
        out = ctx.model([image])
    size = torch.as_tensor(target["size"])[None]  # [1, 2]: draw on the network's input image
    found = postprocess(out, size)[0]
    names = {int(c["id"]): str(c["name"]) for c in ctx.dataset.coco.loadCats(ctx.dataset.coco.getCatIds())}
    return plot_detections(
        unnormalize_image(image), boxes_in_pixels(target), found, target["labels"], category_names=names
    )


def attributions(ctx: Context) -> Figure:
    image, _ = ctx.first_image
    maps = [
        attribute(ctx.model, image, method="integrated_gradients", n_steps=16),
        attribute(ctx.model, image, method="saliency"),
        attribute(ctx.model, image, method="occlusion", window=ctx.model.stages[-1].stride),
        attribute(ctx.model, image, method="layer_gradcam"),
    ]
    return plot_attributions(unnormalize_image(image), maps)


def relevance_maps(ctx: Context) -> Figure:
    image, _ = ctx.first_image
    return plot_relevance(unnormalize_image(image), relevance(ctx.model, image))


def rollout_maps(ctx: Context) -> Figure:
    image, _ = ctx.first_image
    return plot_relevance(unnormalize_image(image), attention_rollout(ctx.model, image))


def head_ablation(ctx: Context) -> Figure:
    model = ctx.multi or ctx.model
    table = ctx.memo(
        "ablation", lambda: ablation_table(model, ctx.dataset, "stage2.encoder.*", ctx.batch_size, limit=ctx.images)
    )
    return plot_ablation(table, title=f"{model.config.name}: stage-2 encoder heads ablated one at a time")


def head_pruning(ctx: Context) -> Figure:
    model = ctx.multi or ctx.model
    curve = ctx.memo(
        "pruning", lambda: pruning_curve(model, ctx.dataset, "stage2.encoder.*", batch_size=ctx.batch_size,
                                         limit=ctx.images)
    )  # fmt: skip
    return plot_pruning_curve(curve, title=f"{model.config.name}: stage-2 encoder heads removed, least important first")


#: Every figure: name -> (maker, what it shows).
FIGURES: dict[str, tuple[Callable[[Context], Figure], str]] = {
    "qkva_grid": (qkva_grid, "Q, K, V and one query cell's A of the last encoder site, on the first image"),
    "attention_distance": (attention_distance, "mean attention distance per head per encoder layer (ViT-style)"),
    "head_entropy": (head_entropy, "normalised attention entropy per head per encoder layer"),
    "head_redundancy": (head_redundancy_map, "Jensen-Shannon divergence between heads of each encoder site"),
    "effective_rank": (effective_rank, "effective rank of Q and K per head per encoder layer"),
    "size_by_decoder_output": (size_by_decoder_output, "AP per object-size bin for every decoder output"),
    "class_aps": (class_aps, "AP per class (AP, APs, APm, APl)"),
    "error_types": (error_types, "TIDE-style dAP per error type, all objects and small ones"),
    "detections": (detections_viewer, "detections on the first image, coloured by match status"),
    "attributions": (attributions, "captum attributions of the top detection: IG, saliency, occlusion, Grad-CAM"),
    "relevance": (relevance_maps, "Chefer et al. relevance of the top detection, per stage at its own stride"),
    "rollout": (rollout_maps, "attention rollout of the top detection, per stage"),
    "head_ablation": (head_ablation, "dAP when each stage-2 encoder head (and the whole site) is gated to 0"),
    "head_pruning": (head_pruning, "AP as stage-2 encoder heads are removed, least important first"),
}


# ---------------------------------------------------------------------------------- command
def load_dataset(data: str, scale: str | None = None) -> CocoDetection:
    """The validation split to draw from: ``synthetic`` is the quickstart's (made on first use),
    anything else a COCO-layout folder.

    ``scale`` names the evaluation resize (``sdetr.build_transforms``); None picks ``synthetic``
    for a synthetic set (its annotation file records the spec it was made from) and the
    original ``full`` (short side 800) for any other folder.
    """
    root = generate_synthetic_coco(SyntheticSpec()) if data == "synthetic" else Path(data)
    paths = CocoPaths(root, "val")
    if scale is None:
        try:
            info = json.loads(paths.annotations.read_text()).get("info") or {}
        except (OSError, ValueError, AttributeError):
            info = {}  # CocoDetection below reports a missing or broken file properly
        scale = "synthetic" if isinstance(info, dict) and "spec" in info else "full"
    return CocoDetection(paths, build_transforms(scale, False))


def resolve_checkpoint(value: str) -> Path:
    return quick_checkpoint() if value == "quick" else Path(value)


def make_figures(
    checkpoint: str,
    out: str | Path,
    multi: str | None = None,
    data: str = "synthetic",
    images: int = 16,
    batch_size: int = 2,
    only: Sequence[str] | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    command: Sequence[str] | None = None,
    scale: str | None = None,
    dpi: int = 150,
) -> Path:
    """Write the figures and ``manifest.json`` to ``out``; returns the manifest's path."""
    unknown = sorted(set(only or ()) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; available: {', '.join(FIGURES)}")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums, so the same pixels, on every run
    try:
        main_path = resolve_checkpoint(checkpoint)
        multi_path = None if multi is None else resolve_checkpoint(multi)
        ctx = Context(
            model=load_model(main_path),
            multi=None if multi_path is None else load_model(multi_path),
            dataset=load_dataset(data, scale),
            images=images,
            batch_size=batch_size,
        )
        out_dir = Path(out)
        entries = []
        with paper_style():
            for name, (maker, description) in FIGURES.items():
                if only and name not in only:
                    continue
                files = write_figure(maker(ctx), out_dir / name, dpi=dpi, formats=formats)
                entries.append(
                    {
                        "name": name,
                        "description": description,
                        "files": {path.name: sha256_file(path) for path in files},
                    }
                )
        tables = {}
        for key, frame in ctx.tables().items():  # the numbers behind the figures
            path = write_csv(frame, out_dir / "data" / f"{key.replace('/', '_')}.csv")
            tables[path.name] = sha256_file(path)
    finally:
        torch.set_num_threads(threads)
    manifest = {
        "command": list(command) if command is not None else None,
        "checkpoint": {"path": str(main_path), "weights_sha256": weights_sha256(ctx.model)},
        "multi": None if ctx.multi is None else {"path": str(multi_path), "weights_sha256": weights_sha256(ctx.multi)},
        "data": data,
        "scale": scale,
        "images": images,
        "dpi": dpi,
        "figures": entries,
        "tables": tables,
    }
    return write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model file (sdetr, original SDETR/DETR), or 'quick'")
    parser.add_argument("--multi", help="second model, e.g. the multi-head stage-2 encoder of the heads study")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (default) or a COCO folder")
    parser.add_argument("--out", default="figures", help="output folder (default: figures/)")
    parser.add_argument("--scale", choices=["full", "tiny", "synthetic"], help="evaluation resize (default: by data)")
    parser.add_argument("--images", type=int, default=16, help="images for statistics and evaluation")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--dpi", type=int, default=150, help="raster resolution of the PNGs")
    parser.add_argument("--only", nargs="*", choices=list(FIGURES), help="make only these figures")
    parser.add_argument("--formats", nargs="*", default=["png", "pdf"], choices=["png", "pdf", "svg"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    manifest = make_figures(
        args.checkpoint,
        args.out,
        multi=args.multi,
        data=args.data,
        images=args.images,
        batch_size=args.batch_size,
        only=args.only,
        formats=args.formats,
        scale=args.scale,
        dpi=args.dpi,
        command=["python", "-m", "analysis.figures", *(sys.argv[1:] if argv is None else argv)],
    )
    print(f"wrote {manifest}")
    return manifest


if __name__ == "__main__":
    main()
