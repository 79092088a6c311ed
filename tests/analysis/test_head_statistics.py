"""Head statistics: hand-built maps with hand-computed answers, padding, streaming == full recording."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from analysis.batches import boxes_in_pixels
from analysis.head_statistics import (
    REDUNDANCY_COLUMNS,
    STAT_COLUMNS,
    cells_in_boxes,
    head_redundancy,
    head_statistics,
    plot_attention_distance,
    plot_head_entropy,
    plot_redundancy,
    reduce_attention,
    reduce_redundancy,
    redundancy_matrix,
)
from sdetr import (
    CocoDetection,
    CocoPaths,
    Detector,
    GridGeometry,
    SyntheticSpec,
    build_model,
    build_transforms,
    generate_synthetic_coco,
    record,
)
from sdetr.data import Scale


def geometry(valid: list[tuple[int, int]], size: tuple[int, int] | None = None, stride: int = 16) -> GridGeometry:
    """Encoder-style geometry: grid ``size`` (default: the largest valid block), one valid block per image."""
    size = size or (max(r for r, _ in valid), max(c for _, c in valid))
    return GridGeometry(
        stride=stride,
        feature_size=size,
        input_size=(size[0] * stride, size[1] * stride),
        valid_sizes=tuple((r * stride, c * stride) for r, c in valid),
        valid_cells=tuple(valid),
        image_sizes=tuple((r * stride, c * stride) for r, c in valid),
    )


def means(a: torch.Tensor, kind: str, geo: GridGeometry, boxes: list[torch.Tensor] | None = None) -> dict[str, Any]:
    sums = reduce_attention(a, kind, geo, boxes)
    return {**sums.means(kind), "rows": sums.rows}


def one_hot_map(rows: int, cols: int, target: Any) -> torch.Tensor:
    """``[1, 1, rows, cols, rows, cols]``: query cell (r, c) puts all weight on ``target(r, c)``."""
    a = torch.zeros(1, 1, rows, cols, rows, cols)
    for r in range(rows):
        for c in range(cols):
            a[0, 0, r, c, *target(r, c)] = 1.0
    return a


# ---------------------------------------------------------------------------------- hand-built maps
def test_uniform_map_over_valid_keys() -> None:
    a = torch.full((1, 2, 3, 4, 3, 4), 1 / 12)
    found = means(a, "encoder_self", geometry([(3, 4)]))
    np.testing.assert_allclose(found["entropy"], [math.log(12)] * 2, rtol=1e-6)
    np.testing.assert_allclose(found["norm_entropy"], [1.0, 1.0], rtol=1e-6)
    # 3x4 block, 3x3 neighbourhoods clipped: 4 corners x 4 + 6 edge cells x 6 + 2 inner x 9 = 70 of 144 pairs
    np.testing.assert_allclose(found["local_mass"], [70 / 144] * 2, rtol=1e-6)
    assert found["rows"] == 12


def test_one_hot_on_own_cell() -> None:
    found = means(one_hot_map(3, 4, lambda r, c: (r, c)), "encoder_self", geometry([(3, 4)]))
    np.testing.assert_allclose(found["entropy"], [0.0], atol=1e-7)
    np.testing.assert_allclose(found["norm_entropy"], [0.0], atol=1e-7)
    np.testing.assert_allclose(found["distance_px"], [0.0], atol=1e-6)
    np.testing.assert_allclose(found["local_mass"], [1.0], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 3), extra=st.integers(0, 2), rows=st.integers(1, 3), stride=st.sampled_from([8, 16, 32]))
def test_one_hot_k_cells_away_is_k_strides(k: int, extra: int, rows: int, stride: int) -> None:
    cols = 2 * k + extra  # every query cell has a key k cells to its right or to its left
    a = one_hot_map(rows, cols, lambda r, c: (r, c + k if c + k < cols else c - k))
    found = means(a, "encoder_self", geometry([(rows, cols)], stride=stride))
    np.testing.assert_allclose(found["distance_px"], [k * stride], rtol=1e-6)
    np.testing.assert_allclose(found["local_mass"], [1.0 if k == 1 else 0.0], atol=1e-7)
    np.testing.assert_allclose(found["entropy"], [0.0], atol=1e-7)


def test_one_hot_on_the_diagonal_neighbour() -> None:
    a = one_hot_map(4, 4, lambda r, c: ((r + 1) % 4 if r < 3 else 2, (c + 1) if c < 3 else 2))
    found = means(a, "encoder_self", geometry([(4, 4)], stride=32))
    # 9 of 16 cells step (+1, +1), 3 step (-1, +1), 3 (+1, -1), 1 (-1, -1): all sqrt(2) cells away
    np.testing.assert_allclose(found["distance_px"], [math.sqrt(2) * 32], rtol=1e-6)
    np.testing.assert_allclose(found["local_mass"], [1.0], rtol=1e-6)


def test_decoder_sites_have_no_distance_and_use_their_own_key_counts() -> None:
    geo = geometry([(2, 3)])
    cross = torch.full((1, 1, 5, 2, 3), 1 / 6)  # [B, heads, Q, H, W]
    found = means(cross, "decoder_cross", geo)
    np.testing.assert_allclose(found["entropy"], [math.log(6)], rtol=1e-6)
    np.testing.assert_allclose(found["norm_entropy"], [1.0], rtol=1e-6)
    assert np.isnan(found["distance_px"]).all() and np.isnan(found["local_mass"]).all() and found["rows"] == 5
    self_ = torch.zeros(1, 2, 4, 4)  # [B, heads, Q, Q]: head 0 uniform over 4 queries, head 1 one-hot
    self_[0, 0] = 0.25
    self_[0, 1, :, 0] = 1.0
    found = means(self_, "decoder_self", GridGeometry(None, None, (32, 48), ((32, 48),), ((2, 3),), ((32, 48),)))
    np.testing.assert_allclose(found["entropy"], [math.log(4), 0.0], atol=1e-6)
    np.testing.assert_allclose(found["norm_entropy"], [1.0, 0.0], atol=1e-6)
    assert found["rows"] == 4


def test_single_valid_key_has_zero_normalised_entropy() -> None:
    found = means(torch.ones(1, 1, 1, 1, 1, 1), "encoder_self", geometry([(1, 1)]))
    np.testing.assert_allclose(found["norm_entropy"], [0.0])
    np.testing.assert_allclose(found["entropy"], [0.0])


# ---------------------------------------------------------------------------------- padding
def test_padded_cells_count_neither_as_queries_nor_as_keys() -> None:
    """Both images uniform over ALL 12 cells of a 3x4 grid; the second is valid only on 2x3."""
    geo = geometry([(3, 4), (2, 3)], size=(3, 4))
    a = torch.full((2, 1, 3, 4, 3, 4), 1 / 12)
    found = means(a, "encoder_self", geo)
    assert found["rows"] == 12 + 6
    np.testing.assert_allclose(found["entropy"], [(12 * math.log(12) + 6 * math.log(6)) / 18], rtol=1e-6)
    np.testing.assert_allclose(found["norm_entropy"], [1.0], rtol=1e-6)
    # per row: neighbours / valid keys; 3x4 block: 70 / 12 summed over rows; 2x3 block: 28 / 6 summed
    np.testing.assert_allclose(found["local_mass"], [(70 / 12 + 28 / 6) / 18], rtol=1e-6)
    # mean distance: brute force over the cell pairs of each valid block
    total = 0.0
    for rows, cols in ((3, 4), (2, 3)):
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        total += sum(16 * math.hypot(r - s, c - t) for r, c in cells for s, t in cells) / len(cells)
    np.testing.assert_allclose(found["distance_px"], [total / 18], rtol=1e-6)
    assert abs(found["entropy"][0] - math.log(12)) > 0.2  # the all-cells answer would be log 12


def test_padded_decoder_cross_keys_are_dropped() -> None:
    geo = geometry([(3, 4), (2, 3)], size=(3, 4))
    a = torch.full((2, 1, 2, 3, 4), 1 / 12)  # [B, heads, Q=2, H, W], uniform over all cells
    found = means(a, "decoder_cross", geo)
    np.testing.assert_allclose(found["entropy"], [(2 * math.log(12) + 2 * math.log(6)) / 4], rtol=1e-6)
    np.testing.assert_allclose(found["norm_entropy"], [1.0], rtol=1e-6)
    assert found["rows"] == 4


# ---------------------------------------------------------------------------------- object mass
def test_object_mass_by_hand() -> None:
    geo = geometry([(3, 4)])  # cell centres at 8, 24, 40 (y) and 8, 24, 40, 56 (x)
    box_a = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # x0 y0 x1 y1: cells (0..1, 0..1), 4 cells
    box_b = torch.tensor([[0.0, 0.0, 16.0, 48.0]])  # column 0, all 3 rows
    assert cells_in_boxes(box_a, 3, 4, 16).sum() == 4 and cells_in_boxes(box_b, 3, 4, 16).sum() == 3
    own = one_hot_map(3, 4, lambda r, c: (r, c))
    np.testing.assert_allclose(means(own, "encoder_self", geo, [box_a])["object_mass"], [1.0], rtol=1e-6)
    uniform = torch.full((1, 1, 3, 4, 3, 4), 1 / 12)
    both = torch.cat([box_a, box_b])
    # 4 pairs with mass 4/12 (box a), 3 pairs with mass 3/12 (box b)
    found = means(uniform, "encoder_self", geo, [both])
    np.testing.assert_allclose(found["object_mass"], [(4 * 4 / 12 + 3 * 3 / 12) / 7], rtol=1e-6)
    # one cell to the right: inside box a only from column 0 to 1 (2 of its 4 cells); box b: never
    right = one_hot_map(3, 4, lambda r, c: (r, c + 1 if c < 3 else c - 1))
    np.testing.assert_allclose(means(right, "encoder_self", geo, [both])["object_mass"], [2 / 7], rtol=1e-6)
    empty = torch.tensor([[9.0, 9.0, 23.0, 23.0]])  # holds no cell centre
    assert np.isnan(means(uniform, "encoder_self", geo, [empty])["object_mass"]).all()


# ---------------------------------------------------------------------------------- redundancy
def test_js_between_heads_by_hand() -> None:
    geo = geometry([(1, 2)])
    a = torch.zeros(1, 4, 1, 2, 1, 2)  # 4 heads, 2 query cells, 2 key cells
    a[0, 0, 0, :, 0, 0] = 1.0  # head 0: one-hot on key 0
    a[0, 1, 0, :, 0, 0] = 1.0  # head 1: the same
    a[0, 2, 0, :, 0, 1] = 1.0  # head 2: one-hot on key 1
    a[0, 3] = 0.5  # head 3: uniform
    js, rows = reduce_redundancy(a, "encoder_self", geo)
    matrix = (js / rows).numpy()
    assert rows == 2
    # JS(one-hot, uniform) over 2 keys: H(3/4, 1/4) - log(2) / 2
    half = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) - math.log(2) / 2
    expected = np.array(
        [
            [0.0, 0.0, math.log(2), half],
            [0.0, 0.0, math.log(2), half],
            [math.log(2), math.log(2), 0.0, half],
            [half, half, half, 0.0],
        ]
    )
    np.testing.assert_allclose(matrix, expected, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), heads=st.integers(1, 4), keys=st.integers(1, 6))
def test_js_matches_the_kl_form(seed: int, heads: int, keys: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(1, heads, 3, 1, keys, generator=g).softmax(-1)  # decoder_cross: 3 queries over 1 x keys cells
    js, rows = reduce_redundancy(a, "decoder_cross", geometry([(1, keys)]))
    p = a[0].double().reshape(heads, 3, keys)
    for i in range(heads):
        for j in range(heads):
            m = (p[i] + p[j]) / 2
            kl = 0.5 * (p[i] * (p[i] / m).log()).sum(-1) + 0.5 * (p[j] * (p[j] / m).log()).sum(-1)
            assert abs(float(js[i, j]) / rows - float(kl.mean())) < 1e-5
            assert 0.0 <= float(js[i, j]) / rows <= math.log(2) + 1e-6


# ---------------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


def _images(sizes: list[tuple[int, int]], seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def reference_statistics(
    model: Detector,
    batches: list[list[torch.Tensor]],
    targets: list[dict[str, Any]] | None = None,
    sites: str = "*",
) -> pd.DataFrame:
    """Record each batch in full (keep=True, float32) and pool every valid row's values, in numpy."""
    values: dict[tuple[str, int], dict[str, list[float]]] = {}
    seen = 0
    for images in batches:
        with torch.no_grad(), record(model, sites=sites, tensors=("a",), dtype=torch.float32) as rec:
            model(images)
        for site in rec:
            g = rec[site]
            assert g.a is not None
            a = g.a.numpy().astype(np.float64)
            for b in range(a.shape[0]):
                rows, cols = g.geometry.valid_cells[b]
                n = rows * cols
                if g.kind == "encoder_self":
                    p = a[b, :, :rows, :cols, :rows, :cols].reshape(a.shape[1], n, n)
                elif g.kind == "decoder_cross":
                    p = a[b, :, :, :rows, :cols].reshape(a.shape[1], a.shape[2], n)
                else:
                    p = a[b]
                cells = np.array([(r, c) for r in range(rows) for c in range(cols)], dtype=np.float64)
                p = p / p.sum(-1, keepdims=True)  # [heads, Lq, Lk]
                entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)  # [heads, Lq]
                keys = p.shape[-1]
                columns: dict[str, Any] = {"e": entropy, "ne": entropy / math.log(keys) if keys > 1 else 0 * entropy}
                if g.kind == "encoder_self":
                    stride = g.geometry.stride
                    assert stride is not None
                    gaps = cells[:, None, :] - cells[None, :, :]  # [n, n, 2] in cells
                    columns["d"] = (p * stride * np.hypot(gaps[..., 0], gaps[..., 1])).sum(-1)
                    columns["l"] = (p * (np.abs(gaps).max(-1) <= 1)).sum(-1)
                    if targets is not None:
                        centres = (cells + 0.5) * stride  # (y, x)
                        mass: list[list[float]] = [[] for _ in range(p.shape[0])]
                        for x0, y0, x1, y1 in boxes_in_pixels(targets[seen + b]).tolist():
                            inside = (x0 <= centres[:, 1]) & (centres[:, 1] <= x1)
                            inside &= (y0 <= centres[:, 0]) & (centres[:, 0] <= y1)
                            for head in range(p.shape[0]):
                                mass[head].extend(p[head][inside][:, inside].sum(-1).tolist())
                        columns["o"] = mass
                for head in range(p.shape[0]):
                    entry = values.setdefault((site, head), {k: [] for k in ("e", "ne", "d", "l", "o")})
                    for key, column in columns.items():
                        entry[key].extend(list(column[head]))
        seen += len(images)
    records = []
    for (site, head), entry in values.items():
        records.append(
            {
                "site": site,
                "head": head,
                "entropy": np.mean(entry["e"]),
                "norm_entropy": np.mean(entry["ne"]),
                "distance_px": np.mean(entry["d"]) if entry["d"] else np.nan,
                "local_mass": np.mean(entry["l"]) if entry["l"] else np.nan,
                "object_mass": np.mean(entry["o"]) if entry["o"] else np.nan,
                "n_queries": len(entry["e"]),
            }
        )
    return pd.DataFrame(records)


