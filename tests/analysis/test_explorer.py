from __future__ import annotations

import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.explorer import (
    QKVAExplorer,
    attention_at,
    plot_attention_at,
    record_cell,
    unnormalize_image,
)
from sdetr import PRESETS, Detector, GridGeometry, SiteGrids, build_model, normalize_image, record, sites

ENC2 = "stage2.encoder.1.self_attn"
CROSS1 = "stage1.decoder.1.cross_attn"
SELF2 = "stage2.decoder.0.self_attn"


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    """``[3, 64, 96]`` RGB in [0, 1]: stride 16 gives a 4x6 grid, stride 32 a 2x3 grid."""
    return torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(3))


def panel(figure: Figure, title_start: str) -> Axes:
    matches = [ax for ax in figure.axes if ax.get_title().startswith(title_start)]
    assert len(matches) == 1, [ax.get_title() for ax in figure.axes]
    return matches[0]


def test_unnormalize_inverts_normalize_and_maps_zero_to_the_imagenet_mean(rgb: torch.Tensor) -> None:
    assert torch.allclose(unnormalize_image(normalize_image(rgb)), rgb, atol=1e-6)
    mean = unnormalize_image(torch.zeros(2, 3, 1, 1))[:, :, 0, 0]  # batched input works too
    assert torch.allclose(mean, torch.tensor([[0.485, 0.456, 0.406]] * 2), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        unnormalize_image(torch.zeros(4, 5, 5))


def test_record_cell_encoder_keeps_one_cell_of_one_head(tiny: Detector, rgb: torch.Tensor) -> None:
    image = normalize_image(rgb)
    cell = record_cell(tiny, image, ENC2, head=0, pixel=(40.0, 70.0))
    assert cell.query == (2, 4)  # 40 // 16, 70 // 16
    assert cell.grids.a is not None and cell.grids.q is not None
    assert tuple(cell.grids.a.shape) == (1, 1, 1, 4, 6)
    assert tuple(cell.grids.q.shape) == (1, 1, 4, 6, 64)
    # float32, 1 head of width 64 on 4x6 cells: q, k, v 3 x 24 x 64 x 4 B; a 1 x 24 x 4 B
    assert cell.held_bytes == cell.estimated_bytes == 3 * 24 * 64 * 4 + 24 * 4 == 18528
    assert cell.site_bytes == 3 * 24 * 64 * 4 + 24 * 24 * 4 == 20736  # every query cell
    with torch.no_grad(), record(tiny, sites=ENC2, dtype=torch.float32) as rec:
        tiny([image])
    full = rec[ENC2].a
    assert full is not None
    assert torch.allclose(cell.grids.a[0, 0, 0], full[0, 0, 2, 4], atol=1e-6)
    assert torch.allclose(attention_at(cell.grids), full[0, 0, 2, 4], atol=1e-6)
    assert "18.1 KiB" in cell.memory_note() and "20.2 KiB" in cell.memory_note()


def test_record_cell_decoder_sites_keep_one_query(tiny: Detector, rgb: torch.Tensor) -> None:
    image = normalize_image(rgb)
    cross = record_cell(tiny, image, CROSS1, head=2, decoder_query=5)
    self_attn = record_cell(tiny, image, SELF2, head=3, decoder_query=7)
    with torch.no_grad(), record(tiny, sites=[CROSS1, SELF2], dtype=torch.float32) as rec:
        tiny([image])
    cross_full, self_full = rec[CROSS1].a, rec[SELF2].a
    assert cross_full is not None and self_full is not None
    assert cross.query == 5 and self_attn.query == 7
    assert torch.allclose(attention_at(cross.grids), cross_full[0, 2, 5], atol=1e-6)  # [2, 3] at stride 32
    assert torch.allclose(attention_at(self_attn.grids), self_full[0, 3, 7], atol=1e-6)  # [20] queries
    # cross, 1 head of width 16: q 16 x 4 B; k, v 6 cells x 16 x 4 B; a 6 x 4 B
    assert cross.held_bytes == cross.estimated_bytes == 64 + 2 * 384 + 24 == 856
    # the whole site: 4 heads x (20 queries x 16 + 2 x 6 x 16 + 20 x 6) x 4 B
    assert cross.site_bytes == 4 * (20 * 16 + 2 * 6 * 16 + 20 * 6) * 4 == 10112
    # self, 1 head: q 16 x 4 B; k, v 20 queries x 16 x 4 B; a 20 x 4 B
    assert self_attn.held_bytes == 64 + 2 * 1280 + 80 == 2704


def test_record_cell_rejects_bad_arguments_by_name(tiny: Detector, rgb: torch.Tensor) -> None:
    image = normalize_image(rgb)
    with pytest.raises(KeyError, match=r"site='stage3.encoder.0.self_attn'.*stage1\.encoder\.0\.self_attn"):
        record_cell(tiny, image, "stage3.encoder.0.self_attn")
    with pytest.raises(ValueError, match=r"head=1: site stage2.encoder.1.self_attn has 1 head"):
        record_cell(tiny, image, ENC2, head=1)
    with pytest.raises(ValueError, match=r"pixel=\(70.0, 10.0\) lies outside the 64x96 image"):
        record_cell(tiny, image, ENC2, pixel=(70.0, 10.0))
    with pytest.raises(ValueError, match=r"decoder_query=20: the model has 20 queries"):
        record_cell(tiny, image, CROSS1, decoder_query=20)
    with pytest.raises(ValueError, match=r"one \[3, H, W\]"):
        record_cell(tiny, image[None], ENC2)


def test_attention_at_reads_the_full_layout_and_the_valid_region() -> None:
    a = torch.arange(2 * 1 * 2 * 3 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3, 2, 3)  # [B, h, H, W, H, W]
    geometry = GridGeometry(16, (2, 3), (32, 48), ((32, 48), (32, 32)), ((2, 3), (2, 2)), ((32, 48), (32, 32)))
    grids = SiteGrids("stage2.encoder.0.self_attn", "encoder_self", (0,), geometry, a=a)
    assert torch.equal(attention_at(grids, index=0, query=(1, 2)), a[0, 0, 1, 2])
    assert torch.equal(attention_at(grids, index=1, query=(0, 1)), a[1, 0, 0, 1, :, :2])  # 2x2 valid cells
    assert torch.equal(attention_at(grids, index=0), a[0, 0, 1, 1])  # default: the centre cell (2 // 2, 3 // 2)
    picked = SiteGrids(grids.site, grids.kind, (0,), geometry, queries=((1, 0), (0, 2)), a=a[:, :, 0])  # [B,h,P,H,W]
    assert torch.equal(attention_at(picked, query=(0, 2)), a[0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"query=\(1, 1\) was not recorded"):
        attention_at(picked, query=(1, 1))
    with pytest.raises(ValueError, match="no attention map recorded"):
        attention_at(SiteGrids(grids.site, grids.kind, (0,), geometry))


def test_plot_attention_at_draws_the_recorded_map(tiny: Detector, rgb: torch.Tensor) -> None:
    cell = record_cell(tiny, normalize_image(rgb), ENC2, pixel=(40.0, 70.0))
    figure = plot_attention_at(cell.grids, rgb)
    titles = [ax.get_title().split(":")[0].split("\n")[0] for ax in figure.axes if ax.get_title()]
    assert titles == ["image", "Q", "K", "V", "A of query cell (2, 4)"]
    a_panel = panel(figure, "A of")
    drawn = a_panel.images[-1].get_array()
    assert torch.allclose(torch.as_tensor(drawn.data), attention_at(cell.grids), atol=1e-6)
    assert a_panel.images[-1].get_extent() == [0, 96, 64, 0]  # 6 x 4 cells of 16 px over the 96x64 image
    marker = a_panel.lines[0].get_xydata()[0]
    assert marker.tolist() == [72.0, 40.0]  # centre of cell (2, 4): x = 4.5 * 16, y = 2.5 * 16

    cross = record_cell(tiny, normalize_image(rgb), CROSS1, decoder_query=4)
    figure = plot_attention_at(cross.grids, rgb, box=(10, 5, 50, 30))
    box = panel(figure, "A of query 4").lines[0].get_xydata()
    assert box.tolist() == [[10, 5], [50, 5], [50, 30], [10, 30], [10, 5]]

    self_attn = record_cell(tiny, normalize_image(rgb), SELF2, decoder_query=7, tensors=("a",))
    figure = plot_attention_at(self_attn.grids)
    assert [ax.get_title() for ax in figure.axes] == ["A of query 7"]  # q, k, v not recorded: left out
    bars = figure.axes[0].patches
    heights = torch.tensor([bar.get_height() for bar in bars], dtype=torch.float32)  # type: ignore[attr-defined]
    assert torch.allclose(heights, attention_at(self_attn.grids), atol=1e-6)
    assert bars[7].get_facecolor() != bars[6].get_facecolor()  # the query itself stands out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_site_kind_of_every_preset(preset: str, rgb: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_model(preset).eval()
    image = normalize_image(rgb)
    last_of_kind = {info.kind: info for info in sites(model)}
    assert set(last_of_kind) == {"encoder_self", "decoder_self", "decoder_cross"}
    for info in last_of_kind.values():
        cell = record_cell(model, image, info.name, head=info.heads - 1, pixel=(63.0, 95.0), decoder_query=1)
        a = attention_at(cell.grids)
        if info.kind == "decoder_self":
            assert a.shape == (model.config.num_queries,)
        else:
            grid = (64 // info.stride, 96 // info.stride)  # type: ignore[operator]
            assert a.shape == grid
        assert torch.isclose(a.sum(), torch.tensor(1.0), atol=1e-5)  # softmax over every key of one image
        assert cell.held_bytes == cell.estimated_bytes < cell.site_bytes
        figure = plot_attention_at(cell.grids, rgb if info.kind != "decoder_self" else None)
        assert panel(figure, "A of").get_title()


def test_explorer_widget_redraws_and_reports_memory(tiny: Detector, rgb: torch.Tensor) -> None:
    pytest.importorskip("ipywidgets")
    second = torch.rand(3, 80, 64, generator=torch.Generator().manual_seed(4))
    explorer = QKVAExplorer(tiny, [normalize_image(rgb), normalize_image(second)], dpi=30)
    view = explorer.widget()
    controls = explorer._widgets
    assert controls["site"].value == ENC2  # the last encoder site
    assert controls["y"].max == 63 and controls["x"].max == 95
    before = controls["picture"].value
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    controls["x"].value = 10
    assert controls["picture"].value != before
    assert explorer.last is not None and explorer.last.query == (2, 0)
    assert "query cell (2, 0)" in controls["note"].value and "holds 18.1 KiB" in controls["note"].value
    controls["site"].value = "stage1.encoder.0.self_attn"
    assert controls["head"].max == 3
    controls["head"].value = 3
    assert explorer.last.grids.heads == (3,)
    controls["site"].value = ENC2  # one head: the head slider is clamped, no error
    assert controls["head"].value == 0 and explorer.last.grids.heads == (0,)
    controls["site"].value = CROSS1
    assert controls["y"].disabled and controls["x"].disabled and not controls["query"].disabled
    assert explorer.last.query == explorer.best_query(0)
    controls["image"].value = 1
    assert controls["y"].max == 79 and controls["x"].max == 63
    assert explorer.last.grids.geometry.valid_sizes == ((80, 64),)
    assert len(view.children) == 4


def test_explorer_figure_draws_the_decoder_querys_predicted_box(tiny: Detector, rgb: torch.Tensor) -> None:
    explorer = QKVAExplorer(tiny, [normalize_image(rgb)])
    best = explorer.best_query(0)
    assert explorer.detections[0]["scores"][best] == explorer.detections[0]["scores"].max()
    figure = explorer.figure(CROSS1)
    box = explorer.detections[0]["boxes"][best].tolist()
    corners = panel(figure, f"A of query {best}").lines[0].get_xydata()
    assert torch.allclose(torch.as_tensor(corners[0]).float(), torch.tensor(box[:2]), atol=1e-4)
    assert torch.allclose(torch.as_tensor(corners[2]).float(), torch.tensor(box[2:]), atol=1e-4)
    with pytest.raises(ValueError, match="images is empty"):
        QKVAExplorer(tiny, [])
