"""Every notebook runs top to bottom in a fresh kernel, with small parameters.

Each notebook's ``parameters``-tagged cell is rewritten with :data:`FAST` values (names it does
not define are ignored), then nbclient executes it; any error fails the test. ``SDETR_CACHE``
points at one folder for the whole session (shared by the xdist workers, which take turns under
a file lock), so the small model the notebooks train when given no checkpoint is trained once.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

#: Parameter values for CI: a 2-epoch run on 4 images (one step per epoch) and small loops.
FAST: dict[str, Any] = {
    "TRAIN_EPOCHS": 2,
    "TRAIN_IMAGES": 4,
    "VAL_IMAGES": 4,
    "IMAGES": 2,
    "EVAL_IMAGES": 4,
}


def with_parameters(notebook: Any, values: dict[str, Any]) -> list[str]:
    """Rewrite ``NAME = ...`` lines of the ``parameters`` cell for the names in ``values``; returns
    the names replaced."""
    cells = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
    replaced, lines = [], []
    for line in cells[0].source.splitlines():
        name = line.split("=", 1)[0].strip()
        if "=" in line and not line.startswith((" ", "#")) and name in values:
            line = f"{name} = {values[name]!r}  # fast value from tests/notebooks"
            replaced.append(name)
        lines.append(line)
    cells[0].source = "\n".join(lines)
    return replaced


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ``SDETR_CACHE`` and one lock for every worker of the session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders share this parent
    cache = root / "notebook_cache"
    cache.mkdir(exist_ok=True)
    yield cache


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_runs(path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = nbformat.read(path, as_version=4)
    assert with_parameters(notebook, FAST), f"{path.name}: its parameters cell sets none of {sorted(FAST)}"
    monkeypatch.setenv("SDETR_CACHE", str(shared_cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small inputs; and the other xdist worker shares the 2 cores
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    with (shared_cache / "notebooks.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one notebook at a time: the first trains, the rest reuse
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, f"{path.name} shows no figure as a plain cell output"
    print(f"{path.name}: executed in {seconds:.1f} s, {len(images)} figure(s)")