def assert_matches_reference(found: pd.DataFrame, reference: pd.DataFrame, columns: list[str]) -> None:
    merged = found.merge(reference, on=["site", "head"], suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(found) == len(reference)
    for column in columns:
        np.testing.assert_allclose(
            merged[column].to_numpy(float), merged[f"{column}_ref"].to_numpy(float), rtol=1e-5, atol=1e-6,
            err_msg=column,
        )  # fmt: skip
    assert (merged["n_queries"] == merged["n_queries_ref"]).all()


NUMBERS = ["entropy", "norm_entropy", "distance_px", "local_mass"]


def test_streaming_equals_a_full_recording(tiny: Detector) -> None:
    """Four same-size images: one full recording vs streaming in batches of 1 and of 3 (3 + 1 images)."""
    images = _images([(64, 96)] * 4)
    reference = reference_statistics(tiny, [images])
    for batch_size in (1, 3):
        found = head_statistics(tiny, images, batch_size=batch_size, progress=False)
        assert list(found.columns) == STAT_COLUMNS
        assert_matches_reference(found, reference, NUMBERS)
    assert (found.loc[found["kind"] == "encoder_self", "n_queries"].to_numpy() > 0).all()
    stage2 = found[found["site"] == "stage2.encoder.0.self_attn"]
    assert stage2["n_queries"].tolist() == [4 * 4 * 6]  # 64x96 at stride 16: 4x6 cells, one head


def test_padded_batches_pool_per_valid_row(tiny: Detector) -> None:
    """Mixed sizes in batches of 3 (3 + 3 + 1): padding is excluded and rows are pooled, not batch means."""
    sizes = [(64, 96), (32, 48), (48, 96), (64, 64), (33, 80), (64, 96), (32, 32)]
    images = _images(sizes)
    found = head_statistics(tiny, images, batch_size=3, progress=False)
    reference = reference_statistics(tiny, [images[0:3], images[3:6], images[6:7]])
    assert_matches_reference(found, reference, NUMBERS)
    cells = sum(math.ceil(h / 16) * math.ceil(w / 16) for h, w in sizes)
    assert found.loc[found["site"] == "stage2.encoder.1.self_attn", "n_queries"].tolist() == [cells]
    decoder = found[found["kind"] == "decoder_cross"]
    assert (decoder["n_queries"] == 7 * tiny.config.num_queries).all()
    assert decoder["distance_px"].isna().all() and found.loc[found["kind"] == "decoder_self", "stride"].isna().all()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoDetection:
    cache = tmp_path_factory.mktemp("cache")
    spec = SyntheticSpec(height=64, width=96, num_train=2, num_val=2, min_side=12, seed=5)
    root = generate_synthetic_coco(spec, cache_dir=cache)
    native = Scale(train_sizes=(64,), max_size=96, crop_resize=(64,), crop_range=(64, 64), val_size=64)
    return CocoDetection(CocoPaths(root, "val"), build_transforms(native, False))  # kept at 64x96


def test_coco_dataset_gives_object_mass(tiny: Detector, dataset: CocoDetection) -> None:
    found = head_statistics(tiny, dataset, sites="stage*.encoder.*", batch_size=1, progress=False)
    assert list(found.columns) == [*STAT_COLUMNS, "object_mass"]
    assert set(found["kind"]) == {"encoder_self"}
    items = [dataset[i] for i in range(len(dataset))]
    images, targets = [x for x, _ in items], [t for _, t in items]
    reference = reference_statistics(tiny, [images[0:1], images[1:2]], targets, sites="stage*.encoder.*")
    assert_matches_reference(found, reference, [*NUMBERS, "object_mass"])
    assert found["object_mass"].notna().all()
    # the same images as a plain list with targets= give the same frame; without targets, no column
    listed = head_statistics(tiny, images, sites="stage*.encoder.*", batch_size=1, targets=targets, progress=False)
    pd.testing.assert_frame_equal(listed, found)
    plain = head_statistics(tiny, images, sites="stage*.encoder.*", batch_size=1, progress=False)
    assert "object_mass" not in plain.columns
    pd.testing.assert_frame_equal(plain, found[STAT_COLUMNS])


def test_redundancy_on_a_model(tiny: Detector) -> None:
    images = _images([(64, 96), (48, 64)])
    found = head_redundancy(tiny, images, sites=["stage1.encoder.0.*", "stage2.encoder.*"], progress=False)
    assert list(found.columns) == REDUNDANCY_COLUMNS
    single = found[found["site"] == "stage2.encoder.0.self_attn"]
    assert single[["head_i", "head_j", "js_divergence"]].values.tolist() == [[0, 0, 0.0]]
    matrix = redundancy_matrix(found, "stage1.encoder.0.self_attn")
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(matrix), 0.0)
    # reference: KL form over every valid query row of one full recording of the same batch
    with torch.no_grad(), record(tiny, sites="stage1.encoder.0.*", tensors=("a",), dtype=torch.float32) as rec:
        tiny(images)
    g = rec["stage1.encoder.0.self_attn"]
    assert g.a is not None
    pairs = np.zeros((4, 4))
    count = 0
    for b, (rows, cols) in enumerate(g.geometry.valid_cells):
        p = g.a[b, :, :rows, :cols, :rows, :cols].reshape(4, rows * cols, rows * cols).double()
        count += rows * cols
        for i in range(4):
            for j in range(4):
                m = (p[i] + p[j]) / 2
                pairs[i, j] += float(
                    (0.5 * torch.special.xlogy(p[i], p[i] / m) + 0.5 * torch.special.xlogy(p[j], p[j] / m)).sum()
                )
    np.testing.assert_allclose(matrix, pairs / count, rtol=1e-5, atol=1e-7)
    assert matrix[0, 1] > 0
    with pytest.raises(KeyError, match="not in the frame"):
        redundancy_matrix(found, "stage9.encoder.0.self_attn")


