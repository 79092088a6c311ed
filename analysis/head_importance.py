"""Which attention heads a detector needs: gate-gradient importance, ablation and pruning.

Three measurements over a dataset, each a tidy DataFrame, and their figures:

- :func:`head_importance`: Michel et al. (2019), "Are Sixteen Heads Really Better than One?".
  Every head ``h`` of a site gets a gate ``g_h`` (1 = unchanged) that scales its output before
  the output projection (``sdetr.gate_heads``, fused attention path). The importance is
  ``I_h = mean over batches of |dL/dg_h|``, with ``L`` the DETR loss of the batch
  (``criterion(model(images), targets)["total"]``); ``importance_norm`` divides it by the L2
  norm of the site's importances, ``I_h / sqrt(sum_h' I_h'^2)`` (0 stays 0).
- :func:`ablation_table`: COCO AP with each head gated to 0 in turn, and each whole site.
- :func:`pruning_curve`: COCO AP as heads are removed cumulatively, least important first (or in
  a random order, the control).

Every AP goes through :func:`analysis.evaluation.evaluate` (pycocotools' COCOeval). Gating a
head to 0 equals zeroing its slice ``out_proj.weight[:, h*d:(h+1)*d]`` by hand (tested).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from analysis.batches import DataSource, Target, count_images, iter_batches
from analysis.evaluation import eval_mode, evaluate
from analysis.head_statistics import site_layer
from sdetr import CocoDetection, Detector, SetCriterion, SiteInfo, gate_heads, sites

#: Sites the ablation and the pruning curve look at unless told otherwise: the stride-16 encoder,
#: where the paper argues that one head is enough.
DEFAULT_SITES = "stage2.encoder.*"
#: COCO stats kept in the ablation and pruning tables.
AP_COLUMNS = ("AP", "AP50", "APs", "APm", "APl")
IMPORTANCE_COLUMNS = ("site", "stage", "kind", "layer", "head", "heads", "importance", "importance_norm")
SitePattern = str | Sequence[str]


def matched_sites(model: Detector, pattern: SitePattern) -> list[SiteInfo]:
    """The sites matching ``pattern`` (glob or list of globs), in forward order.

    Raises:
        KeyError: a pattern that matches no site (the message lists the site names).
    """
    with gate_heads(model, sites=pattern) as gates:  # the same glob matching every probe uses
        names = set(gates)
    return [info for info in sites(model) if info.name in names]


def _targets_to(targets: list[Target], device: torch.device) -> list[Target]:
    return [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]


def normalise_per_site(importance: pd.DataFrame) -> pd.Series:
    """``importance / ||importance of the site||_2`` per site (a site whose importances are all 0 stays 0)."""
    norms = importance.groupby("site", sort=False)["importance"].transform(_l2_norm)
    return (importance["importance"] / norms.where(norms > 0, 1.0)).astype(float)


def _l2_norm(values: pd.Series) -> float:
    """``sqrt(sum x^2)``, scaled by the largest ``|x|`` first so tiny values do not underflow to 0."""
    largest = float(values.abs().max())
    return 0.0 if largest == 0 else largest * float(np.sqrt(((values / largest) ** 2).sum()))


def head_importance(
    model: Detector,
    data: DataSource,
    criterion: SetCriterion | None = None,
    sites: SitePattern = "*",
    batch_size: int = 2,
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Gate-gradient importance of every head of the matched sites (Michel et al., 2019).

    For each batch, ``L = criterion(model(images), targets)["total"]`` with every matched head
    gated by a leaf ``g_h = 1`` (the fused path, outputs unchanged), and ``|dL/dg_h|`` is taken
    with ``torch.autograd.grad`` on the gates only: no ``.grad`` is left on the model's
    parameters. The model runs in eval mode (dropout off) and gets its mode back afterwards.

    Args:
        model: the detector (any device; targets are moved to it).
        data: images with targets (a ``CocoDetection`` or ``(images, targets)`` batches).
        criterion: the loss; default ``SetCriterion(model.config.num_classes)`` (DETR's).
        sites: glob(s) of the sites to score (default all).
        batch_size / limit: batching and the number of images (None: all).
        progress: show a tqdm bar.
    Returns:
        One row per site x head: ``site, stage, kind, layer, head, heads, importance,
        importance_norm`` (importance = mean over batches of ``|dL/dg_h|``; importance_norm =
        importance over the L2 norm of the site's importances).
    """
    device = next(model.parameters()).device
    criterion = (criterion or SetCriterion(model.config.num_classes)).to(device)
    infos = matched_sites(model, sites)
    totals = {info.name: torch.zeros(info.heads, dtype=torch.float64) for info in infos}
    batches = 0
    with (
        eval_mode(model),
        torch.enable_grad(),
        gate_heads(model, sites=[info.name for info in infos], requires_grad=True) as gates,
        tqdm(total=count_images(data, limit), desc="head importance", disable=not progress, leave=False) as bar,
    ):
        names = list(gates)
        for batch in iter_batches(data, batch_size, limit):
            if batch.targets is None:
                raise ValueError(
                    "head_importance needs targets for the loss: pass a CocoDetection or (images, targets) batches"
                )
            outputs = model([image.to(device) for image in batch.images])
            loss = criterion(outputs, _targets_to(batch.targets, device))["total"]
            grads = torch.autograd.grad(loss, [gates[name] for name in names], allow_unused=True)
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:  # [heads]
                    totals[name] += grad.detach().abs().double().cpu()
            batches += 1
            bar.update(len(batch.images))
    if batches == 0:
        raise ValueError("head_importance: data gave no images (empty dataset or limit=0)")
    rows = [
        {
            "site": info.name,
            "stage": info.stage,
            "kind": info.kind,
            "layer": site_layer(info.name),
            "head": head,
            "heads": info.heads,
            "importance": float(totals[info.name][head] / batches),
        }
        for info in infos
        for head in range(info.heads)
    ]
    table = pd.DataFrame(rows, columns=list(IMPORTANCE_COLUMNS[:-1]))
    table["importance_norm"] = normalise_per_site(table)
    return table


