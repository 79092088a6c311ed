"""One figure style for papers: fonts, sizes and colormaps, applied only inside ``paper_style()``.

Nothing here runs at import time: the style is a ``matplotlib.rc_context``, so notebooks and
other code keep their own settings outside the block.

Sizes follow a two-column paper: a single column is 3.4 in wide, the full page 7.0 in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import matplotlib as mpl

SINGLE_COLUMN_IN = 3.4
DOUBLE_COLUMN_IN = 7.0

#: Colormaps used across the project's figures.
ATTENTION_CMAP = "magma"  # attention maps and relevance (non-negative, sequential)
DIVERGING_CMAP = "coolwarm"  # signed projections (Q/K/V principal components, attributions)
SEQUENTIAL_CMAP = "viridis"  # divergences, ranks and other non-negative statistics
CATEGORICAL = "tab10"

RC_PARAMS: dict[str, Any] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "axes.grid": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": SEQUENTIAL_CMAP,
    "axes.prop_cycle": mpl.cycler(color=list(mpl.colormaps[CATEGORICAL].colors)),  # type: ignore[attr-defined]
    "svg.hashsalt": "sdetr",  # deterministic ids in vector output
    "pdf.fonttype": 42,  # TrueType in PDFs (editable text)
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Inside the block, new figures use the project's paper style."""
    with mpl.rc_context(cast(Any, RC_PARAMS)):
        yield


#: ``savefig`` metadata that keeps files byte-identical across runs (no dates, no versions).
DETERMINISTIC_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}
