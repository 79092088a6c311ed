"""Analyses of SDETR / DETR attention and detections, built on ``sdetr``'s public API.

Functions return tidy pandas DataFrames (one row per site x head, per bin, per class ...);
separate ``plot_*`` functions return matplotlib Figures. Dataset-level analyses take images, a
``CocoDetection`` or a DataLoader (:mod:`analysis.batches`), stream through ``sdetr.record``'s
callback, and show a tqdm bar. Every AP goes through pycocotools' COCOeval.

- attention heads: :mod:`~analysis.head_statistics`, :mod:`~analysis.qkv_statistics`,
  :mod:`~analysis.head_importance`, and the study ``python -m analysis.heads_study``;
- detections: :mod:`~analysis.breakdowns`, :mod:`~analysis.error_breakdown`,
  :mod:`~analysis.detection_plots`;
- explanations: :mod:`~analysis.attribution` (captum), :mod:`~analysis.relevance`;
- exploration: :mod:`~analysis.qkva`, :mod:`~analysis.explorer`, :mod:`~analysis.training_probes`;
- figures: ``python -m analysis.figures``.
"""

from typing import Any

from analysis.attribution import Attribution, attribute, plot_attribution, plot_attributions
from analysis.batches import Batch, iter_batches
from analysis.breakdowns import class_breakdown, size_breakdown, stage_breakdown
from analysis.detection_grid import plot_detection_grid
from analysis.detection_plots import plot_class_breakdown, plot_detections, plot_error_breakdown, plot_size_breakdown
from analysis.error_breakdown import classify_errors, error_breakdown
from analysis.evaluation import Detections, detect, evaluate
from analysis.explorer import QKVAExplorer, plot_attention_at, record_cell, unnormalize_image
from analysis.head_importance import ablation_table, head_importance, plot_ablation, plot_pruning_curve, pruning_curve
from analysis.head_statistics import (
    head_redundancy,
    head_statistics,
    plot_attention_distance,
    plot_head_entropy,
    plot_redundancy,
    redundancy_matrix,
)
from analysis.qkv_statistics import plot_effective_rank, qkv_statistics
from analysis.qkva import plot_qkva, principal_component
from analysis.quick_model import QuickRun, quick_checkpoint, quick_dataset
from analysis.relevance import RelevanceResult, attention_rollout, plot_relevance, relevance
from analysis.style import paper_style
from analysis.training_probes import ProbeRun, maps_over_epochs, plot_epoch_maps, probe_recordings

#: Names of the command modules, imported on first use (so ``python -m analysis.heads_study``
#: does not import its own module twice).
_LAZY = {
    "StudyConfig": "analysis.heads_study",
    "get_study_config": "analysis.heads_study",
    "run_study": "analysis.heads_study",
    "make_figures": "analysis.figures",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = [
    # data and evaluation
    "Batch",
    "Detections",
    "QuickRun",
    "detect",
    "evaluate",
    "iter_batches",
    "quick_checkpoint",
    "quick_dataset",
    # attention heads
    "StudyConfig",
    "ablation_table",
    "get_study_config",
    "head_importance",
    "head_redundancy",
    "head_statistics",
    "plot_ablation",
    "plot_attention_distance",
    "plot_effective_rank",
    "plot_head_entropy",
    "plot_pruning_curve",
    "plot_redundancy",
    "pruning_curve",
    "qkv_statistics",
    "redundancy_matrix",
    "run_study",
    # detections
    "class_breakdown",
    "classify_errors",
    "error_breakdown",
    "plot_class_breakdown",
    "plot_detection_grid",
    "plot_detections",
    "plot_error_breakdown",
    "plot_size_breakdown",
    "size_breakdown",
    "stage_breakdown",
    # explanations
    "Attribution",
    "RelevanceResult",
    "attention_rollout",
    "attribute",
    "plot_attribution",
    "plot_attributions",
    "plot_relevance",
    "relevance",
    # exploration and figures
    "ProbeRun",
    "QKVAExplorer",
    "make_figures",
    "maps_over_epochs",
    "paper_style",
    "plot_attention_at",
    "plot_epoch_maps",
    "plot_qkva",
    "principal_component",
    "probe_recordings",
    "record_cell",
    "unnormalize_image",
]
