"""The QKVA explorer: one site, one head, one query at a time.

For a chosen attention site, head and query - an input pixel for encoder self-attention (the
recorder maps it to the site's own grid cell), an object query for the decoder sites - it records
exactly that selection with ``sdetr.record(..., heads=[h], query_pixels=[(y, x)])`` or
``decoder_queries=[q]``, so a stride-16 encoder over a large image costs a few KiB instead of the
whole ``[H, W, H, W]`` map, and draws the query's attention map A on the image beside Q, K and V
of the same head as grids. :class:`QKVAExplorer` puts this behind ipywidgets controls
(``notebooks/02_qkva_explorer.ipynb``); every figure is also available without widgets
(:func:`plot_attention_at`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from analysis.qkva import principal_component
from sdetr import (
    Detector,
    Selection,
    SiteGrids,
    SiteInfo,
    estimate_bytes,
    format_bytes,
    normalize_image,
    postprocess,
    record,
    sites,
)

TENSORS = ("q", "k", "v", "a")
Query = tuple[int, int] | int


def unnormalize_image(image: Tensor) -> Tensor:
    """``[..., 3, H, W]`` ImageNet-normalised -> RGB in [0, 1] (the inverse of ``sdetr.normalize_image``).

    ``normalize_image`` is affine per channel, ``n(x) = (x - mean) / std``, so
    ``x = (n - n(0)) / (n(1) - n(0))``; the constants come from ``normalize_image`` itself.
    """
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"image must be [..., 3, H, W], got {tuple(image.shape)}")
    zero = normalize_image(image.new_zeros(3, 1, 1))  # [3, 1, 1]: -mean / std
    one = normalize_image(image.new_ones(3, 1, 1))  # [3, 1, 1]: (1 - mean) / std
    return ((image - zero) / (one - zero)).clamp(0, 1)


def site_info(model: Detector, site: str) -> SiteInfo:
    """The :class:`sdetr.SiteInfo` of ``site``; a KeyError listing the sites when there is none."""
    infos = {info.name: info for info in sites(model)}
    if site not in infos:
        raise KeyError(f"site={site!r} is not an attention site of this model; sites: {', '.join(infos)}")
    return infos[site]


@dataclass
class CellView:
    """One recorded selection: one site, one head, one query, one image.

    Attributes:
        grids: the recording (``heads`` holds the one head; for an encoder site ``queries`` holds
            the one query cell and ``a`` is ``[1, 1, 1, H, W]``; for a decoder site ``queries``
            holds the query index, ``a`` is ``[1, 1, 1, H, W]`` (cross) or ``[1, 1, 1, Q]`` (self)).
        info: the site's kind, heads, head width and stride.
        query: the query cell ``(row, col)`` (encoder) or the query index (decoder).
        estimated_bytes: the recorder's estimate for this selection, made before the forward.
        site_bytes: the estimate for the whole site (every head and query) at the same dtype.
    """

    grids: SiteGrids
    info: SiteInfo
    query: Query
    estimated_bytes: int
    site_bytes: int

    @property
    def held_bytes(self) -> int:
        """Bytes of the recorded tensors actually held."""
        return self.grids.nbytes()

    def memory_note(self) -> str:
        """One line: what this view holds, and what the whole site would."""
        return (
            f"holds {format_bytes(self.held_bytes)} (recorder's estimate {format_bytes(self.estimated_bytes)}); "
            f"all heads and queries of this site would hold {format_bytes(self.site_bytes)}"
        )


def record_cell(
    model: Detector,
    image: Tensor,
    site: str,
    head: int = 0,
    pixel: tuple[float, float] | None = None,
    decoder_query: int = 0,
    tensors: Sequence[str] = TENSORS,
    dtype: torch.dtype = torch.float32,
) -> CellView:
    """Record one head and one query of one site on one image, and nothing else.

    Args:
        model: any preset, used as it is (eval mode expected).
        image: ``[3, H, W]`` ImageNet-normalised image.
        site: the site name (``sdetr.sites(model)``).
        head: head index at that site.
        pixel: ``(y, x)`` input pixel whose grid cell is the query of an encoder site (default:
            the image centre); ignored by decoder sites.
        decoder_query: object query index for decoder sites; ignored by encoder sites.
        tensors: which of q, k, v, a to record.
        dtype: storage dtype of the recording.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be one [3, H, W] normalised image, got {tuple(image.shape)}")
    info = site_info(model, site)
    if not 0 <= head < info.heads:
        raise ValueError(f"head={head}: site {site} has {info.heads} head(s) (0..{info.heads - 1})")
    height, width = int(image.shape[1]), int(image.shape[2])
    options: dict[str, Any] = {}
    if info.kind == "encoder_self":
        y, x = pixel if pixel is not None else (height / 2, width / 2)
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f"pixel=({y}, {x}) lies outside the {height}x{width} image")
        options["query_pixels"] = [(y, x)]
    else:
        queries = model.config.num_queries
        if not 0 <= decoder_query < queries:
            raise ValueError(f"decoder_query={decoder_query}: the model has {queries} queries (0..{queries - 1})")
        options["decoder_queries"] = [decoder_query]
    device = next(model.parameters()).device
    with torch.no_grad(), record(model, sites=site, tensors=tensors, heads=[head], dtype=dtype, **options) as rec:
        model([image.to(device)])
    grids = rec[site]
    assert grids.queries is not None
    whole = estimate_bytes(model, grids.geometry.input_size, 1, site, Selection(tensors=tuple(tensors), dtype=dtype))
    return CellView(
        grids=grids,
        info=info,
        query=grids.queries[0],
        estimated_bytes=sum(rec.estimated_bytes.values()),
        site_bytes=whole[site],
    )


