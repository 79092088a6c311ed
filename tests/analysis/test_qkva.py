from __future__ import annotations

import pytest
import torch

from analysis import plot_qkva, principal_component
from sdetr import build_model, record


def test_principal_component_recovers_a_one_dimensional_layout() -> None:
    # every cell's vector is t * u for a fixed direction u: the component is t, centred (up to sign)
    t = torch.arange(12.0).reshape(3, 4)
    u = torch.tensor([3.0, 4.0]) / 5
    grid = t[..., None] * u
    pc = principal_component(grid)
    expected = t - t.mean()
    sign = torch.sign((pc * expected).sum())
    torch.testing.assert_close(pc * sign, expected, atol=1e-5, rtol=0)


def test_plot_qkva_draws_five_panels_and_rejects_other_sites() -> None:
    model = build_model("sdetr-tiny").eval()
    with torch.no_grad(), record(model, sites=["stage2.encoder.0.self_attn", "stage1.decoder.0.cross_attn"]) as rec:
        model(torch.randn(1, 3, 96, 128))
    figure = plot_qkva(rec["stage2.encoder.0.self_attn"], torch.rand(3, 96, 128), query_cell=(2, 3))
    assert len(figure.axes) == 5 + 4  # five panels and four colour bars
    assert figure.axes[4].get_title().startswith("A of query cell (2, 3)")
    with pytest.raises(ValueError, match="needs an encoder site"):
        plot_qkva(rec["stage1.decoder.0.cross_attn"])
