"""Q/K spectra: effective rank and top-k variance by hand; streamed moments equal one SVD of all vectors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from analysis.qkv_statistics import (
    QKV_COLUMNS,
    Moments,
    plot_effective_rank,
    qkv_statistics,
    site_vectors,
    spectrum_statistics,
)
from sdetr import Detector, GridGeometry, build_model, record


def _orthonormal(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q  # [d, d], orthonormal columns


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 8), extra=st.integers(0, 8), seed=st.integers(0, 1000))
def test_equal_variance_in_r_directions_has_effective_rank_r(rank: int, extra: int, seed: int) -> None:
    dim = rank + extra
    basis = _orthonormal(dim, seed)[:, :rank].T  # [r, d]
    offset = torch.linspace(-3, 5, dim, dtype=torch.float64)  # a mean far from 0: centring must remove it
    x = torch.cat([offset + 2.0 * basis, offset - 2.0 * basis])  # [2r, d]: +-2 along each direction
    moments = Moments.zeros(1, dim)
    moments.add(x[None])
    found = spectrum_statistics(moments.eigenvalues()[0])
    assert found["effective_rank"] == pytest.approx(rank, rel=1e-6)
    for k in (1, 4, 16):
        assert found[f"var_top{k}"] == pytest.approx(min(k, rank) / rank, rel=1e-6)


def test_rank_one_data() -> None:
    direction = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64) / 3
    t = torch.tensor([0.0, 1.0, 5.0, -2.0, 0.5], dtype=torch.float64)
    x = 7.0 + t[:, None] * direction  # [5, 3]
    moments = Moments.zeros(1, 3)
    moments.add(x[None])
    found = spectrum_statistics(moments.eigenvalues()[0])
    assert found["var_top1"] == pytest.approx(1.0, abs=1e-12)
    assert found["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    # the one singular value of the centred data: sqrt(sum (t - mean t)^2) (|direction| = 1)
    assert float(moments.eigenvalues()[0, 0]).__pow__(0.5) == pytest.approx(float((t - t.mean()).norm()), rel=1e-9)


def test_constant_vectors_have_no_spectrum() -> None:
    moments = Moments.zeros(2, 4)
    moments.add(torch.ones(2, 3, 4))
    found = spectrum_statistics(moments.eigenvalues()[1])
    assert math.isnan(found["effective_rank"]) and math.isnan(found["var_top1"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), chunks=st.lists(st.integers(1, 7), min_size=2, max_size=5))
def test_streamed_moments_equal_one_svd(seed: int, chunks: list[int]) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, sum(chunks), 5, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1])
    x = x + 4.0  # off-centre
    moments = Moments.zeros(2, 5)
    for part in torch.split(x, chunks, dim=1):
        moments.add(part)
    assert moments.count == sum(chunks)
    for head in range(2):
        singular = torch.linalg.svdvals(x[head] - x[head].mean(0))  # [min(n, d)]
        eigen = moments.eigenvalues()[head]
        np.testing.assert_allclose(eigen[: len(singular)].sqrt(), singular, rtol=1e-6, atol=1e-9)
        p = singular / singular.sum()
        expected = math.exp(float(-torch.special.xlogy(p, p).sum()))
        assert spectrum_statistics(eigen)["effective_rank"] == pytest.approx(expected, rel=1e-6)


def test_site_vectors_take_valid_cells_only() -> None:
    geo = GridGeometry(16, (2, 3), (32, 48), ((32, 48), (16, 32)), ((2, 3), (1, 2)), ((32, 48), (16, 32)))
    grid = torch.arange(2 * 1 * 2 * 3 * 1, dtype=torch.float32).reshape(2, 1, 2, 3, 1)  # [B, h, H, W, d]
    assert site_vectors(grid, "encoder_self", "q", geo, 1).flatten().tolist() == [6.0, 7.0]
    queries = torch.zeros(2, 1, 4, 1)  # [B, h, Q, d]
    assert site_vectors(queries, "decoder_cross", "q", geo, 0).shape == (1, 4, 1)
    assert site_vectors(grid, "decoder_cross", "k", geo, 0).shape == (1, 6, 1)
    with pytest.raises(ValueError, match=r"\[B, heads, H, W, d\]"):
        site_vectors(queries, "encoder_self", "k", geo, 0)


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


def test_on_a_model_equals_one_svd_of_the_recorded_vectors(tiny: Detector) -> None:
    g = torch.Generator().manual_seed(4)
    images = [torch.randn(3, h, w, generator=g) for h, w in ((64, 96), (32, 64), (48, 48))]
    sites = ["stage1.encoder.0.*", "stage2.encoder.1.*", "stage2.decoder.0.*"]
    found = qkv_statistics(tiny, images, sites=sites, batch_size=2, progress=False)
    assert list(found.columns) == QKV_COLUMNS
    # reference: record both batches in full, gather the valid vectors, one SVD per head
    vectors: dict[tuple[str, str], list[torch.Tensor]] = {}
    for batch in (images[:2], images[2:]):
        with torch.no_grad(), record(tiny, sites=sites, tensors=("q", "k"), dtype=torch.float32) as rec:
            tiny(batch)
        for site in rec:
            grids = rec[site]
            for name in ("q", "k"):
                tensor = getattr(grids, name)
                for b, (rows, cols) in enumerate(grids.geometry.valid_cells):
                    grid_like = grids.kind == "encoder_self" or (grids.kind == "decoder_cross" and name == "k")
                    part = tensor[b, :, :rows, :cols].flatten(1, 2) if grid_like else tensor[b]  # [h, n, d]
                    vectors.setdefault((site, name), []).append(part.double())
    assert len(found) == 2 * sum(v[0].shape[0] for (_, name), v in vectors.items() if name == "q")
    for row in found.itertuples():
        x = torch.cat(vectors[(row.site, row.tensor)], dim=1)[row.head]  # [n, d]
        assert row.n_vectors == x.shape[0]
        singular = torch.linalg.svdvals(x - x.mean(0))
        p = singular / singular.sum()
        assert row.effective_rank == pytest.approx(math.exp(float(-torch.special.xlogy(p, p).sum())), rel=1e-5)
        share = singular**2 / (singular**2).sum()
        assert row.var_top1 == pytest.approx(float(share[:1].sum()), rel=1e-5)
        assert row.var_top4 == pytest.approx(float(share[:4].sum()), rel=1e-5)
    counts = found.groupby(["site", "tensor"])["n_vectors"].first()
    cells16 = 4 * 6 + 2 * 4 + 3 * 3  # valid stride-16 cells of the three images
    assert counts[("stage2.encoder.1.self_attn", "q")] == cells16
    assert counts[("stage2.decoder.0.cross_attn", "q")] == 3 * tiny.config.num_queries
    assert counts[("stage2.decoder.0.cross_attn", "k")] == cells16
    assert (found["head_dim"] == 16).sum() + (found["head_dim"] == 64).sum() == len(found)


def test_effective_rank_figure() -> None:
    df = pd.DataFrame(
        [("s.a", 1, "encoder_self", 0, h, 2, 16, t, 3.0 + h, 0.5, 0.9, 1.0, 10) for t in ("q", "k") for h in range(2)]
        + [("s.b", 2, "encoder_self", 0, 0, 1, 64, "q", 20.0, 0.2, 0.5, 0.8, 10)],
        columns=QKV_COLUMNS,
    )
    figure = plot_effective_rank(df)
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    q_dots = figure.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(q_dots), [[0, 3.0], [0, 4.0], [1, 20.0]])
    assert len(np.asarray(figure.axes[1].collections[0].get_offsets())) == 2
