"""Effective rank and principal-direction variance of each head's queries and keys over a dataset.

For every site, head and tensor (``q``, ``k``) the vectors of all VALID positions are pooled
over the dataset: encoder sites the unpadded grid cells (for q and k); decoder cross-attention
the object queries (q) and the unpadded cells (k); decoder self-attention the object queries.

Streaming, exactly: per head we accumulate ``n``, the vector sum ``sum x`` (float64 ``[d]``) and
the second moment ``S = sum x x^T`` (float64 ``[d, d]``). At the end the centred scatter
``C = S - n mu mu^T`` equals ``X_c^T X_c`` for the centred data matrix ``X_c [n, d]`` of all
vectors at once, so its eigenvalues are the squared singular values of ``X_c``: with
``lambda_i`` the covariance eigenvalues (of ``C / n``), ``s_i = sqrt(lambda_i * n)``. Memory is
``O(heads * d^2)`` per site, whatever the dataset size; nothing else is kept.

- ``effective_rank = exp(-sum_i p_i log p_i)`` with ``p_i = s_i / sum_j s_j`` (Roy & Vetterli's
  effective rank): ``r`` for data spanning ``r`` orthogonal directions of equal variance;
- ``var_top{k} = sum_{i <= k} lambda_i / sum_i lambda_i``, eigenvalues in decreasing order
  (1 when ``k >= head_dim``).

Eigenvalues below ``1e-10`` of the largest are float64 round-off of exactly-zero directions and
are set to 0 (their singular values would be below ``1e-5`` of the largest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from analysis.batches import DataSource, Target
from analysis.head_statistics import SitePattern, site_layer, stream_sites
from sdetr import Detector, GridGeometry, SiteGrids
from sdetr import sites as list_sites

QKV_COLUMNS = [
    "site",
    "stage",
    "kind",
    "layer",
    "head",
    "heads",
    "head_dim",
    "tensor",
    "effective_rank",
    "var_top1",
    "var_top4",
    "var_top16",
    "n_vectors",
]
TOP_K = (1, 4, 16)
RELATIVE_ZERO = 1e-10


def site_vectors(tensor: Tensor, kind: str, name: str, geometry: GridGeometry, image: int) -> Tensor:
    """One image's valid vectors of a recorded q or k, per head.

    Args:
        tensor: ``[B, heads, H, W, d]`` (grid tensors) or ``[B, heads, Q, d]`` (object queries).
        kind: the site's kind; name: ``"q"`` or ``"k"``.
        geometry: the site's geometry (``valid_cells`` per image).
        image: batch index.
    Returns:
        ``[heads, n, d]``: the valid cells (row-major within the valid block) or all queries.
    """
    heads, dim = tensor.shape[1], tensor.shape[-1]
    on_grid = kind == "encoder_self" or (kind == "decoder_cross" and name == "k")
    if on_grid:
        if tensor.dim() != 5:
            raise ValueError(f"{kind} {name} must be [B, heads, H, W, d], got {tuple(tensor.shape)}")
        rows, cols = geometry.valid_cells[image]
        return tensor[image, :, :rows, :cols].reshape(heads, rows * cols, dim)  # [h, n, d]
    if tensor.dim() != 4:
        raise ValueError(f"{kind} {name} must be [B, heads, Q, d], got {tuple(tensor.shape)}")
    return tensor[image]  # [h, Q, d]


@dataclass
class Moments:
    """Streaming first and second moments of per-head vectors.

    Attributes:
        total: ``[heads, d]`` float64 sum of the vectors.
        second: ``[heads, d, d]`` float64 sum of their outer products.
        count: vectors seen per head.
    """

    total: Tensor
    second: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, heads: int, dim: int) -> Moments:
        return cls(torch.zeros(heads, dim, dtype=torch.float64), torch.zeros(heads, dim, dim, dtype=torch.float64))

    def add(self, x: Tensor) -> None:
        """Fold in ``x [heads, n, d]``."""
        x64 = x.double()
        self.total += x64.sum(1).cpu()  # [h, d]
        self.second += (x64.transpose(1, 2) @ x64).cpu()  # [h, d, d]
        self.count += x.shape[1]

    def eigenvalues(self) -> Tensor:
        """``[heads, d]`` eigenvalues of the centred scatter ``C = S - n mu mu^T``, decreasing (= ``s_i^2``)."""
        if self.count == 0:
            return torch.zeros_like(self.total)
        mean = self.total / self.count  # [h, d]
        scatter = self.second - self.count * mean[:, :, None] * mean[:, None, :]  # [h, d, d]
        values = torch.linalg.eigvalsh((scatter + scatter.transpose(1, 2)) / 2).flip(-1)  # [h, d] decreasing
        values = values.clamp_min(0)
        return torch.where(values <= values[:, :1] * RELATIVE_ZERO, torch.zeros_like(values), values)


def spectrum_statistics(eigenvalues: Tensor) -> dict[str, float]:
    """Effective rank and top-k variance shares from the decreasing scatter eigenvalues ``[d]`` of one head."""
    values = eigenvalues.double().clamp_min(0)
    total = float(values.sum())
    if total <= 0:
        return {"effective_rank": math.nan, **{f"var_top{k}": math.nan for k in TOP_K}}
    singular = values.sqrt()  # s_i = sqrt(lambda_i * n): the scatter's eigenvalues are lambda_i * n
    p = singular / singular.sum()
    effective_rank = math.exp(float(-torch.special.xlogy(p, p).sum()))
    shares = {f"var_top{k}": float(values[:k].sum() / total) for k in TOP_K}
    return {"effective_rank": effective_rank, **shares}


@torch.no_grad()
def qkv_statistics(
    model: Detector,
    data: DataSource,
    sites: SitePattern = "*",
    batch_size: int = 2,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Effective rank and variance in the top 1/4/16 principal directions of each head's Q and K.

    See the module docstring for the definitions and the exact streaming computation.

    Args:
        model: a ``sdetr.Detector`` of any preset, used as given (normally eval mode).
        data: anything :func:`analysis.batches.iter_batches` accepts.
        sites: glob or list of globs over site names, as in ``sdetr.record``.
        batch_size: images per forward.
        limit: at most this many images.
        progress: show a tqdm bar.
    Returns:
        One row per site x head x tensor: ``site, stage, kind, layer, head, heads, head_dim,
        tensor ("q"/"k"), effective_rank, var_top1, var_top4, var_top16, n_vectors``.
    """
    moments: dict[tuple[str, str], Moments] = {}

    def reduce(site: str, grids: SiteGrids, _targets: list[Target] | None) -> None:
        for name in ("q", "k"):
            tensor = getattr(grids, name)
            assert tensor is not None
            key = (site, name)
            if key not in moments:
                moments[key] = Moments.zeros(tensor.shape[1], tensor.shape[-1])
            for image in range(tensor.shape[0]):
                moments[key].add(site_vectors(tensor, grids.kind, name, grids.geometry, image).float())

    stream_sites(
        model,
        data,
        reduce,
        sites=sites,
        tensors=("q", "k"),
        batch_size=batch_size,
        limit=limit,
        progress=progress,
        desc="qkv statistics",
    )
    records = []
    for info in list_sites(model):
        for name in ("q", "k"):
            if (info.name, name) not in moments:
                continue
            found = moments[(info.name, name)]
            eigenvalues = found.eigenvalues()  # [heads, d]
            for head in range(info.heads):
                records.append(
                    {
                        "site": info.name,
                        "stage": info.stage,
                        "kind": info.kind,
                        "layer": site_layer(info.name),
                        "head": head,
                        "heads": info.heads,
                        "head_dim": info.head_dim,
                        "tensor": name,
                        **spectrum_statistics(eigenvalues[head]),
                        "n_vectors": found.count,
                    }
                )
    return pd.DataFrame.from_records(records, columns=QKV_COLUMNS)


