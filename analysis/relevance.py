"""Which image cells one detection draws on, read through the transformer's attention maps.

Two methods, both giving, per stage, a map over that stage's own feature grid (stage 1 at
stride 32, stage 2 at stride 16) and the same map upsampled to the image:

**Relevance** (:func:`relevance`): the gradient-weighted propagation of Chefer, Gur and Wolf,
"Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (ICCV 2021), its encoder-decoder case without LRP (the variant their DETR demo
runs, ``use_lrp=False``). The explained scalar is ``y = softmax(pred_logits)[0, query, class]`` of
the final prediction (:func:`analysis.attribution.explained_detection` picks query and class).
With ``A`` a site's map ``[heads, Lq, Lk]`` and ``∇A = ∂y/∂A``:

- rule 5, per site: ``Ā = mean_h (∇A ⊙ A)^+`` (:func:`head_relevance`);
- rules 6-7, encoder self-attention: ``R_ii += Ā R_ii`` (``R_ii`` starts at ``I``);
- rules 6-7, decoder self-attention: ``R_qq += Ā R_qq`` and ``R_qi += Ā R_qi`` for every
  query-to-image relevance the queries carry (``R_qq`` starts at ``I``, ``R_qi`` at 0);
- rule 10, cross-attention: ``R_qi += R̄_qq^T Ā R̄_ii`` (:func:`cross_attention_rule`), with the
  residual normalisation of eqs. 8-9, ``R̄ = (R - I) / rowsum(R - I) + I``
  (:func:`normalize_self_relevance`). Where the reference code divides 0 by 0 (a row of
  ``R - I`` that is all zero, e.g. a query whose map never got gradient) and then zeroes every
  NaN of the whole addition, here such a row of ``R̄`` is the identity row: nothing is lost.

Layers are taken in forward order: every encoder layer of a stage, then for each decoder
layer its self-attention and then its cross-attention.

**Across SDETR's stages.** Stage 2's decoder starts from stage 1's last output
(``tgt = hs1[-1]``, a per-token LayerNorm of it), so its query tokens are stage 1's: the
query-to-query relevance ``R_qq`` is not reset but carried on from stage 1's end, and stage 1's
query-to-image relevance ``R_q,i1`` [Q, HW_1] travels with the queries: stage 2's decoder
self-attention updates it (``R_q,i1 += Ā R_q,i1``) like stage 2's own ``R_q,i2``, while stage 2's
cross-attention (whose keys are stage-2 cells) adds to ``R_q,i2`` only, normalised with the
carried ``R_qq``. Each stage's image relevance ``R_ii`` starts at ``I`` in its own encoder. A stage
that does not continue from the previous one (``from_previous=False``) restarts ``R_qq = I`` and
zeroes the earlier stages' ``R_qi`` (its queries carry nothing of them). The result for stage
``s`` is the row ``R_q,is[query]`` on stage ``s``'s grid.

**Attention rollout** (:func:`attention_rollout`, Abnar and Zuidema 2020): per stage,
``R = Â_L ... Â_1`` with ``Â_l = rownorm(0.5 mean_h A_l + 0.5 I)`` over that stage's encoder layers,
then the query's map is ``mean_h A_cross[query] @ R`` with the stage's last cross-attention.
No gradients, no decoder self-attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from analysis.attribution import check_image, explained_detection, overlay, upsample_grid
from analysis.evaluation import eval_mode
from sdetr import Detector, SiteGrids, record, sites

# ------------------------------------------------------------------------------------ rules


def head_relevance(a: Tensor, grad: Tensor) -> Tensor:
    """Rule 5: ``Ā = mean_h (∇A ⊙ A)^+``.

    Args:
        a: ``[heads, Lq, Lk]`` attention maps; grad: ``[heads, Lq, Lk]`` ``∂y/∂A``.
    Returns:
        ``[Lq, Lk]``.
    """
    if a.shape != grad.shape:
        raise ValueError(f"a {tuple(a.shape)} and grad {tuple(grad.shape)} must have the same shape")
    return (grad * a).clamp(min=0).mean(0)


def self_attention_rule(r_self: Tensor, cam: Tensor, carried: Sequence[Tensor] = ()) -> tuple[Tensor, list[Tensor]]:
    """Rules 6-7 for a self-attention layer: ``R_ss + Ā R_ss`` and ``R_sx + Ā R_sx`` for each carried ``R_sx``.

    Args:
        r_self: ``[N, N]`` relevance of the tokens on themselves; cam: ``[N, N]`` ``Ā``.
        carried: ``[N, M]`` relevances of the same tokens on other tokens (e.g. image cells).
    """
    return r_self + cam @ r_self, [r + cam @ r for r in carried]


def normalize_self_relevance(r: Tensor) -> Tensor:
    """Eqs. 8-9: ``R̄ = (R - I) / rowsum(R - I) + I``; a row of ``R - I`` summing to 0 stays the identity row.

    Args:
        r: ``[N, N]`` self relevance (``I`` plus non-negative terms).
    """
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    residual = r - eye  # [N, N]
    sums = residual.sum(-1, keepdim=True)  # [N, 1]
    safe = torch.where(sums > 0, sums, torch.ones_like(sums))
    return torch.where(sums > 0, residual / safe, torch.zeros_like(residual)) + eye


def cross_attention_rule(r_qq: Tensor, r_ii: Tensor, cam: Tensor) -> Tensor:
    """Rule 10's addition to ``R_qi``: ``R̄_qq^T Ā R̄_ii``.

    Args:
        r_qq: ``[Q, Q]``; r_ii: ``[HW, HW]``; cam: ``[Q, HW]`` ``Ā`` of the cross-attention.
    Returns:
        ``[Q, HW]``.
    """
    return normalize_self_relevance(r_qq).T @ cam @ normalize_self_relevance(r_ii)


@dataclass
class StageCams:
    """One stage's head-averaged relevance maps ``Ā`` in forward order.

    Attributes:
        encoder: per encoder layer ``[HW, HW]``.
        decoder: per decoder layer ``(self [Q, Q], cross [Q, HW])``.
        from_previous: whether the stage's decoder starts from the previous stage's output.
    """

    encoder: list[Tensor]
    decoder: list[tuple[Tensor, Tensor]]
    from_previous: bool = False


@dataclass
class Propagation:
    """Relevance matrices after every layer.

    Attributes:
        r_qq: ``[Q, Q]`` query-to-query relevance at the end.
        r_qi: per stage ``[Q, HW_s]`` query-to-image relevance at the end.
        r_ii: per stage ``[HW_s, HW_s]`` image self relevance after that stage's encoder.
    """

    r_qq: Tensor
    r_qi: list[Tensor]
    r_ii: list[Tensor]


def propagate(stages: Sequence[StageCams]) -> Propagation:
    """Apply the rules layer by layer, carrying query relevance across stages (see the module docstring)."""
    if not stages or not stages[0].decoder:
        raise ValueError("propagate needs at least one stage with a decoder layer")
    first_self = stages[0].decoder[0][0]
    num_queries = first_self.shape[0]
    eye_q = torch.eye(num_queries, dtype=first_self.dtype, device=first_self.device)
    r_qq = eye_q
    r_qi: list[Tensor] = []
    r_ii_all: list[Tensor] = []
    for stage in stages:
        if not stage.decoder:
            raise ValueError("every stage needs at least one decoder layer")
        cells = stage.decoder[0][1].shape[1]
        r_ii = torch.eye(cells, dtype=first_self.dtype, device=first_self.device)
        for cam in stage.encoder:
            r_ii, _ = self_attention_rule(r_ii, cam)
        if not stage.from_previous:
            r_qq = eye_q
            r_qi = [torch.zeros_like(r) for r in r_qi]
        r_qi.append(torch.zeros(num_queries, cells, dtype=first_self.dtype, device=first_self.device))
        for self_cam, cross_cam in stage.decoder:
            r_qq, r_qi = self_attention_rule(r_qq, self_cam, r_qi)
            r_qi[-1] = r_qi[-1] + cross_attention_rule(r_qq, r_ii, cross_cam)
        r_ii_all.append(r_ii)
    return Propagation(r_qq, r_qi, r_ii_all)


def rollout(maps: Sequence[Tensor]) -> Tensor:
    """Attention rollout of self-attention layers: ``Â_L ... Â_1``, ``Â = rownorm(0.5 A + 0.5 I)``.

    Args:
        maps: per layer, first layer first, ``[N, N]`` head-averaged maps.
    Returns:
        ``[N, N]`` (the identity for no layers).
    """
    if not maps:
        raise ValueError("rollout needs at least one layer's map")
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    result = eye
    for a in maps:
        step = 0.5 * a + 0.5 * eye
        step = step / step.sum(-1, keepdim=True)
        result = step @ result
    return result


# --------------------------------------------------------------------------------- results


@dataclass
class RelevanceResult:
    """Per-stage maps of one detection.

    Attributes:
        method: ``"relevance"`` or ``"rollout"``.
        query / class_id / score: the explained detection and its clean probability.
        maps: stage name (``"stage1"``, ...) -> ``[H_s, W_s]`` over the stage's valid grid cells.
        image_maps: stage name -> ``[H, W]`` over the image pixels (bilinear, cell-aligned).
        strides: stage name -> pixels per cell.
        query_relevance: relevance only: ``[Q]``, the row ``R_qq[query]`` (how much each query's
            token fed the explained one; 1 on the diagonal plus what self-attention added).
    """

    method: str
    query: int
    class_id: int
    score: float
    maps: dict[str, Tensor]
    image_maps: dict[str, Tensor]
    strides: dict[str, int]
    query_relevance: Tensor | None = field(default=None, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per stage x grid cell: stage, stride, row, col, pixel centre ``y``, ``x``, value."""
        rows = []
        for stage, grid in self.maps.items():
            stride = self.strides[stage]
            for row in range(grid.shape[0]):
                for col in range(grid.shape[1]):
                    rows.append(
                        {
                            "method": self.method,
                            "query": self.query,
                            "class_id": self.class_id,
                            "stage": stage,
                            "stride": stride,
                            "row": row,
                            "col": col,
                            "y": (row + 0.5) * stride,
                            "x": (col + 0.5) * stride,
                            "value": float(grid[row, col]),
                        }
                    )
        return pd.DataFrame(rows)


