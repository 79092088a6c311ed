"""Relevance propagation (Chefer et al. 2021) and attention rollout (``analysis.relevance``).

The rules are checked on hand-made tensors with answers worked out by hand; the wiring on
``sdetr-tiny`` with attention maps forced to one-hot permutations (``sdetr.patch_attention``),
where the expected relevance follows by hand from those permutations and the gradients.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from analysis.relevance import (
    RelevanceResult,
    StageCams,
    attention_rollout,
    cross_attention_rule,
    head_relevance,
    normalize_self_relevance,
    plot_relevance,
    propagate,
    relevance,
    rollout,
    self_attention_rule,
)
from sdetr import Detector, build_model, patch_attention, record, sites


def t(rows: list[list[float]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


@pytest.fixture
def image() -> Tensor:
    return torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------ rules by hand


def test_head_relevance_is_the_head_mean_of_the_positive_part_of_grad_times_map() -> None:
    a = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.0, 1.0]]])
    grad = torch.tensor([[[1.0, -2.0], [3.0, 1.0]], [[-1.0, 1.0], [2.0, -4.0]]])
    # head 0: [[0.5, -1], [3, 0]] -> [[0.5, 0], [3, 0]]; head 1: [[-0.2, 0.8], [0, -4]] -> [[0, 0.8], [0, 0]]
    torch.testing.assert_close(head_relevance(a, grad), torch.tensor([[0.25, 0.4], [1.5, 0.0]]))


def test_self_attention_rule_adds_cam_times_relevance() -> None:
    cam = t([[0.5, 0.5], [0.0, 1.0]])
    r_ss, (r_sx,) = self_attention_rule(torch.eye(2, dtype=torch.float64), cam, [t([[1, 0, 2], [0, 1, 0]])])
    torch.testing.assert_close(r_ss, t([[1.5, 0.5], [0.0, 2.0]]))
    torch.testing.assert_close(r_sx, t([[1.5, 0.5, 3.0], [0.0, 2.0, 0.0]]))


def test_normalisation_divides_the_residual_by_its_row_sums() -> None:
    r = t([[2.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0]])
    # R - I = [[1, 1, 1], [0, 0, 0], [0.5, 0, 2]], row sums 3, 0 (kept at the identity row), 2.5
    expected = t([[4 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.2, 0.0, 1.8]])
    torch.testing.assert_close(normalize_self_relevance(r), expected)


def test_cross_attention_rule_uses_the_transposed_query_relevance() -> None:
    r_qq = t([[1.5, 0.5], [0.0, 2.0]])  # R - I rows already sum to 1: unchanged by normalisation
    cam = t([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    # R̄_qq^T cam R̄_ii = [[1.5, 0], [0.5, 2]] @ cam @ I   (R̄_qq cam would give [[1.5, 0, 1], [0, 0, 4]])
    expected = t([[1.5, 0.0, 0.0], [0.5, 0.0, 4.0]])
    torch.testing.assert_close(cross_attention_rule(r_qq, torch.eye(3, dtype=torch.float64), cam), expected)


def two_stage_chain(from_previous: bool) -> list[StageCams]:
    """2 queries; 2 cells per stage; one encoder and one decoder layer per stage."""
    stage1 = StageCams(
        encoder=[t([[0, 1], [0, 0]])],
        decoder=[(t([[0, 0], [1, 0]]), t([[1, 0], [0, 1]]))],
    )
    stage2 = StageCams(
        encoder=[t([[0, 0], [0, 0]])],
        decoder=[(t([[0, 1], [0, 0]]), t([[0, 1], [1, 0]]))],
        from_previous=from_previous,
    )
    return [stage1, stage2]


def test_propagation_through_two_stages_by_hand() -> None:
    """Worked by hand.

    Stage 1: R_ii1 = I + E = [[1, 1], [0, 1]], R̄_ii1 the same. Decoder self: R_qq = [[1, 0], [1, 1]],
    R_qi1 stays 0; R̄_qq = [[1, 0], [1, 1]]; cross adds R̄_qq^T C R̄_ii1 = [[1, 1], [0, 1]] @ I @ R̄_ii1
    = [[1, 2], [0, 1]]. Stage 2 continues: self S = [[0, 1], [0, 0]]: R_qq = R_qq + S R_qq = [[2, 1], [1, 1]],
    R_qi1 = R_qi1 + S R_qi1 = [[1, 3], [0, 1]]; R̄_qq = [[1.5, 0.5], [1, 1]]; cross adds
    R̄_qq^T C2 I = [[1.5, 1], [0.5, 1]] @ [[0, 1], [1, 0]] = [[1, 1.5], [1, 0.5]].
    """
    result = propagate(two_stage_chain(from_previous=True))
    torch.testing.assert_close(result.r_qq, t([[2, 1], [1, 1]]))
    torch.testing.assert_close(result.r_qi[0], t([[1, 3], [0, 1]]))
    torch.testing.assert_close(result.r_qi[1], t([[1, 1.5], [1, 0.5]]))
    torch.testing.assert_close(result.r_ii[0], t([[1, 1], [0, 1]]))


def test_a_stage_that_starts_afresh_drops_the_earlier_query_relevance() -> None:
    """Stage 2 from zeros: R_qq = I + S = [[1, 1], [0, 1]], R̄_qq the same; cross adds
    [[1, 0], [1, 1]] @ [[0, 1], [1, 0]] = [[0, 1], [1, 1]]; stage 1's R_qi is zeroed."""
    result = propagate(two_stage_chain(from_previous=False))
    torch.testing.assert_close(result.r_qq, t([[1, 1], [0, 1]]))
    torch.testing.assert_close(result.r_qi[0], torch.zeros(2, 2, dtype=torch.float64))
    torch.testing.assert_close(result.r_qi[1], t([[0, 1], [1, 1]]))