def test_tensor_input_and_limit(tiny: Detector) -> None:
    batch = torch.stack(_images([(32, 64)] * 3))
    found = head_statistics(tiny, batch, sites="stage2.encoder.0.*", limit=2, progress=False)
    assert found["n_queries"].tolist() == [2 * 2 * 4]


def test_bad_input_is_named(tiny: Detector) -> None:
    images = _images([(32, 32)] * 3)
    with pytest.raises(ValueError, match="targets has 2 entries"):
        head_statistics(tiny, images, targets=[{"boxes": torch.zeros(0, 4), "size": torch.tensor([32, 32])}] * 2)
    with pytest.raises(ValueError, match="'size'"):
        head_statistics(tiny, images, sites="stage1.encoder.0.*", targets=[{"boxes": torch.zeros(0, 4)}] * 3)
    with pytest.raises(ValueError, match="no images"):
        head_statistics(tiny, [], progress=False)
    with pytest.raises(KeyError, match="matches no attention site"):
        head_statistics(tiny, images, sites="stage7.*", progress=False)


# ---------------------------------------------------------------------------------- figures
def _stats_frame() -> pd.DataFrame:
    rows = []
    for stage, stride, heads in ((1, 32, 4), (2, 16, 1)):
        for layer in range(2):
            for head in range(heads):
                base = {"site": f"stage{stage}.encoder.{layer}.self_attn", "stage": stage, "layer": layer}
                rows.append(
                    {**base, "kind": "encoder_self", "head": head, "heads": heads, "stride": stride, "entropy": 1.0,
                     "norm_entropy": 0.5, "distance_px": 10.0 * (layer + head), "local_mass": 0.3, "n_queries": 10}
                )  # fmt: skip
            base = {"site": f"stage{stage}.decoder.{layer}.self_attn", "stage": stage, "layer": layer}
            rows.append(
                {**base, "kind": "decoder_self", "head": 0, "heads": 1, "stride": np.nan, "entropy": 2.0,
                 "norm_entropy": 0.9, "distance_px": np.nan, "local_mass": np.nan, "n_queries": 20}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=STAT_COLUMNS)


