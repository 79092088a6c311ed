"""Per-head attention statistics over a dataset: entropy, attention distance, locality, object
mass, and how much heads of one site duplicate each other (Jensen-Shannon divergence).

Every statistic is pooled over the VALID query rows of every image: each query row whose cell
is not padding (encoder), or each object query (decoder), counts once, and a head's value is
the mean over all those rows, whatever the batching. Keys are restricted to the image's valid
cells too, and each row is renormalised over them (the model gives padded keys exactly zero
weight, so for its maps this changes nothing; for a hand-made map it defines the distribution).

For a row ``a_i`` over the valid keys ``j`` (``n_k`` of them):

- ``entropy = -sum_j a_ij log a_ij`` (natural log, ``0 log 0 = 0``);
  ``norm_entropy = entropy / log(n_k)``, defined as 0 when ``n_k = 1`` (one key: no spread);
- ``distance_px = sum_j a_ij ||c_i - c_j||`` with ``c`` the cell centres in input pixels
  (``(index + 0.5) * stride``): ViT's mean attention distance (encoder self-attention only);
- ``local_mass = sum_{j in N(i)} a_ij`` over the 3x3 cells around the query cell, clipped at
  the valid region (encoder self-attention only);
- ``object_mass``: for each ground-truth box and each query cell whose centre lies inside it,
  the attention onto the key cells whose centres lie inside the same box, averaged over those
  (query cell, box) pairs (encoder self-attention only; needs targets);
- ``js_divergence`` between heads ``h`` and ``g``: ``JS(P, Q) = H((P + Q) / 2) - (H(P) + H(Q)) / 2``
  (natural log, so at most ``log 2``), averaged over the same rows.

Everything streams through ``sdetr.record(..., callback=fn, keep=False)``: each site's map is
reduced to per-head running sums as it is produced and then dropped, so memory holds at most
one batch's map of one site.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from analysis.batches import DataSource, Target, boxes_in_pixels, count_images, iter_batches
from sdetr import Detector, GridGeometry, SiteGrids, SiteInfo, record
from sdetr import sites as list_sites

SitePattern = str | Sequence[str]
#: ``reducer(site, grids, targets)``: called for every recorded site of every batch.
SiteReducer = Callable[[str, SiteGrids, list[Target] | None], None]

STAT_COLUMNS = [
    "site",
    "stage",
    "kind",
    "layer",
    "head",
    "heads",
    "stride",
    "entropy",
    "norm_entropy",
    "distance_px",
    "local_mass",
    "n_queries",
]
REDUNDANCY_COLUMNS = ["site", "stage", "kind", "layer", "head_i", "head_j", "js_divergence"]


# ---------------------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class StreamSummary:
    """What :func:`stream_sites` walked: ``images`` seen, ``with_targets`` whether targets came with them."""

    images: int
    with_targets: bool


def stream_sites(
    model: Detector,
    data: DataSource,
    reducer: SiteReducer,
    *,
    sites: SitePattern = "*",
    tensors: Sequence[str] = ("a",),
    batch_size: int = 2,
    targets: Sequence[Target] | None = None,
    limit: int | None = None,
    progress: bool = True,
    desc: str = "attention",
) -> StreamSummary:
    """Run ``model`` over ``data`` and hand every recorded site of every batch to ``reducer``.

    Recording is float32 on the model's device and keeps nothing (``keep=False``): ``reducer``
    must fold each site's grids into its own running sums.

    Args:
        model: the detector, used as given (eval mode is the caller's choice).
        data: anything :func:`analysis.batches.iter_batches` accepts.
        reducer: ``reducer(site, grids, targets)``, ``targets`` the batch's per-image targets or None.
        sites: glob or list of globs over site names, as in ``sdetr.record``.
        tensors: which of q, k, v, a to record.
        batch_size: images per forward.
        targets: one target per image of ``data`` (in order); overrides targets carried by ``data``.
        limit: at most this many images.
        progress: show a tqdm bar.
        desc: the bar's label.
    """
    if targets is not None and not isinstance(targets, Sequence):
        raise ValueError(f"targets must be a list of per-image target dicts, got {type(targets).__name__}")
    device = next(model.parameters()).device
    current: list[list[Target] | None] = [None]
    images = 0
    with_targets = targets is not None

    def callback(site: str, grids: SiteGrids) -> None:
        reducer(site, grids, current[0])

    total = count_images(data, limit)
    with (
        torch.no_grad(),
        record(
            model,
            sites=sites,
            tensors=tuple(tensors),
            dtype=torch.float32,
            device=device,
            callback=callback,
            keep=False,
        ),
        tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar,
    ):
        for batch in iter_batches(data, batch_size, limit):
            count = len(batch.images)
            chunk = batch.targets
            if targets is not None:
                chunk = list(targets[images : images + count])
                if len(chunk) != count:
                    raise ValueError(
                        f"targets has {len(targets)} entries but data has more images; pass one target per image"
                    )
            with_targets = with_targets or chunk is not None
            current[0] = chunk
            model([image.to(device) for image in batch.images])
            images += count
            bar.update(count)
    if images == 0:
        raise ValueError("data yielded no images; pass at least one [3, H, W] image")
    return StreamSummary(images, with_targets)


def site_layer(name: str) -> int:
    """Layer index of a site name: ``"stage2.encoder.1.self_attn"`` -> 1."""
    return int(name.split(".")[2])


# ---------------------------------------------------------------------------------- rows and grids
def attention_rows(a: Tensor, kind: str, geometry: GridGeometry, image: int) -> Tensor:
    """One image's attention rows over its valid keys, each renormalised to sum to 1.

    Args:
        a: a site's recorded map: encoder ``[B, heads, H, W, H, W]``, decoder_cross
            ``[B, heads, Q, H, W]``, decoder_self ``[B, heads, Q, Q]``.
        kind: ``encoder_self``, ``decoder_cross`` or ``decoder_self``.
        geometry: the site's grid geometry (``valid_cells`` per image).
        image: batch index.
    Returns:
        ``[heads, Lq, Lk]``: encoder ``Lq = Lk = rows * cols`` valid cells (row-major within
        the valid block); decoder_cross ``Lq = Q``, ``Lk = rows * cols``; decoder_self ``Q x Q``.
    """
    heads = a.shape[1]
    if kind == "encoder_self":
        if a.dim() != 6:
            raise ValueError(
                f"encoder map must be [B, heads, H, W, H, W], got {tuple(a.shape)}; record all query cells"
            )
        rows, cols = geometry.valid_cells[image]
        rows_ = a[image, :, :rows, :cols, :rows, :cols].reshape(heads, rows * cols, rows * cols)  # [h, n, n]
    elif kind == "decoder_cross":
        if a.dim() != 5:
            raise ValueError(f"decoder_cross map must be [B, heads, Q, H, W], got {tuple(a.shape)}")
        rows, cols = geometry.valid_cells[image]
        rows_ = a[image, :, :, :rows, :cols].reshape(heads, a.shape[2], rows * cols)  # [h, Q, n]
    elif kind == "decoder_self":
        if a.dim() != 4:
            raise ValueError(f"decoder_self map must be [B, heads, Q, Q], got {tuple(a.shape)}")
        rows_ = a[image]  # [h, Q, Q]
    else:
        raise ValueError(f"unknown site kind {kind!r}; expected encoder_self, decoder_cross or decoder_self")
    rows_ = rows_.float()
    return rows_ / rows_.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def row_entropy(p: Tensor) -> Tensor:
    """``[..., L]`` distributions -> ``[...]`` entropies (natural log, ``0 log 0 = 0``)."""
    return -torch.special.xlogy(p, p).sum(-1)


@lru_cache(maxsize=16)
def _cell_geometry(rows: int, cols: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Cell centres ``[n, 2]`` (y, x pixels), distances ``[n, n]`` and 3x3-neighbourhood mask ``[n, n]``."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # [rows, cols] each
    index = torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1)  # [n, 2] row-major
    centres = (index.double() + 0.5) * stride  # [n, 2]
    distance = torch.cdist(centres, centres).float()  # [n, n]
    local = ((index[:, None, :] - index[None, :, :]).abs().amax(-1) <= 1).float()  # [n, n]
    return centres.float().to(device), distance.to(device), local.to(device)


def cells_in_boxes(boxes: Tensor, rows: int, cols: int, stride: int) -> Tensor:
    """``[N, 4]`` boxes (x0, y0, x1, y1, input pixels) -> ``[N, rows * cols]`` bool.

    A cell is inside a box when its centre is (edges included).
    """
    centres, _, _ = _cell_geometry(rows, cols, stride, torch.device("cpu"))  # [n, 2] (y, x)
    y, x = centres[:, 0], centres[:, 1]  # [n]
    b = boxes.float().reshape(-1, 4)[:, :, None]  # [N, 4, 1]
    return (b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])  # [N, n]


# ---------------------------------------------------------------------------------- head sums
@dataclass
class HeadSums:
    """Running per-head sums (float64 ``[heads]``) over pooled query rows of one site.

    ``rows`` counts pooled query rows; ``object_pairs`` the (query cell, box) pairs behind
    ``object_mass``.
    """

    entropy: Tensor
    norm_entropy: Tensor
    distance: Tensor
    local: Tensor
    object_mass: Tensor
    rows: int = 0
    object_pairs: int = 0

    @classmethod
    def zeros(cls, heads: int) -> HeadSums:
        zeros = [torch.zeros(heads, dtype=torch.float64) for _ in range(5)]
        return cls(zeros[0], zeros[1], zeros[2], zeros[3], zeros[4])

    def add(self, other: HeadSums) -> None:
        for name in ("entropy", "norm_entropy", "distance", "local", "object_mass"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rows += other.rows
        self.object_pairs += other.object_pairs

    def means(self, kind: str) -> dict[str, np.ndarray]:
        """Per-head means; distance and local mass NaN for decoder sites, object mass NaN without pairs."""
        nan = np.full(self.entropy.shape[0], np.nan)
        rows = max(self.rows, 1)
        encoder = kind == "encoder_self"
        return {
            "entropy": (self.entropy / rows).numpy() if self.rows else nan,
            "norm_entropy": (self.norm_entropy / rows).numpy() if self.rows else nan,
            "distance_px": (self.distance / rows).numpy() if encoder and self.rows else nan,
            "local_mass": (self.local / rows).numpy() if encoder and self.rows else nan,
            "object_mass": (self.object_mass / self.object_pairs).numpy() if encoder and self.object_pairs else nan,
        }


def reduce_attention(a: Tensor, kind: str, geometry: GridGeometry, boxes: Sequence[Tensor] | None = None) -> HeadSums:
    """Per-head sums of one site's batch (a pure function of the map and its geometry).

    Args:
        a: the recorded map (see :func:`attention_rows` for the layouts), all heads recorded.
        kind: the site's kind.
        geometry: the site's grid geometry.
        boxes: per image, ``[N, 4]`` ground-truth boxes (x0, y0, x1, y1) in input pixels, or None.
    """
    heads = a.shape[1]
    sums = HeadSums.zeros(heads)
    for image in range(a.shape[0]):
        p = attention_rows(a, kind, geometry, image)  # [h, Lq, Lk]
        keys = p.shape[-1]
        entropy = row_entropy(p)  # [h, Lq]
        sums.entropy += entropy.double().sum(-1).cpu()
        if keys > 1:
            sums.norm_entropy += (entropy.double().sum(-1) / math.log(keys)).cpu()
        sums.rows += p.shape[1]
        if kind != "encoder_self":
            continue
        assert geometry.stride is not None
        rows, cols = geometry.valid_cells[image]
        _, distance, local = _cell_geometry(rows, cols, geometry.stride, p.device)  # [n, n] each
        sums.distance += torch.einsum("hqk,qk->h", p, distance).double().cpu()
        sums.local += torch.einsum("hqk,qk->h", p, local).double().cpu()
        if boxes is not None and len(boxes[image]):
            inside = cells_in_boxes(boxes[image], rows, cols, geometry.stride).to(p.device, p.dtype)  # [N, n]
            onto_box = p @ inside.T  # [h, n query cells, N]: mass of each query row inside each box
            sums.object_mass += (onto_box * inside.T).sum((1, 2)).double().cpu()
            sums.object_pairs += int(inside.sum())
    return sums


def reduce_redundancy(a: Tensor, kind: str, geometry: GridGeometry) -> tuple[Tensor, int]:
    """Summed pairwise Jensen-Shannon divergences ``[heads, heads]`` (float64) and the rows pooled.

    Args:
        a: the recorded map of one site's batch (all heads).
        kind / geometry: the site's kind and grid geometry.
    """
    heads = a.shape[1]
    total = torch.zeros(heads, heads, dtype=torch.float64)
    rows = 0
    for image in range(a.shape[0]):
        p = attention_rows(a, kind, geometry, image)  # [h, Lq, Lk]
        entropy = row_entropy(p)  # [h, Lq]
        rows += p.shape[1]
        for i in range(heads):
            for j in range(i + 1, heads):
                js = row_entropy((p[i] + p[j]) / 2) - (entropy[i] + entropy[j]) / 2  # [Lq]
                value = float(js.clamp_min(0).double().sum())
                total[i, j] += value
                total[j, i] += value
    return total, rows


# ---------------------------------------------------------------------------------- dataset level
def _boxes_of(targets: list[Target] | None) -> list[Tensor] | None:
    if targets is None:
        return None
    try:
        return [boxes_in_pixels(t) for t in targets]
    except KeyError as error:
        raise ValueError(
            f"targets need 'boxes' (cxcywh in [0, 1]) and 'size' (height, width) per image; missing {error}"
        ) from None


def _site_columns(info: SiteInfo) -> dict[str, Any]:
    return {"site": info.name, "stage": info.stage, "kind": info.kind, "layer": site_layer(info.name)}


@torch.no_grad()
def head_statistics(
    model: Detector,
    data: DataSource,
    sites: SitePattern = "*",
    batch_size: int = 2,
    targets: Sequence[Target] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Entropy, attention distance, locality (and object mass) of every head over ``data``.

    See the module docstring for the definitions.

    Args:
        model: a ``sdetr.Detector`` of any preset, used as given (normally eval mode).
        data: anything :func:`analysis.batches.iter_batches` accepts.
        sites: glob or list of globs over site names, as in ``sdetr.record``.
        batch_size: images per forward (the result does not depend on it beyond float rounding,
            except through padding, which changes the backbone's view of the border).
        targets: one target per image (``boxes`` cxcywh in [0, 1], ``size``) for ``object_mass``;
            targets carried by ``data`` (a ``CocoDetection``) are used when this is None.
        limit: at most this many images.
        progress: show a tqdm bar.
    Returns:
        One row per site x head: ``site, stage, kind, layer, head, heads, stride, entropy,
        norm_entropy, distance_px, local_mass, n_queries``, plus ``object_mass`` when targets
        are available. ``stride`` is NaN for decoder self-attention; ``distance_px``,
        ``local_mass`` and ``object_mass`` are NaN for decoder sites.
    """
    sums: dict[str, HeadSums] = {}

    def reduce(site: str, grids: SiteGrids, batch_targets: list[Target] | None) -> None:
        assert grids.a is not None
        part = reduce_attention(grids.a, grids.kind, grids.geometry, _boxes_of(batch_targets))
        if site in sums:
            sums[site].add(part)
        else:
            sums[site] = part

    summary = stream_sites(
        model,
        data,
        reduce,
        sites=sites,
        batch_size=batch_size,
        targets=targets,
        limit=limit,
        progress=progress,
        desc="head statistics",
    )
    records = []
    for info in list_sites(model):
        if info.name not in sums:
            continue
        means = sums[info.name].means(info.kind)
        for head in range(info.heads):
            row = {
                **_site_columns(info),
                "head": head,
                "heads": info.heads,
                "stride": float("nan") if info.stride is None else float(info.stride),
                "entropy": float(means["entropy"][head]),
                "norm_entropy": float(means["norm_entropy"][head]),
                "distance_px": float(means["distance_px"][head]),
                "local_mass": float(means["local_mass"][head]),
                "n_queries": sums[info.name].rows,
            }
            if summary.with_targets:
                row["object_mass"] = float(means["object_mass"][head])
            records.append(row)
    columns = STAT_COLUMNS + (["object_mass"] if summary.with_targets else [])
    return pd.DataFrame.from_records(records, columns=columns)


@torch.no_grad()
def head_redundancy(
    model: Detector,
    data: DataSource,
    sites: SitePattern = "*",
    batch_size: int = 2,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean Jensen-Shannon divergence between the attention rows of every pair of heads of a site.

    Args:
        model / data / sites / batch_size / limit / progress: as in :func:`head_statistics`.
    Returns:
        One row per (site, head_i, head_j), every ordered pair including ``i == j`` (0):
        ``site, stage, kind, layer, head_i, head_j, js_divergence`` (natural log, in ``[0, log 2]``).
        A single-head site gives the one row ``(0, 0, 0.0)``.
    """
    totals: dict[str, tuple[Tensor, int]] = {}

    def reduce(site: str, grids: SiteGrids, _targets: list[Target] | None) -> None:
        assert grids.a is not None
        js, rows = reduce_redundancy(grids.a, grids.kind, grids.geometry)
        if site in totals:
            previous, seen = totals[site]
            totals[site] = (previous + js, seen + rows)
        else:
            totals[site] = (js, rows)

    stream_sites(
        model,
        data,
        reduce,
        sites=sites,
        batch_size=batch_size,
        limit=limit,
        progress=progress,
        desc="head redundancy",
    )
    records = []
    for info in list_sites(model):
        if info.name not in totals:
            continue
        js, rows = totals[info.name]
        mean = (js / max(rows, 1)).numpy()  # [heads, heads]
        for i in range(info.heads):
            for j in range(info.heads):
                records.append({**_site_columns(info), "head_i": i, "head_j": j, "js_divergence": float(mean[i, j])})
    return pd.DataFrame.from_records(records, columns=REDUNDANCY_COLUMNS)


def redundancy_matrix(df: pd.DataFrame, site: str) -> np.ndarray:
    """``[heads, heads]`` mean JS divergences of ``site`` from a :func:`head_redundancy` frame."""
    part = df[df["site"] == site]
    if part.empty:
        raise KeyError(f"site {site!r} is not in the frame; sites: {list(dict.fromkeys(df['site']))}")
    heads = int(max(part["head_i"].max(), part["head_j"].max())) + 1
    matrix = np.full((heads, heads), np.nan)
    matrix[part["head_i"].to_numpy(int), part["head_j"].to_numpy(int)] = part["js_divergence"].to_numpy(float)
    return matrix


# ---------------------------------------------------------------------------------- figures
def plot_attention_distance(stats_df: pd.DataFrame) -> Figure:
    """ViT-style mean attention distance: one panel per stage's encoder, x = layer, a dot per head.

    Args:
        stats_df: a :func:`head_statistics` frame (decoder rows are ignored).
    """
    encoder = stats_df[(stats_df["kind"] == "encoder_self") & stats_df["distance_px"].notna()]
    if encoder.empty:
        raise ValueError("stats_df has no encoder_self rows with distance_px; compute it over encoder sites")
    stages = sorted(encoder["stage"].unique())
    figure = Figure(figsize=(4.2 * len(stages), 3.6), constrained_layout=True)
    axes = figure.subplots(1, len(stages), sharey=True, squeeze=False)[0]
    for ax, stage, colour in zip(axes, stages, _colours(len(stages)), strict=True):
        part = encoder[encoder["stage"] == stage]
        ax.scatter(part["layer"], part["distance_px"], color=colour, alpha=0.8, s=28)
        layers = sorted(part["layer"].unique())
        ax.set_xticks(layers)
        ax.set_xlabel("encoder layer")
        stride = part["stride"].iloc[0]
        heads = int(part["heads"].max())
        ax.set_title(f"stage {stage} encoder (stride {stride:g}, {heads} head{'s' * (heads > 1)})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean attention distance (px)")
    return figure


def plot_head_entropy(stats_df: pd.DataFrame, normalised: bool = True) -> Figure:
    """Attention entropy per head: one panel per site kind, x = (stage, layer), a dot per head.

    Args:
        stats_df: a :func:`head_statistics` frame.
        normalised: plot ``norm_entropy`` (1 = uniform over the keys) instead of ``entropy``.
    """
    column = "norm_entropy" if normalised else "entropy"
    kinds = [k for k in ("encoder_self", "decoder_self", "decoder_cross") if (stats_df["kind"] == k).any()]
    if not kinds:
        raise ValueError("stats_df has no rows; pass a head_statistics frame")
    figure = Figure(figsize=(4.2 * len(kinds), 3.6), constrained_layout=True)
    axes = figure.subplots(1, len(kinds), sharey=normalised, squeeze=False)[0]
    stages = sorted(stats_df["stage"].unique())
    colours = dict(zip(stages, _colours(len(stages)), strict=True))
    for ax, kind in zip(axes, kinds, strict=True):
        part = stats_df[stats_df["kind"] == kind]
        order = sorted({(int(s), int(layer)) for s, layer in zip(part["stage"], part["layer"], strict=True)})
        position = {key: i for i, key in enumerate(order)}
        for stage in stages:
            sub = part[part["stage"] == stage]
            if sub.empty:
                continue
            x = [position[(int(s), int(layer))] for s, layer in zip(sub["stage"], sub["layer"], strict=True)]
            ax.scatter(x, sub[column], color=colours[stage], label=f"stage {stage}", alpha=0.8, s=28)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([f"s{s}.{layer}" for s, layer in order])
        ax.set_xlabel("stage.layer")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("entropy / log(keys)" if normalised else "entropy (nats)")
    return figure


def plot_redundancy(redundancy_df: pd.DataFrame, site: str | None = None) -> Figure:
    """Heads x heads heatmaps of the mean JS divergence, one per site (or just ``site``).

    Args:
        redundancy_df: a :func:`head_redundancy` frame.
        site: one site name, or None for every site in the frame.
    """
    names = [site] if site is not None else list(dict.fromkeys(redundancy_df["site"]))
    if not names:
        raise ValueError("redundancy_df has no rows; pass a head_redundancy frame")
    columns = min(4, len(names))
    lines = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.3 * lines), constrained_layout=True)
    axes = figure.subplots(lines, columns, squeeze=False).reshape(-1)
    for ax, name in zip(axes, names, strict=False):
        matrix = redundancy_matrix(redundancy_df, name)
        shown = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=math.log(2))
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("head j")
        ax.set_ylabel("head i")
        ax.set_xticks(range(matrix.shape[0]))
        ax.set_yticks(range(matrix.shape[0]))
        figure.colorbar(shown, ax=ax, shrink=0.8, label="JS divergence (nats)")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return figure


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
