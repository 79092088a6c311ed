"""Instrumented attention: site names, recording Q/K/V/A grids, interventions, files."""

from sdetr.instrument.catalog import SiteInfo, sites
from sdetr.instrument.grids import GridGeometry, SiteGrids, feature_size
from sdetr.instrument.interventions import gate_heads, patch_attention
from sdetr.instrument.recorder import (
    Recorder,
    RecordingBudgetError,
    Selection,
    estimate_bytes,
    format_bytes,
    record,
)
from sdetr.instrument.storage import Recording, RecordingError, load_recording, save_recording, weights_sha256

__all__ = [
    "GridGeometry",
    "Recorder",
    "Recording",
    "RecordingBudgetError",
    "RecordingError",
    "Selection",
    "SiteGrids",
    "SiteInfo",
    "estimate_bytes",
    "feature_size",
    "format_bytes",
    "gate_heads",
    "load_recording",
    "patch_attention",
    "record",
    "save_recording",
    "sites",
    "weights_sha256",
]
