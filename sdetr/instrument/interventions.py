"""Interventions on attention sites: per-head gates and attention-map patches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from sdetr.instrument.catalog import SitePattern, select_sites
from sdetr.instrument.probes import BaseProbe, attached
from sdetr.model.attention import Attention
from sdetr.model.detector import Detector

AttentionPatch = Tensor | Callable[[Tensor], Tensor]


class HeadGates(BaseProbe):
    """Scales each head's output (before ``out_proj``) by ``gates[site][head]``.

    Needs only the per-head outputs, so gated sites keep the fused attention path.
    """

    needs_weights = False

    def __init__(self, gates: Mapping[str, Tensor]) -> None:
        self.gates = gates

    def on_heads(self, site: Attention, heads_out: Tensor) -> Tensor:
        gate = self.gates.get(site.site)
        if gate is None:
            return heads_out
        return heads_out * gate.to(heads_out.dtype).view(1, -1, 1, 1)  # [B, heads, Lq, d]


@contextmanager
def gate_heads(
    model: Detector,
    gates: Mapping[str, Tensor | Sequence[float]] | None = None,
    sites: SitePattern | None = None,
    requires_grad: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Gate attention heads inside a ``with`` block; yields the gate tensors by site.

    Args:
        gates: per site, one value per head (0 ablates a head, 1 keeps it).
        sites: sites to gate with ones where ``gates`` gives none (glob or list); None: only ``gates``.
        requires_grad: make the gates leaves with gradients, whose ``.grad`` after ``backward()``
            measures each head's importance for the loss.
    """
    modules = select_sites(model, sites) if sites is not None else {}
    all_sites = model.attention_sites()
    tensors: dict[str, Tensor] = {}
    for name, values in (gates or {}).items():
        if name not in all_sites:
            raise KeyError(f"gate for unknown site {name!r}; sites: {', '.join(all_sites)}")
        gate = torch.as_tensor(values, dtype=torch.float32).detach().clone()
        if gate.shape != (all_sites[name].num_heads,):
            raise ValueError(
                f"gate for {name} has shape {tuple(gate.shape)}; the site has {all_sites[name].num_heads} heads"
            )
        tensors[name] = gate
    for name, module in modules.items():
        tensors.setdefault(name, torch.ones(module.num_heads))
    device = next(model.parameters()).device
    tensors = {name: gate.to(device).requires_grad_(requires_grad) for name, gate in tensors.items()}
    with attached(HeadGates(tensors), [all_sites[name] for name in tensors]):
        yield tensors


class AttentionPatcher(BaseProbe):
    """Replaces a site's attention map by a given one (or a function of it)."""

    def __init__(self, patches: Mapping[str, AttentionPatch]) -> None:
        self.patches = patches

    def on_weights(self, site: Attention, q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
        patch = self.patches.get(site.site)
        if patch is None:
            return a
        new = patch(a) if callable(patch) else patch.to(a.device, a.dtype)
        if new.numel() != a.numel():
            raise ValueError(
                f"patch for {site.site} has shape {tuple(new.shape)}; the map is {tuple(a.shape)} "
                "([B, heads, Lq, Lk]; grid layouts of the same size are accepted)"
            )
        return new.reshape(a.shape)


@contextmanager
def patch_attention(model: Detector, patches: Mapping[str, AttentionPatch]) -> Iterator[None]:
    """Use the given attention maps at some sites inside a ``with`` block (attention patching).

    Each patch is a tensor shaped like the site's map (``[B, heads, Lq, Lk]`` or the recorded
    grid layout, e.g. ``[B, heads, H, W, H, W]``), or a function from the map to a new map.
    """
    all_sites = model.attention_sites()
    unknown = set(patches) - set(all_sites)
    if unknown:
        raise KeyError(f"patches for unknown sites {sorted(unknown)}; sites: {', '.join(all_sites)}")
    with attached(AttentionPatcher(patches), [all_sites[name] for name in patches]):
        yield
