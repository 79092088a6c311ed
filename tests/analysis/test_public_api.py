"""``analysis`` is built on ``sdetr``'s public API only (the names in ``sdetr.__all__``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sdetr

ANALYSIS = Path(__file__).resolve().parents[2] / "analysis"


@pytest.mark.parametrize("path", sorted(ANALYSIS.glob("*.py")), ids=lambda p: p.name)
def test_analysis_imports_only_public_sdetr_names(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sdetr":
            assert node.module == "sdetr", (
                f"{path.name}:{node.lineno} imports from {node.module}; use `from sdetr import`"
            )
            private = [alias.name for alias in node.names if alias.name not in sdetr.__all__]
            assert not private, f"{path.name}:{node.lineno} imports {private}, not in sdetr.__all__"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("sdetr."), f"{path.name}:{node.lineno} imports {alias.name}"


def test_analysis_never_sets_a_matplotlib_backend() -> None:
    for path in ANALYSIS.glob("*.py"):
        source = path.read_text()
        assert "matplotlib.use(" not in source and "pyplot.switch_backend" not in source, path.name
