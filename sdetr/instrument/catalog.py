"""Stable names of every attention layer ("sites") and their selection by glob."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from sdetr.model.attention import Attention
from sdetr.model.detector import Detector

SitePattern = str | Sequence[str]


@dataclass(frozen=True)
class SiteInfo:
    """One attention site.

    Attributes:
        name: ``stage{n}.encoder.{i}.self_attn``, ``stage{n}.decoder.{i}.self_attn`` or
            ``stage{n}.decoder.{i}.cross_attn``.
        kind: ``encoder_self``, ``decoder_self`` or ``decoder_cross``.
        heads / head_dim: number of heads and their width.
        stage: 1-based stage index.
        stride: feature stride of the grid the site attends over (encoder and cross-attention
            sites), None for decoder self-attention (queries have no grid).
    """

    name: str
    kind: str
    heads: int
    head_dim: int
    stage: int
    stride: int | None


def sites(model: Detector) -> list[SiteInfo]:
    """Every attention site of ``model``, in forward order."""
    infos = []
    for name, module in model.attention_sites().items():
        stage_index = int(name.split(".")[0].removeprefix("stage"))
        stage = model.stages[stage_index - 1]
        stride = None if module.kind == "decoder_self" else stage.stride
        infos.append(SiteInfo(name, module.kind, module.num_heads, module.head_dim, stage_index, stride))
    return infos


def select_sites(model: Detector, patterns: SitePattern | None) -> dict[str, Attention]:
    """Sites whose names match any glob in ``patterns`` (None or ``"*"``: all).

    Raises:
        KeyError: a pattern that matches no site (the message lists the site names).
    """
    available = model.attention_sites()
    if patterns is None:
        return available
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: dict[str, Attention] = {}
    for pattern in pattern_list:
        matched = {name: module for name, module in available.items() if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise KeyError(f"sites pattern {pattern!r} matches no attention site; available: {', '.join(available)}")
        chosen.update(matched)
    return {name: module for name, module in available.items() if name in chosen}
