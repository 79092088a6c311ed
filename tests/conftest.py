from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # tests draw off-screen; the library never sets a backend

import pytest
import torch

# Two xdist workers share the 2 cores: one thread each (more threads than cores spin and crawl).
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(TEST_THREADS)

#: Copies of ../shared/reference (state-dict listings of the original code), so a clone runs every test.
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def read_reference_tsv(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from one of the reference state-dict listings."""
    rows = {}
    for line in (REFERENCE_DIR / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        rows[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return rows


@pytest.fixture
def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of different sizes padded into one batch: ``[2, 3, 128, 160]`` and its mask."""
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 128, 160)
    mask = torch.ones(2, 128, 160, dtype=torch.bool)
    images[0] = torch.randn(3, 128, 160, generator=generator)
    mask[0] = False
    images[1, :, :96, :128] = torch.randn(3, 96, 128, generator=generator)
    mask[1, :96, :128] = False
    return images, mask


@pytest.fixture(autouse=True)
def fixed_threads() -> Iterator[None]:
    """Every test starts with TEST_THREADS torch threads, whatever the tests before it set.

    Float sums depend on the thread count, so a test calibrated or compared at a thread count
    pins it itself (``torch.set_num_threads(2)`` in its body); this fixture undoes that after.
    """
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(TEST_THREADS)