def _require_coco(dataset: Any, function: str) -> CocoDetection:
    if not isinstance(dataset, CocoDetection):
        raise TypeError(
            f"{function}: dataset must be a sdetr.CocoDetection (AP needs its COCO ground truth), "
            f"got {type(dataset).__name__}"
        )
    return dataset


def _gates_without(infos: Sequence[SiteInfo], removed: Sequence[tuple[str, int]]) -> dict[str, list[float]]:
    """Gates (1 per head) of the sites in ``infos`` with the ``(site, head)`` pairs in ``removed`` at 0."""
    gates = {info.name: [1.0] * info.heads for info in infos}
    for site, head in removed:
        gates[site][head] = 0.0
    return {site: values for site, values in gates.items() if 0.0 in values}


def ablations(model: Detector, sites: SitePattern = DEFAULT_SITES, whole_sites: bool = True) -> list[dict[str, Any]]:
    """The ablations :func:`ablation_table` evaluates, in order: ``site``, ``head``, ``ablated``
    (``"none"``, ``"head"`` or ``"site"``) and the ``gates`` to pass to ``sdetr.gate_heads``.

    The baseline (``site="none"``, ``head=-1``, no gates) comes first, then each head of each
    matched site, then (``whole_sites``) each whole site with ``head=-1``. A one-head site gets no
    whole-site row: its head row already removes the whole site.
    """
    infos = matched_sites(model, sites)
    chosen: list[dict[str, Any]] = [{"site": "none", "head": -1, "ablated": "none", "gates": {}}]
    for info in infos:
        for head in range(info.heads):
            gates = _gates_without([info], [(info.name, head)])
            chosen.append({"site": info.name, "head": head, "ablated": "head", "gates": gates})
    if whole_sites:
        for info in infos:
            if info.heads > 1:
                gates = {info.name: [0.0] * info.heads}
                chosen.append({"site": info.name, "head": -1, "ablated": "site", "gates": gates})
    return chosen


def _ap_row(
    model: Detector, dataset: CocoDetection, gates: Mapping[str, list[float]], batch_size: int, limit: int | None
) -> dict[str, float]:
    with gate_heads(model, gates) if gates else nullcontext():
        stats = evaluate(model, dataset, batch_size, limit, progress=False)
    return {name: stats[name] for name in AP_COLUMNS}


