from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Module-scoped set-up (small trainings, studies) runs on one torch thread: on tiny inputs one
    thread is faster, and far faster when other processes share the 2 cores. Each test body then
    starts at the suite's thread count (``tests/conftest.py``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