def plot_effective_rank(qkv_df: pd.DataFrame) -> Figure:
    """Effective rank of Q and K per head: one panel per tensor, x = site, a dot per head, a bar at ``head_dim``.

    Args:
        qkv_df: a :func:`qkv_statistics` frame.
    """
    if qkv_df.empty:
        raise ValueError("qkv_df has no rows; pass a qkv_statistics frame")
    names = list(dict.fromkeys(qkv_df["site"]))
    tensors = [t for t in ("q", "k") if (qkv_df["tensor"] == t).any()]
    figure = Figure(figsize=(max(6.0, 0.55 * len(names) + 2) * len(tensors), 4.2), constrained_layout=True)
    axes = figure.subplots(1, len(tensors), sharey=True, squeeze=False)[0]
    position = {name: i for i, name in enumerate(names)}
    for ax, tensor in zip(axes, tensors, strict=True):
        part = qkv_df[qkv_df["tensor"] == tensor]
        x = np.array([position[s] for s in part["site"]])
        ax.scatter(x, part["effective_rank"], s=24, alpha=0.8, color="tab:blue", label="head")
        dims = part.groupby("site", sort=False)["head_dim"].first()
        ax.scatter(
            [position[s] for s in dims.index], dims.to_numpy(), marker="_", s=200, color="grey", label="head_dim"
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("_attn", "") for n in names], rotation=70, fontsize="x-small")
        ax.set_title(f"effective rank of {tensor.upper()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("effective rank (exp entropy of s_i / sum s)")
    return figure