def _flat(grids: SiteGrids, tensor: Tensor) -> Tensor:
    """A site's map or gradient of image 0 with token axes flattened: ``[heads, Lq, Lk]``."""
    heads = tensor.shape[1]
    if grids.kind == "encoder_self":
        cells = tensor.shape[2] * tensor.shape[3]
        return tensor[0].reshape(heads, cells, cells)  # [h, H, W, H, W] -> [h, HW, HW]
    if grids.kind == "decoder_cross":
        return tensor[0].reshape(heads, tensor.shape[2], -1)  # [h, Q, H, W] -> [h, Q, HW]
    return tensor[0]  # [h, Q, Q]


def _site_cam(grids: SiteGrids) -> Tensor:
    """``Ā [Lq, Lk]`` of a site recorded with ``keep_graph`` after ``backward``."""
    assert grids.a is not None and grids.a_grad_source is not None
    a = _flat(grids, grids.a.detach())
    if grids.a_grad_source.grad is None:  # the map does not reach the explained score
        return torch.zeros_like(a[0])
    return head_relevance(a, _flat(grids, grids.a_grad()))


def _stage_outputs(
    model: Detector, grids_by_site: dict[str, SiteGrids], stage_maps: list[Tensor], height: int, width: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """Per stage: ``[H_s, W_s]`` grid map (valid cells), ``[H, W]`` image map, stride."""
    maps, image_maps, strides = {}, {}, {}
    for index, flat in enumerate(stage_maps, start=1):
        stage = f"stage{index}"
        cross = [info.name for info in sites(model) if info.stage == index and info.kind == "decoder_cross"][-1]
        geometry = grids_by_site[cross].geometry
        assert geometry.feature_size is not None and geometry.stride is not None
        rows, cols = geometry.valid_cells[0]
        grid = flat.reshape(geometry.feature_size)[:rows, :cols].detach().cpu()  # [HW] -> [H_s, W_s]
        maps[stage] = grid
        image_maps[stage] = upsample_grid(grid, (height, width), geometry.stride)
        strides[stage] = geometry.stride
    return maps, image_maps, strides


def relevance(model: Detector, image: Tensor, query: int | None = None, target: int | None = None) -> RelevanceResult:
    """Gradient-weighted relevance of one detection on each stage's grid (Chefer et al. 2021).

    Args:
        model: the detector (run in eval mode here; its mode is restored afterwards).
        image: one ``[3, H, W]`` ImageNet-normalised image.
        query / target: the explained query and class; default the highest-scoring detection and
            its class (:func:`analysis.attribution.explained_detection`).
    Returns:
        a :class:`RelevanceResult` with ``maps["stage1"]`` at stride 32, ``maps["stage2"]`` at 16.
    """
    image = check_image(image)
    device = next(model.parameters()).device
    x = image.detach().to(device)
    height, width = int(x.shape[1]), int(x.shape[2])
    infos = sites(model)
    with eval_mode(model), torch.enable_grad():
        query, class_id, score = explained_detection(model, x, query, target)
        inputs = x[None].clone().requires_grad_(True)  # [1, 3, H, W]: every map is then in the graph
        with record(model, tensors=("a",), keep_graph=True, dtype=torch.float32, device=device) as rec:
            prob = model(inputs)["pred_logits"].softmax(-1)[0, query, class_id]
            sources = [rec[info.name].a_grad_source for info in infos]
            prob.backward(inputs=[s for s in sources if s is not None])
            cams = {info.name: _site_cam(rec[info.name]) for info in infos}
            grids_by_site = dict(rec.items())
    stages = []
    for index, stage_config in enumerate(model.config.stages, start=1):
        prefix = f"stage{index}."
        encoder = [cams[i.name] for i in infos if i.name.startswith(prefix) and i.kind == "encoder_self"]
        selfs = [cams[i.name] for i in infos if i.name.startswith(prefix) and i.kind == "decoder_self"]
        crosses = [cams[i.name] for i in infos if i.name.startswith(prefix) and i.kind == "decoder_cross"]
        stages.append(StageCams(encoder, list(zip(selfs, crosses, strict=True)), stage_config.from_previous))
    result = propagate(stages)
    maps, image_maps, strides = _stage_outputs(model, grids_by_site, [r[query] for r in result.r_qi], height, width)
    return RelevanceResult(
        "relevance", query, class_id, score, maps, image_maps, strides, result.r_qq[query].detach().cpu()
    )


def attention_rollout(
    model: Detector, image: Tensor, query: int | None = None, target: int | None = None
) -> RelevanceResult:
    """Attention rollout (Abnar and Zuidema 2020) of one detection on each stage's grid.

    Per stage: the rollout of its encoder layers (``rownorm(0.5 mean_h A + 0.5 I)``, multiplied
    from the first layer on), read by the query's row of the stage's last cross-attention
    (mean over heads).

    Args:
        model / image / query / target: as :func:`relevance` (``target`` only picks the default
            query's class for the reported score: rollout does not depend on the class).
    """
    image = check_image(image)
    device = next(model.parameters()).device
    x = image.detach().to(device)
    height, width = int(x.shape[1]), int(x.shape[2])
    infos = sites(model)
    last_cross = {}
    for info in infos:
        if info.kind == "decoder_cross":
            last_cross[info.stage] = info.name
    chosen = [info.name for info in infos if info.kind == "encoder_self"] + list(last_cross.values())
    with eval_mode(model), torch.no_grad():
        query, class_id, score = explained_detection(model, x, query, target)
        with record(model, sites=chosen, tensors=("a",), dtype=torch.float32, device=device) as rec:
            model(x[None])
            grids_by_site = dict(rec.items())
    stage_maps = []
    for index in range(1, len(model.stages) + 1):
        encoder = [
            _flat(grids_by_site[i.name], grids_by_site[i.name].a).mean(0)  # type: ignore[arg-type]
            for i in infos
            if i.stage == index and i.kind == "encoder_self"
        ]  # per layer [HW, HW]
        cross_grids = grids_by_site[last_cross[index]]
        assert cross_grids.a is not None
        cross = _flat(cross_grids, cross_grids.a).mean(0)  # [Q, HW]
        stage_maps.append(cross[query] @ rollout(encoder) if encoder else cross[query])
    maps, image_maps, strides = _stage_outputs(model, grids_by_site, stage_maps, height, width)
    return RelevanceResult("rollout", query, class_id, score, maps, image_maps, strides)


def plot_relevance(image_rgb: Tensor, result: RelevanceResult) -> Figure:
    """One panel per stage: the stage's map, upsampled, over the image.

    Args:
        image_rgb: ``[3, H, W]`` RGB in [0, 1] (not normalised).
        result: from :func:`relevance` or :func:`attention_rollout`.
    """
    stages = list(result.image_maps)
    figure = Figure(figsize=(4.4 * len(stages), 3.8), layout="constrained")
    axes = figure.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages, strict=True):
        rows, cols = result.maps[stage].shape
        title = f"{result.method}: {stage} (stride {result.strides[stage]}, {rows}x{cols} cells)"
        overlay(ax, image_rgb, result.image_maps[stage], title)
    figure.suptitle(f"query {result.query}, class {result.class_id}, score {result.score:.3f}")
    return figure


__all__ = [
    "Propagation",
    "RelevanceResult",
    "StageCams",
    "attention_rollout",
    "cross_attention_rule",
    "head_relevance",
    "normalize_self_relevance",
    "plot_relevance",
    "propagate",
    "relevance",
    "rollout",
    "self_attention_rule",
]