def test_rollout_multiplies_later_layers_on_the_left() -> None:
    # Â1 = rownorm(0.5 [[1, 0], [1, 0]] + 0.5 I) = [[1, 0], [0.5, 0.5]]; Â2 = [[0.5, 0.5], [0, 1]]
    a1, a2 = t([[1, 0], [1, 0]]), t([[0, 1], [0, 1]])
    torch.testing.assert_close(rollout([a1, a2]), t([[0.75, 0.25], [0.5, 0.5]]))  # Â2 Â1 (Â1 Â2 differs)
    # rows are renormalised: 0.5 [[2, 0], [0, 0]] + 0.5 I = diag(1.5, 0.5) -> I
    torch.testing.assert_close(rollout([t([[2, 0], [0, 0]])]), torch.eye(2, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 6), seed=st.integers(0, 2**16), empty=st.lists(st.booleans(), min_size=6, max_size=6))
def test_normalised_residual_rows_sum_to_one_or_stay_identity(size: int, seed: int, empty: list[bool]) -> None:
    residual = torch.rand(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    residual[torch.tensor(empty[:size])] = 0
    normalised = normalize_self_relevance(torch.eye(size, dtype=torch.float64) + residual)
    sums = (normalised - torch.eye(size, dtype=torch.float64)).sum(-1)
    torch.testing.assert_close(sums, (~torch.tensor(empty[:size])).double())
    assert bool((normalised >= 0).all())


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 6), layers=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rollout_of_attention_maps_is_row_stochastic(size: int, layers: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    maps = [torch.rand(size, size, generator=g, dtype=torch.float64).softmax(-1) for _ in range(layers)]
    result = rollout(maps)
    torch.testing.assert_close(result.sum(-1), torch.ones(size, dtype=torch.float64))
    assert bool((result >= 0).all())


# ------------------------------------------------------------------ sdetr-tiny with one-hot maps


def one_hot_maps(model: Detector) -> dict[str, Tensor]:
    """Per site a one-hot map ``[1, heads, Lq, Lk]`` (same for every head), leaves with gradients.

    Encoder layer l: cell i -> cell (i + l + 1) mod N. Decoder self layer l: query i -> (i + l + 1)
    mod Q. Cross layer l: query i -> cell (3 i + l) mod N. Grids at 64x96: 2x3 (stride 32), 4x6 (16).
    """
    cells = {1: 6, 2: 24}
    queries = model.config.num_queries
    maps = {}
    for info in sites(model):
        layer = int(info.name.split(".")[2])
        lq = cells[info.stage] if info.kind == "encoder_self" else queries
        lk = queries if info.kind == "decoder_self" else cells[info.stage]
        rows = torch.arange(lq)
        targets = (3 * rows + layer) % lk if info.kind == "decoder_cross" else (rows + layer + 1) % lk
        one_hot = torch.zeros(lq, lk)
        one_hot[rows, targets] = 1
        maps[info.name] = one_hot.expand(1, info.heads, lq, lk).clone().requires_grad_(True)
    return maps


def test_relevance_on_one_hot_maps_matches_the_hand_propagation(tiny: Detector, image: Tensor) -> None:
    """Ā = mean_h max(∂y/∂A, 0) on the one-hot entries; then the rules layer by layer, by hand."""
    maps = one_hot_maps(tiny)
    query, class_id = 5, 2
    with patch_attention(tiny, maps):
        result = relevance(tiny, image, query=query, target=class_id)
        y = tiny(image[None])["pred_logits"].softmax(-1)[0, query, class_id]
        grads = dict(zip(maps, torch.autograd.grad(y, list(maps.values())), strict=True))
    cam = {
        name: (grads[name] * maps[name]).detach().clamp(min=0).mean(1)[0].double() for name in maps
    }  # [Lq, Lk]: the gradient on the one-hot entries, positive part, head mean

    def bar(r: Tensor) -> Tensor:  # eqs. 8-9, written out
        eye = torch.eye(len(r), dtype=r.dtype)
        off = r - eye
        sums = off.sum(1, keepdim=True)
        return torch.where(sums > 0, off / torch.where(sums > 0, sums, 1.0), 0.0) + eye

    eye_q = torch.eye(20, dtype=torch.float64)
    r_qq, r_qi = eye_q, []
    for stage, cells in ((1, 6), (2, 24)):
        r_ii = torch.eye(cells, dtype=torch.float64)
        for layer in range(2):
            e = cam[f"stage{stage}.encoder.{layer}.self_attn"]
            r_ii = r_ii + e @ r_ii
        r_qi.append(torch.zeros(20, cells, dtype=torch.float64))
        for layer in range(2):
            s = cam[f"stage{stage}.decoder.{layer}.self_attn"]
            r_qq, r_qi = r_qq + s @ r_qq, [r + s @ r for r in r_qi]
            c = cam[f"stage{stage}.decoder.{layer}.cross_attn"]
            r_qi[-1] = r_qi[-1] + bar(r_qq).T @ c @ bar(r_ii)
    assert float(r_qi[0][query].max()) > 0 and float(r_qi[1][query].max()) > 0  # a non-vacuous check
    torch.testing.assert_close(result.maps["stage1"].double(), r_qi[0][query].reshape(2, 3), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(result.maps["stage2"].double(), r_qi[1][query].reshape(4, 6), rtol=1e-4, atol=1e-9)
    assert result.query_relevance is not None
    torch.testing.assert_close(result.query_relevance.double(), r_qq[query], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(("size", "grid1", "grid2"), [((64, 96), (2, 3), (4, 6)), ((70, 100), (3, 4), (5, 7))])
def test_each_stage_map_is_on_its_own_stride_grid(
    tiny: Detector, size: tuple[int, int], grid1: tuple[int, int], grid2: tuple[int, int]
) -> None:
    """70 -> 35 -> 18 -> 9 -> 5 (stride 16) -> 3 (stride 32); 100 -> 50 -> 25 -> 13 -> 7 -> 4."""
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(5))
    for result in (relevance(tiny, image), attention_rollout(tiny, image)):
        assert result.strides == {"stage1": 32, "stage2": 16}
        assert tuple(result.maps["stage1"].shape) == grid1
        assert tuple(result.maps["stage2"].shape) == grid2
        for stage, grid in result.maps.items():
            upsampled = result.image_maps[stage]
            assert tuple(upsampled.shape) == size
            assert float(upsampled[0, 0]) == pytest.approx(float(grid[0, 0]), rel=1e-5)  # cell (0, 0) at the corner
            low, high = float(grid.min()) - 1e-9, float(grid.max()) + 1e-9
            assert low <= float(upsampled.min()) <= float(upsampled.max()) <= high  # a convex interpolation


def test_rollout_of_permutation_encoders_by_hand(tiny: Detector, image: Tensor) -> None:
    """Encoder maps shift cells by 1 then 2: (0.5 P2 + 0.5 I)(0.5 P1 + 0.5 I) = (I + P1 + P2 + P3) / 4.

    With identity maps instead the encoder rollout is the identity, and the map is the query's
    last cross-attention row itself.
    """
    query = 7
    maps = {name: m.detach() for name, m in one_hot_maps(tiny).items() if ".encoder." in name}
    last_cross = ["stage1.decoder.1.cross_attn", "stage2.decoder.1.cross_attn"]
    with patch_attention(tiny, maps):
        result = attention_rollout(tiny, image, query=query)
        with torch.no_grad(), record(tiny, sites=last_cross, tensors=("a",), dtype=torch.float32) as rec:
            tiny(image[None])
    for stage, (rows, cols) in ((1, (2, 3)), (2, (4, 6))):
        cells = rows * cols
        cross = rec[last_cross[stage - 1]].a
        assert cross is not None
        row = cross[0].mean(0).reshape(-1, cells)[query]  # [HW]
        expected = sum(row.roll(k) for k in range(4)) / 4  # (row @ P_k)[j] = row[j - k]
        torch.testing.assert_close(result.maps[f"stage{stage}"].flatten(), expected, rtol=1e-5, atol=1e-7)
    identity = {
        name: torch.eye(m.shape[-1]).expand_as(m).clone() for name, m in maps.items()
    }  # one-hot on self: the encoder rollout is the identity
    with patch_attention(tiny, identity):
        plain = attention_rollout(tiny, image, query=query)
        with torch.no_grad(), record(tiny, sites=last_cross, tensors=("a",), dtype=torch.float32) as rec:
            tiny(image[None])
    for stage in (1, 2):
        cross = rec[last_cross[stage - 1]].a
        assert cross is not None
        row = cross[0].mean(0)[query]  # [H, W]
        torch.testing.assert_close(plain.maps[f"stage{stage}"], row, rtol=1e-5, atol=1e-7)


def test_result_table_and_plot(tiny: Detector, image: Tensor) -> None:
    tiny.train()
    try:
        result = relevance(tiny, image)
        assert tiny.training  # the mode is restored
    finally:
        tiny.eval()
    assert all(p.grad is None for p in tiny.parameters())  # only the maps received gradients
    frame = result.to_frame()
    assert len(frame) == 6 + 24
    stage2 = frame[frame.stage == "stage2"].set_index(["row", "col"])
    assert stage2.loc[(3, 5), "value"] == pytest.approx(float(result.maps["stage2"][3, 5]))
    assert (stage2.loc[(3, 5), "y"], stage2.loc[(3, 5), "x"]) == (56.0, 88.0)
    rgb = torch.rand(3, 64, 96)
    figure = plot_relevance(rgb, result)
    overlays = [ax for ax in figure.axes if ax.images]
    assert len(overlays) == 2
    drawn = torch.as_tensor(overlays[1].images[-1].get_array())
    assert torch.equal(drawn, result.image_maps["stage2"].float())
    assert isinstance(result, RelevanceResult) and result.method == "relevance"
