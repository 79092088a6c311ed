"""Attaching probes to attention sites, always undone (``try/finally``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor

from sdetr.model.attention import Attention, AttentionProbe


class BaseProbe:
    """A probe that changes nothing; subclasses override one of the two methods.

    ``needs_weights`` (True here) makes the site materialise the map A; a probe that only
    overrides ``on_heads`` sets it False so the site stays on the fused path.
    """

    needs_weights: bool = True

    def on_weights(self, site: Attention, q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
        return a

    def on_heads(self, site: Attention, heads_out: Tensor) -> Tensor:
        return heads_out


@contextmanager
def attached(probe: AttentionProbe, modules: Iterable[Attention]) -> Iterator[None]:
    """Attach ``probe`` to ``modules`` for the duration of the block, removing it even on error."""
    done: list[Attention] = []
    try:
        for module in modules:
            module.probes.append(probe)
            done.append(module)
        yield
    finally:
        for module in done:
            module.probes[:] = [p for p in module.probes if p is not probe]
