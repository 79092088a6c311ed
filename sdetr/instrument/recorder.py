"""``record``: capture Q/K/V/A of chosen attention sites as image grids.

While a recorder is attached, the chosen sites run the explicit attention path (the map A
exists only there); every other site, and every forward outside the context, stays fused.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdetr.instrument.catalog import SiteInfo, SitePattern, select_sites
from sdetr.instrument.catalog import sites as list_sites
from sdetr.instrument.grids import GridGeometry, SiteGrids, feature_size, grid_cells
from sdetr.instrument.probes import BaseProbe, attached
from sdetr.instrument.storage import save_recording
from sdetr.model.attention import Attention
from sdetr.model.detector import Detector

TENSOR_NAMES = ("q", "k", "v", "a")
DEFAULT_BUDGET_BYTES = 4 * 1024**3
SiteCallback = Callable[[str, SiteGrids], None]


class RecordingBudgetError(MemoryError):
    """The selection would hold more than the recorder's byte budget."""


@dataclass(frozen=True)
class Selection:
    """What to keep of each site.

    Attributes:
        tensors: any of ``"q"``, ``"k"``, ``"v"``, ``"a"``.
        heads: head indices to keep (None: all); indices past a site's head count are ignored.
        query_pixels: encoder sites keep ``a`` only for the cells containing these ``(y, x)``
            input pixels (each site maps them with its own stride).
        query_cells: encoder sites keep ``a`` only for these ``(row, col)`` grid cells.
        decoder_queries: decoder sites keep ``q`` and ``a`` only for these query indices.
        dtype / device: storage of the kept tensors.
    """

    tensors: tuple[str, ...] = TENSOR_NAMES
    heads: tuple[int, ...] | None = None
    query_pixels: tuple[tuple[float, float], ...] | None = None
    query_cells: tuple[tuple[int, int], ...] | None = None
    decoder_queries: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float16
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        unknown = set(self.tensors) - set(TENSOR_NAMES)
        if unknown:
            raise ValueError(f"tensors={self.tensors}: unknown {sorted(unknown)}; choose from {TENSOR_NAMES}")
        if self.query_pixels is not None and self.query_cells is not None:
            raise ValueError("give query_pixels or query_cells, not both")

    def heads_at(self, info: SiteInfo) -> tuple[int, ...]:
        if self.heads is None:
            return tuple(range(info.heads))
        return tuple(h for h in self.heads if 0 <= h < info.heads)

    def encoder_queries(self, stride: int) -> tuple[tuple[int, int], ...] | None:
        if self.query_pixels is not None:
            return tuple((int(y // stride), int(x // stride)) for y, x in self.query_pixels)
        return self.query_cells

    def site_bytes(self, info: SiteInfo, batch: int, grid: tuple[int, int], num_queries: int) -> int:
        """Bytes this selection keeps at one site for a batch whose site grid is ``grid``."""
        heads, d = len(self.heads_at(info)), info.head_dim
        cells = grid[0] * grid[1]
        if info.kind == "encoder_self":
            queries = self.encoder_queries(info.stride or 1)
            lq, lk, lqa = cells, cells, cells if queries is None else len(queries)
        else:
            chosen = num_queries if self.decoder_queries is None else len(self.decoder_queries)
            lk = cells if info.kind == "decoder_cross" else num_queries
            lq = lqa = chosen
        counts = {"q": lq * d, "k": lk * d, "v": lk * d, "a": lqa * lk}
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(batch * heads * counts[name] * size for name in self.tensors)


def estimate_bytes(
    model: Detector,
    input_size: tuple[int, int],
    batch: int = 1,
    sites: SitePattern | None = None,
    selection: Selection | None = None,
) -> dict[str, int]:
    """Bytes a recording would hold, per site, for a ``batch`` of padded ``input_size`` images.

    ``sites`` is a glob or list of globs over site names, as in :func:`record` and ``gate_heads``.
    """
    selection = selection or Selection()
    chosen = select_sites(model, sites)
    result = {}
    for info in list_sites(model):
        if info.name in chosen:
            stride = model.stages[info.stage - 1].stride
            grid = feature_size(*input_size, stride)
            result[info.name] = selection.site_bytes(info, batch, grid, model.config.num_queries)
    return result


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class Recorder(BaseProbe, Mapping[str, SiteGrids]):
    """Collects :class:`SiteGrids` by site name; use through :func:`record`.

    Indexing gives the grids of the last forward (``rec["stage2.encoder.0.self_attn"]``);
    ``estimated_bytes`` is the estimate made before that forward.
    """

    def __init__(
        self,
        model: Detector,
        sites: SitePattern | None,
        selection: Selection,
        budget_bytes: float,
        callback: SiteCallback | None,
        keep: bool,
        keep_graph: bool,
        image_sizes: Sequence[tuple[int, int]] | None,
    ) -> None:
        self.model = model
        self.sites = sites
        self.modules = select_sites(model, sites)
        self.infos = {info.name: info for info in list_sites(model) if info.name in self.modules}
        self.selection = selection
        self.budget_bytes = budget_bytes
        self.callback = callback
        self.keep = keep
        self.keep_graph = keep_graph
        self.image_sizes = None if image_sizes is None else tuple((int(h), int(w)) for h, w in image_sizes)
        self.estimated_bytes: dict[str, int] = {}
        self._grids: dict[str, SiteGrids] = {}
        self._batch: tuple[tuple[int, int], tuple[tuple[int, int], ...]] | None = None
        self._stage_masks: dict[int, Tensor] = {}
        self._stack: ExitStack | None = None  # set while the `with` block is active
        num_queries = model.config.num_queries
        wrong = [i for i in selection.decoder_queries or () if not 0 <= i < num_queries]
        if wrong:
            raise ValueError(
                f"decoder_queries={list(selection.decoder_queries or ())}: {wrong} are not queries of this model, "
                f"which has {num_queries} (indices 0..{num_queries - 1})"
            )
        for name, info in self.infos.items():
            if not selection.heads_at(info):
                raise ValueError(
                    f"site {name} has {info.heads} head(s); heads={selection.heads} selects none of them - "
                    "narrow `sites` or include head 0"
                )

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, name: str) -> SiteGrids:
        if name not in self._grids:
            hint = "nothing recorded yet (run the model inside the `with` block)" if not self._grids else ""
            raise KeyError(f"{name!r} was not recorded; recorded sites: {list(self._grids)} {hint}".rstrip())
        return self._grids[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._grids)

    def __len__(self) -> int:
        return len(self._grids)

    # ------------------------------------------------------------------ hooks
    def _on_backbone(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        images, mask = args[0], args[1]  # [B, 3, H, W], [B, H, W]
        input_size = (int(images.shape[-2]), int(images.shape[-1]))
        valid_sizes = grid_cells(mask)  # pixels: the input mask is the stride-1 grid
        if self.image_sizes is not None and len(self.image_sizes) != len(valid_sizes):
            raise ValueError(f"image_sizes has {len(self.image_sizes)} entries for a batch of {len(valid_sizes)}")
        self._batch = (input_size, valid_sizes)
        self._grids = {}
        self.estimated_bytes = estimate_bytes(
            self.model, input_size, images.shape[0], list(self.modules), self.selection
        )
        total = sum(self.estimated_bytes.values())
        if self.keep and total > self.budget_bytes:
            raise RecordingBudgetError(self._budget_message(input_size, images.shape[0], total))

    def _budget_message(self, input_size: tuple[int, int], batch: int, total: int) -> str:
        options: list[tuple[str, Selection | None, str | None]] = [
            ("tensors=('q', 'k', 'v') (no attention maps)", replace(self.selection, tensors=("q", "k", "v")), None),
            ("heads=(0,)", replace(self.selection, heads=(0,)), None),
            (
                "query_pixels with 16 points",
                replace(self.selection, query_pixels=((0.0, 0.0),) * 16, query_cells=None),
                None,
            ),
            ("decoder sites only (sites='*.decoder.*')", None, "*.decoder.*"),
        ]
        stages = sorted({info.stage for info in self.infos.values()})
        options += [(f"stage {s} only (sites='stage{s}.*')", None, f"stage{s}.*") for s in stages]
        lines = []
        for label, selection, pattern in options:
            chosen = [n for n in self.modules if pattern is None or fnmatch.fnmatchcase(n, pattern)]
            if not chosen:
                continue
            estimate = sum(estimate_bytes(self.model, input_size, batch, chosen, selection or self.selection).values())
            fits = "fits" if estimate <= self.budget_bytes else "too large"
            lines.append(f"  {label}: {format_bytes(estimate)} ({fits})")
        largest = max(self.estimated_bytes.items(), key=lambda item: item[1])
        return (
            f"recording {len(self.modules)} site(s) for a batch of {batch} at {input_size[0]}x{input_size[1]} "
            f"would hold {format_bytes(total)} (largest: {largest[0]}, {format_bytes(largest[1])}), over the budget of "
            f"{format_bytes(self.budget_bytes)}. Narrow the selection or raise budget_bytes; estimates:\n"
            + "\n".join(lines)
        )

    def _on_stage(self, stage_index: int) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self._stage_masks[stage_index] = args[1]  # [B, H, W] pad mask of the stage's level

        return hook

    # ------------------------------------------------------------------ probe
    def on_weights(self, site: Attention, q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
        """``q [B, h, Lq, d]``, ``k, v [B, h, Lk, d]``, ``a [B, h, Lq, Lk]``."""
        info = self.infos.get(site.site)
        if info is None:
            return a
        grids = self._to_grids(info, {"q": q, "k": k, "v": v, "a": a})
        if self.callback is not None:
            self.callback(info.name, grids)
        if self.keep:
            self._grids[info.name] = grids
        return a

    def _geometry(self, info: SiteInfo) -> GridGeometry:
        assert self._batch is not None, "the backbone hook did not run"
        input_size, valid_sizes = self._batch
        mask = self._stage_masks[info.stage]
        grid = (int(mask.shape[-2]), int(mask.shape[-1]))
        return GridGeometry(
            stride=info.stride,
            feature_size=None if info.stride is None else grid,
            input_size=input_size,
            valid_sizes=valid_sizes,
            valid_cells=grid_cells(mask),
            image_sizes=self.image_sizes or valid_sizes,
        )

    def _to_grids(self, info: SiteInfo, raw: dict[str, Tensor]) -> SiteGrids:
        selection = self.selection
        geometry = self._geometry(info)
        heads = selection.heads_at(info)
        head_index = torch.tensor(heads, device=raw["a"].device)
        batch = raw["a"].shape[0]
        queries: tuple[Any, ...] | None = None
        query_index: Tensor | None = None
        if info.kind == "encoder_self":
            assert info.stride is not None and geometry.feature_size is not None
            cells = selection.encoder_queries(info.stride)
            if cells is not None:
                height, width = geometry.feature_size
                for row, col in cells:
                    if not (0 <= row < height and 0 <= col < width):
                        raise ValueError(f"{info.name}: query cell ({row}, {col}) is outside the {height}x{width} grid")
                queries = tuple(cells)
                query_index = torch.tensor([r * width + c for r, c in cells], device=raw["a"].device)
        elif selection.decoder_queries is not None:
            queries = tuple(selection.decoder_queries)
            query_index = torch.tensor(queries, device=raw["a"].device)

        grids = SiteGrids(site=info.name, kind=info.kind, heads=heads, geometry=geometry, queries=queries)
        if self.keep_graph and "a" in selection.tensors and raw["a"].requires_grad:
            raw["a"].retain_grad()
            grids.a_grad_source = raw["a"]
        for name in selection.tensors:
            tensor = raw[name].index_select(1, head_index)  # [B, heads, L, d] or [B, heads, Lq, Lk]
            if query_index is not None and (name == "a" or (name == "q" and info.kind != "encoder_self")):
                tensor = tensor.index_select(2, query_index)
            tensor = self._layout(info, geometry, name, tensor, batch)
            if not self.keep_graph:
                tensor = tensor.detach().to(device=selection.device, dtype=selection.dtype)
            setattr(grids, name, tensor)
        return grids

    @staticmethod
    def _layout(info: SiteInfo, geometry: GridGeometry, name: str, tensor: Tensor, batch: int) -> Tensor:
        """Lay token axes out on the feature grid (row-major tokens: index = row * W + col)."""
        size = geometry.feature_size
        if size is None:
            return tensor
        heads, length = tensor.shape[1], tensor.shape[2]
        if name == "a":
            if info.kind == "encoder_self" and length == size[0] * size[1] and tensor.shape[3] == length:
                return tensor.reshape(batch, heads, *size, *size)  # [B, h, H, W, H, W]
            return tensor.reshape(batch, heads, length, *size)  # [B, h, P or Q, H, W]
        if name == "q" and info.kind == "decoder_cross":
            return tensor  # [B, h, Q, d]: object queries have no grid
        return tensor.reshape(batch, heads, *size, tensor.shape[-1])  # [B, h, H, W, d]

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Recorder:
        if self._stack is not None:
            raise RuntimeError(
                "this recorder is already active (its `with` block has not ended); a recorder is entered once "
                "at a time - use a second record(...) for a nested recording"
            )
        self._stack = ExitStack()
        try:
            self._stack.enter_context(attached(self, self.modules.values()))
            handle = self.model.backbone.register_forward_pre_hook(self._on_backbone)
            self._stack.callback(handle.remove)
            for index, stage in enumerate(self.model.stages, start=1):
                handle = stage.register_forward_pre_hook(self._on_stage(index))
                self._stack.callback(handle.remove)
        except BaseException:
            self._stack.close()
            self._stack = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the kept grids to ``path`` (see :mod:`sdetr.instrument.storage`)."""
        return save_recording(self.model, self, path)


def record(
    model: Detector,
    sites: SitePattern | None = None,
    tensors: Sequence[str] = TENSOR_NAMES,
    *,
    heads: Sequence[int] | None = None,
    query_pixels: Sequence[tuple[float, float]] | None = None,
    query_cells: Sequence[tuple[int, int]] | None = None,
    decoder_queries: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    budget_bytes: float = DEFAULT_BUDGET_BYTES,
    callback: SiteCallback | None = None,
    keep: bool = True,
    keep_graph: bool = False,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> Recorder:
    """Record attention grids of ``model`` inside a ``with`` block.

    Args:
        sites: glob or list of globs over site names (``"stage2.encoder.*"``); None: all.
        tensors: which of q, k, v, a to keep.
        heads, query_pixels, query_cells, decoder_queries, dtype, device: see :class:`Selection`.
        budget_bytes: refuse (before the attention runs) a forward whose kept grids would exceed this.
        callback: called as ``callback(site, grids)`` for every site as it is produced (streaming);
            with ``keep=False`` nothing is stored and no budget applies.
        keep_graph: keep the recorded tensors in the autograd graph (no detach, no dtype or device
            change) and retain the gradient of each site's full map, read with ``grids.a_grad()``.
        image_sizes: original ``(height, width)`` of each image, for mapping cells to them.
    """
    if math.isnan(budget_bytes) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    selection = Selection(
        tensors=tuple(tensors),
        heads=None if heads is None else tuple(heads),
        query_pixels=None if query_pixels is None else tuple((float(y), float(x)) for y, x in query_pixels),
        query_cells=None if query_cells is None else tuple((int(r), int(c)) for r, c in query_cells),
        decoder_queries=None if decoder_queries is None else tuple(int(i) for i in decoder_queries),
        dtype=dtype,
        device=device,
    )
    return Recorder(model, sites, selection, budget_bytes, callback, keep, keep_graph, image_sizes)