def _delta(value: float, baseline: float) -> float:
    """``value - baseline``, NaN when either is COCOeval's -1 (no ground truth in that size range)."""
    return math.nan if value < 0 or baseline < 0 else value - baseline


def ablation_table(
    model: Detector,
    dataset: CocoDetection,
    sites: SitePattern = DEFAULT_SITES,
    batch_size: int = 2,
    limit: int | None = None,
    whole_sites: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """COCO AP with each head of the matched sites gated to 0 in turn (and each whole site).

    Args:
        model: the detector (run in eval mode; its mode is restored).
        dataset: a ``CocoDetection`` (AP through ``analysis.evaluation.evaluate``).
        sites: glob(s) of the sites to ablate (default the stage-2 encoder).
        batch_size / limit: batching and the number of images (None: all).
        whole_sites: also ablate every head of a site at once (sites with more than one head).
        progress: a tqdm bar over the ablations.
    Returns:
        One row per ablation, see :func:`ablations`: ``site, head, ablated, AP, AP50, APs, APm,
        APl, dAP, dAP50, dAPs``. Row 0 is the baseline (``site="none"``, ``head=-1``,
        ``ablated="none"``); whole-site rows have ``head=-1`` and ``ablated="site"``.
        ``dX = X - baseline X`` (NaN where COCOeval gives -1: no objects of that size).
    """
    dataset = _require_coco(dataset, "ablation_table")
    rows = []
    with eval_mode(model):
        for ablation in tqdm(ablations(model, sites, whole_sites), desc="ablation", disable=not progress, leave=False):
            row = {key: ablation[key] for key in ("site", "head", "ablated")}
            rows.append({**row, **_ap_row(model, dataset, ablation["gates"], batch_size, limit)})
    table = pd.DataFrame(rows)
    for name in ("AP", "AP50", "APs"):
        baseline = float(table[name].iloc[0])
        table[f"d{name}"] = [_delta(float(v), baseline) for v in table[name]]
    return table


def removal_order(
    infos: Sequence[SiteInfo],
    order: str = "importance",
    importance: pd.DataFrame | None = None,
    score: str = "importance_norm",
    seed: int = 0,
) -> list[tuple[str, int]]:
    """``(site, head)`` pairs of ``infos`` in the order :func:`pruning_curve` removes them.

    ``order="importance"``: ascending ``importance[score]`` (ties: forward order of the sites,
    then head index); ``order="random"``: a permutation drawn with ``numpy.random.default_rng(seed)``.
    """
    heads = [(info.name, head) for info in infos for head in range(info.heads)]
    if order == "random":
        permutation = np.random.default_rng(seed).permutation(len(heads))
        return [heads[i] for i in permutation]
    if order != "importance":
        raise ValueError(f"order must be 'importance' or 'random', got {order!r}")
    if importance is None:
        raise ValueError("order='importance' needs the importance table (see head_importance)")
    if score not in importance.columns:
        raise ValueError(f"score={score!r} is not a column of the importance table ({list(importance.columns)})")
    scores = {(str(r.site), int(r.head)): float(getattr(r, score)) for r in importance.itertuples()}
    missing = [pair for pair in heads if pair not in scores]
    if missing:
        raise ValueError(
            f"the importance table has no rows for {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
            "compute it with head_importance(model, data, sites=<the same sites>)"
        )
    rank = {pair: i for i, pair in enumerate(heads)}
    return sorted(heads, key=lambda pair: (scores[pair], rank[pair]))


def pruning_curve(
    model: Detector,
    dataset: CocoDetection,
    sites: SitePattern = DEFAULT_SITES,
    order: str = "importance",
    importance: pd.DataFrame | None = None,
    score: str = "importance_norm",
    seed: int = 0,
    max_removed: int | None = None,
    batch_size: int = 2,
    limit: int | None = None,
    criterion: SetCriterion | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """COCO AP as the heads of the matched sites are removed (gated to 0) one by one, cumulatively.

    Args:
        model: the detector (run in eval mode; its mode is restored).
        dataset: a ``CocoDetection``: the AP, and with ``order="importance"`` and no
            ``importance`` table also the importance (:func:`head_importance` on the same images).
        sites: glob(s) of the sites whose heads are pruned (default the stage-2 encoder).
        order: ``"importance"`` (least important first, by ``score``) or ``"random"`` (the control).
        importance: a :func:`head_importance` table to order by (computed when None).
        score: the importance column to sort by (``importance_norm``, as Michel et al., or ``importance``).
        seed: the random order's seed.
        max_removed: stop after this many heads (None: all of them).
        batch_size / limit / criterion: as in :func:`head_importance` and :func:`ablation_table`.
        progress: tqdm bars.
    Returns:
        One row per step: ``step, removed, order, site, head, AP, AP50, APs, APm, APl``. Step 0 removes
        nothing (``site="none"``, ``head=-1``); step k has removed k heads, the k-th being ``site, head``.
    """
    dataset = _require_coco(dataset, "pruning_curve")
    infos = matched_sites(model, sites)
    if order == "importance" and importance is None:
        importance = head_importance(model, dataset, criterion, [i.name for i in infos], batch_size, limit, progress)
    sequence = removal_order(infos, order, importance, score, seed)
    if max_removed is not None:
        sequence = sequence[:max_removed]
    rows = []
    with eval_mode(model):
        for step in tqdm(range(len(sequence) + 1), desc=f"pruning ({order})", disable=not progress, leave=False):
            site, head = sequence[step - 1] if step else ("none", -1)
            stats = _ap_row(model, dataset, _gates_without(infos, sequence[:step]), batch_size, limit)
            rows.append({"step": step, "removed": step, "order": order, "site": site, "head": head, **stats})
    return pd.DataFrame(rows)


def _short_site(name: str) -> str:
    """``stage2.encoder.1.self_attn`` -> ``s2.enc.1``."""
    stage, part, layer = name.split(".")[:3]
    return f"s{stage.removeprefix('stage')}.{part[:3]}.{layer}"


def plot_ablation(table: pd.DataFrame, metric: str = "dAP", title: str | None = None) -> Figure:
    """Bar chart of an :func:`ablation_table`: ``metric`` (default dAP) per ablated head, grouped by
    site; whole-site ablations are the hatched bars (``h*``)."""
    if metric not in table.columns:
        raise ValueError(f"metric={metric!r} is not a column of the ablation table ({list(table.columns)})")
    shown = table[table["ablated"] != "none"]
    figure = Figure(figsize=(max(4.0, 0.45 * len(shown) + 1.5), 3.2), layout="constrained")
    ax = figure.subplots()
    labels = [f"{_short_site(r.site)} h{'*' if r.ablated == 'site' else r.head}" for r in shown.itertuples()]
    site_names = list(dict.fromkeys(shown["site"]))
    colours = [colormaps["tab10"](site_names.index(site) % 10) for site in shown["site"]]
    bars = ax.bar(range(len(shown)), shown[metric].to_numpy(dtype=float), color=colours)
    for bar, ablated in zip(bars, shown["ablated"], strict=True):
        if ablated == "site":
            bar.set_hatch("//")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shown)), labels, rotation=60, ha="right", fontsize=8)
    base, baseline = metric.removeprefix("d"), table[table["ablated"] == "none"]
    note = f" (baseline {base} {float(baseline[base].iloc[0]):.3f})" if len(baseline) and base in table else ""
    ax.set_ylabel(f"{metric} when ablated")
    ax.set_title(title or f"Head ablation{note}")
    return figure


def plot_pruning_curve(curve: pd.DataFrame, metric: str = "AP", title: str | None = None) -> Figure:
    """``metric`` against the number of heads removed, one line per ``order`` in ``curve``
    (one or several :func:`pruning_curve` tables concatenated), as in Michel et al.'s figure."""
    if metric not in curve.columns:
        raise ValueError(f"metric={metric!r} is not a column of the pruning curve ({list(curve.columns)})")
    figure = Figure(figsize=(4.8, 3.2), layout="constrained")
    ax = figure.subplots()
    for order, part in curve.groupby("order", sort=False):
        part = part.sort_values("removed")
        ax.plot(part["removed"], part[metric], marker="o", label=str(order))
    ax.set_xlabel("heads removed")
    ax.set_ylabel(metric)
    ax.legend(title="order")
    ax.set_title(title or f"Pruning curve ({metric})")
    return figure