def _query_position(grids: SiteGrids, query: Query | None) -> tuple[Query, int | None]:
    """The query to draw and its position among ``grids.queries`` (None: all queries recorded)."""
    if grids.queries is None:
        if query is not None:
            return query, None
        if grids.kind == "encoder_self":
            size = grids.geometry.valid_cells[0]
            return (size[0] // 2, size[1] // 2), None
        return 0, None
    chosen = grids.queries[0] if query is None else query
    if grids.kind == "encoder_self":
        chosen = (int(chosen[0]), int(chosen[1])) if isinstance(chosen, tuple | list) else chosen
    if chosen not in grids.queries:
        raise ValueError(f"query={chosen} was not recorded at {grids.site}; recorded queries: {grids.queries}")
    return chosen, grids.queries.index(chosen)


def attention_at(grids: SiteGrids, index: int = 0, head: int = 0, query: Query | None = None) -> Tensor:
    """The attention map of one query, over the valid key cells.

    Args:
        grids: any site recorded with ``a`` (all queries, or selected ones).
        index: batch element; head: position among ``grids.heads``.
        query: ``(row, col)`` query cell (encoder) or query index (decoder); default the first
            recorded query, or the grid centre / query 0 when all were recorded.
    Returns:
        ``[rows, cols]`` over the image's valid cells (encoder, cross-attention) or ``[Q]`` over
        the object queries (decoder self-attention), as float32.
    """
    if grids.a is None:
        raise ValueError(f"{grids.site}: no attention map recorded; record with tensors including 'a'")
    chosen, position = _query_position(grids, query)
    a = grids.a[index, head].float()
    if grids.kind == "decoder_self":
        return a[chosen if position is None else position]  # [Q]
    rows, cols = grids.geometry.valid_cells[index]
    if grids.kind == "encoder_self" and position is None:
        assert isinstance(chosen, tuple)
        return a[chosen[0], chosen[1], :rows, :cols]  # [H, W, H, W] -> [rows, cols]
    assert position is not None or isinstance(chosen, int)
    return a[chosen if position is None else position, :rows, :cols]  # [P or Q, H, W] -> [rows, cols]


def _show_image(ax: Axes, image: Tensor | None, height: int, width: int) -> None:
    if image is not None:
        ax.imshow(image[:, :height, :width].permute(1, 2, 0).clamp(0, 1).numpy())


def _draw_box(ax: Axes, box: Sequence[float] | None) -> None:
    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="cyan", linewidth=1.5)