def test_figures() -> None:
    stats = _stats_frame()
    figure = plot_attention_distance(stats)
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    offsets = [np.asarray(ax.collections[0].get_offsets()) for ax in figure.axes]
    assert [len(o) for o in offsets] == [8, 2]
    np.testing.assert_allclose(offsets[1][:, 1], [0.0, 10.0])  # stage 2, one head: layers 0 and 1
    entropy = plot_head_entropy(stats)
    assert [ax.get_title() for ax in entropy.axes] == ["encoder_self", "decoder_self"]
    redundancy = pd.DataFrame(
        [("s.a", 1, "encoder_self", 0, i, j, 0.1 * (i != j)) for i in range(3) for j in range(3)]
        + [("s.b", 1, "encoder_self", 1, 0, 0, 0.0)],
        columns=REDUNDANCY_COLUMNS,
    )
    both = plot_redundancy(redundancy)
    images = [np.asarray(ax.images[0].get_array()) for ax in both.axes if ax.images]
    assert [im.shape for im in images] == [(3, 3), (1, 1)]
    np.testing.assert_allclose(images[0], 0.1 * (1 - np.eye(3)))
    assert len([ax for ax in plot_redundancy(redundancy, site="s.b").axes if ax.images]) == 1
    with pytest.raises(ValueError, match="no encoder_self rows"):
        plot_attention_distance(stats[stats["kind"] == "decoder_self"])
