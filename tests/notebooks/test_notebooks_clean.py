"""Notebooks are committed without outputs (``make strip-notebooks`` clears them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def test_there_are_notebooks() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_has_no_outputs(path: Path) -> None:
    notebook = json.loads(path.read_text())
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            where = f"{path.name} cell {index}: run `make strip-notebooks` before committing"
            assert cell["outputs"] == [], where
            assert cell["execution_count"] is None, where
    assert "widgets" not in notebook["metadata"], f"{path.name}: saved widget state; run `make strip-notebooks`"
    tagged = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters' (the checkpoint and size knobs)"