def plot_attention_at(
    grids: SiteGrids,
    image: Tensor | None = None,
    index: int = 0,
    head: int = 0,
    query: Query | None = None,
    box: Sequence[float] | None = None,
) -> Figure:
    """One query's attention map A with Q, K and V of the same head, for any site kind.

    Encoder self-attention: the image with the query cell, Q, K, V (each cell's first principal
    component) and A over the key cells on the image. Decoder cross-attention: the image with the
    query's box, the query vector Q, K and V grids, and A on the image. Decoder self-attention: Q,
    K and V per object query, and A over the queries. Panels of tensors not recorded are left out.

    Args:
        grids: the site's recording (from :func:`record_cell`, or any recording with ``a``).
        image: ``[3, H, W]`` RGB in [0, 1] at input resolution (:func:`unnormalize_image`), or None.
        index: batch element; head: position among ``grids.heads``.
        query: as in :func:`attention_at`.
        box: ``(x0, y0, x1, y1)`` in input pixels drawn for a decoder query (its predicted box).
    """
    chosen, position = _query_position(grids, query)
    a = attention_at(grids, index, head, chosen)
    geometry = grids.geometry
    label = f"query cell {chosen}" if grids.kind == "encoder_self" else f"query {chosen}"
    panels: list[tuple[str, str]] = []  # (what, title)
    if grids.kind != "decoder_self":
        panels.append(("image", "image"))
    for name in ("q", "k", "v"):
        if getattr(grids, name) is not None:
            panels.append((name, name.upper()))
    panels.append(("a", f"A of {label}"))
    figure = Figure(figsize=(3.3 * len(panels), 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    head_name = grids.heads[head]
    figure.suptitle(f"{grids.site} ({grids.kind}), head {head_name}, {label}")
    if grids.kind == "decoder_self":
        _plot_decoder_self(figure, axes, panels, grids, index, head, int(chosen), position, a)  # type: ignore[arg-type]
        return figure
    assert geometry.stride is not None
    rows, cols = geometry.valid_cells[index]
    height, width = geometry.valid_sizes[index]
    extent = (0, cols * geometry.stride, rows * geometry.stride, 0)
    marker = geometry.cell_to_pixel(*chosen) if isinstance(chosen, tuple) else None
    for ax, (what, title) in zip(axes, panels, strict=True):
        if what == "image":
            _show_image(ax, image, height, width)
        elif what == "a":
            _show_image(ax, image, height, width)
            shown = ax.imshow(a.numpy(), cmap="magma", alpha=0.65 if image is not None else 1.0, extent=extent)
            figure.colorbar(shown, ax=ax, shrink=0.8)
            title += f"\nover {rows}x{cols} key cells"
        elif what == "q" and grids.kind == "decoder_cross":
            assert grids.q is not None
            vector = grids.q[index, head, 0 if position is None else position].float()  # [d]
            ax.imshow(vector[None].numpy(), cmap="coolwarm", aspect="auto")
            title = f"Q of {label}\n{vector.numel()} values"
        else:
            tensor = getattr(grids, what)
            values = principal_component(tensor[index, head, :rows, :cols])  # [H, W, d] -> [rows, cols]
            shown = ax.imshow(values.numpy(), cmap="coolwarm", extent=extent)
            figure.colorbar(shown, ax=ax, shrink=0.8)
            title += f": 1st principal comp.\n{rows}x{cols} cells"
        ax.set_title(title, fontsize=9)
        if not (what == "q" and grids.kind == "decoder_cross"):
            if marker is not None:
                ax.plot([marker[1]], [marker[0]], marker="+", color="lime", markersize=14, mew=2)
            if what in ("image", "a"):
                _draw_box(ax, box)
            ax.set_xlim(0, width)
            ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    return figure


def _plot_decoder_self(
    figure: Figure,
    axes: Sequence[Axes],
    panels: list[tuple[str, str]],
    grids: SiteGrids,
    index: int,
    head: int,
    query: int,
    position: int | None,
    a: Tensor,
) -> None:
    for ax, (what, title) in zip(axes, panels, strict=True):
        if what == "a":
            weights = a.numpy()
            colours = ["tab:orange" if q == query else "tab:blue" for q in range(len(weights))]
            ax.bar(np.arange(len(weights)), weights, color=colours)
            ax.set_xlabel("key query")
        elif what == "q":
            assert grids.q is not None
            vector = grids.q[index, head, query if position is None else position].float()  # [d]
            ax.imshow(vector[None].numpy(), cmap="coolwarm", aspect="auto")
            ax.set_yticks([])
            title = f"Q of query {query}\n{vector.numel()} values"
        else:
            tensor = getattr(grids, what)[index, head].float()  # [Q, d]
            component = principal_component(tensor[:, None, :])[:, 0]  # [Q, 1, d] -> [Q]
            ax.bar(np.arange(len(component)), component.numpy(), color="tab:gray")
            ax.set_xlabel("query")
            title += ": 1st principal comp.\nper object query"
        ax.set_title(title, fontsize=9)


def _png(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class QKVAExplorer:
    """Interactive QKVA view: pick a site, a head and a query, see A on the image with Q, K, V.

    Only the shown selection is ever recorded (:func:`record_cell`). Use :meth:`figure` for a
    static figure of any selection and :meth:`widget` for the ipywidgets controls (site, image,
    head, query pixel ``y``/``x`` for encoder sites, object query for decoder sites), which
    redraw the figure and state the memory held on every change.

    Args:
        model: any preset in eval mode.
        images: ``[3, H, W]`` ImageNet-normalised images (each is run on its own).
        sites_pattern: restrict the site menu to these names (default: every site).
        dtype: recording dtype.
        dpi: resolution of the widget's image.
    """

    def __init__(
        self,
        model: Detector,
        images: Sequence[Tensor],
        sites_pattern: Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
        dpi: int = 72,
    ) -> None:
        if not images:
            raise ValueError("images is empty: give at least one [3, H, W] normalised image")
        self.model = model
        self.images = list(images)
        self.infos = [info for info in sites(model) if sites_pattern is None or info.name in sites_pattern]
        if not self.infos:
            raise ValueError(f"sites_pattern={sites_pattern} names no site of this model")
        self.dtype = dtype
        self.dpi = dpi
        device = next(model.parameters()).device
        self.detections: list[dict[str, Tensor]] = []
        with torch.no_grad():
            for image in self.images:
                out = model([image.to(device)])
                size = torch.tensor([[image.shape[1], image.shape[2]]], device=device)
                self.detections.append({k: v.cpu() for k, v in postprocess(out, size)[0].items()})
        self.last: CellView | None = None
        self._widgets: dict[str, Any] = {}
        self._busy = False

    def best_query(self, image: int = 0) -> int:
        """The object query with the highest score on ``image``."""
        return int(self.detections[image]["scores"].argmax())

    def view(
        self,
        site: str,
        image: int = 0,
        head: int = 0,
        pixel: tuple[float, float] | None = None,
        decoder_query: int | None = None,
    ) -> CellView:
        """Record one selection (see :func:`record_cell`); the decoder query defaults to the best one."""
        query = self.best_query(image) if decoder_query is None else decoder_query
        self.last = record_cell(self.model, self.images[image], site, head, pixel, query, dtype=self.dtype)
        return self.last

    def figure(
        self,
        site: str,
        image: int = 0,
        head: int = 0,
        pixel: tuple[float, float] | None = None,
        decoder_query: int | None = None,
    ) -> Figure:
        """The :func:`plot_attention_at` figure of one selection, with the decoder query's box."""
        cell = self.view(site, image, head, pixel, decoder_query)
        box = None
        if cell.info.kind == "decoder_cross":
            box = self.detections[image]["boxes"][int(cell.query)].tolist()  # type: ignore[arg-type]
        return plot_attention_at(cell.grids, unnormalize_image(self.images[image]), box=box)

    def widget(self) -> Any:
        """The ipywidgets view (needs the ``notebooks`` extra: ``pip install -e .[notebooks]``)."""
        import ipywidgets as widgets

        first = self.infos[-1] if len(self.infos) == 1 else self._default_site()
        height, width = (int(s) for s in self.images[0].shape[1:])
        layout = {"style": {"description_width": "70px"}, "continuous_update": False}
        controls: dict[str, Any] = {
            "site": widgets.Dropdown(
                options=[i.name for i in self.infos], value=first.name, description="site", layout={"width": "420px"}
            ),
            "image": widgets.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image", **layout),
            "head": widgets.IntSlider(value=0, min=0, max=first.heads - 1, description="head", **layout),
            "y": widgets.IntSlider(value=height // 2, min=0, max=height - 1, description="query y", **layout),
            "x": widgets.IntSlider(value=width // 2, min=0, max=width - 1, description="query x", **layout),
            "query": widgets.IntSlider(
                value=self.best_query(0),
                min=0,
                max=self.model.config.num_queries - 1,
                description="object q",
                **layout,
            ),
        }
        note = widgets.HTML()
        picture = widgets.Image(format="png")
        self._widgets = {**controls, "note": note, "picture": picture}
        for control in controls.values():
            control.observe(self._refresh, names="value")
        self._refresh()
        return widgets.VBox(
            [
                widgets.HBox([controls["site"], controls["image"]]),
                widgets.HBox([controls["head"], controls["y"], controls["x"], controls["query"]]),
                note,
                picture,
            ]
        )

    def _default_site(self) -> SiteInfo:
        encoders = [info for info in self.infos if info.kind == "encoder_self"]
        return encoders[-1] if encoders else self.infos[0]

    def _refresh(self, _change: Any = None) -> None:
        if self._busy:  # a bound change below clamps a value, which calls back here
            return
        self._busy = True
        try:
            self._redraw()
        finally:
            self._busy = False

    def _redraw(self) -> None:
        w = self._widgets
        info = next(i for i in self.infos if i.name == w["site"].value)
        image = int(w["image"].value)
        height, width = (int(s) for s in self.images[image].shape[1:])
        w["head"].max = info.heads - 1
        w["y"].max, w["x"].max = height - 1, width - 1
        encoder = info.kind == "encoder_self"
        w["y"].disabled = w["x"].disabled = not encoder
        w["query"].disabled = encoder
        figure = self.figure(info.name, image, int(w["head"].value), (w["y"].value, w["x"].value), w["query"].value)
        assert self.last is not None
        w["picture"].value = _png(figure, self.dpi)
        score = float(self.detections[image]["scores"][int(w["query"].value)])
        what = (
            f"query cell {self.last.query} (stride {info.stride})"
            if encoder
            else f"object query {self.last.query} (score {score:.2f})"
        )
        w["note"].value = f"<b>{info.name}</b>, head {w['head'].value}, {what}: {self.last.memory_note()}"
