"""Writing analysis results: text, CSV tables and figures, each atomically and reproducibly.

Every writer goes through ``sdetr.atomic_path`` (temporary file + rename), so an interrupted
run never leaves a half-written report. Figures are saved without dates or software versions
in their metadata, so the same figure gives the same bytes on every run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import DETERMINISTIC_METADATA
from sdetr import atomic_path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` (without its index) as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_figure(
    figure: Figure, path: str | Path, dpi: int = 100, formats: Sequence[str] = ("png",), close: bool = True
) -> list[Path]:
    """Save ``figure`` as ``path`` with each suffix in ``formats`` (``png``, ``pdf``), atomically and
    without time stamps, then close it; returns the files written."""
    written = []
    try:
        for suffix in formats:
            target = Path(path).with_suffix(f".{suffix}")
            with atomic_path(target) as tmp:
                figure.savefig(tmp, dpi=dpi, format=suffix, metadata=DETERMINISTIC_METADATA.get(suffix))
            written.append(target)
    finally:
        if close:
            plt.close(figure)
    return written


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-markdown table of ``frame``; floats rounded to ``digits``, NaN shown as ``-``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
