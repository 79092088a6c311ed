"""Recording is exact, selective, bounded, streamable and leaves nothing behind."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sdetr import Detector, RecordingBudgetError, estimate_bytes, record
from sdetr.instrument.grids import feature_size


def _capture_io(model: Detector, name: str):  # type: ignore[no-untyped-def]
    """Hooks that keep one site's inputs and output; returns (store, remove)."""
    module = model.attention_sites()[name]
    store: dict[str, object] = {}
    h1 = module.register_forward_pre_hook(lambda m, args: store.__setitem__("args", args))
    h2 = module.register_forward_hook(lambda m, args, out: store.__setitem__("out", out))
    return store, lambda: (h1.remove(), h2.remove())


def _flat(t: Tensor, kind: str, name: str) -> Tensor:
    """Undo the grid layout: ``[B, h, H, W, d]`` -> ``[B, h, HW, d]``; maps -> ``[B, h, Lq, Lk]``."""
    b, h = t.shape[:2]
    if name == "a":
        if kind == "encoder_self":
            side = t.shape[2] * t.shape[3]
            return t.reshape(b, h, side, side)
        return t.reshape(b, h, t.shape[2], -1)
    return t.reshape(b, h, -1, t.shape[-1])


@pytest.mark.parametrize(
    "site",
    [
        "stage1.encoder.1.self_attn",
        "stage2.encoder.0.self_attn",
        "stage2.decoder.1.cross_attn",
        "stage1.decoder.0.self_attn",
    ],
)
def test_recorded_a_is_exact(tiny: Detector, batch, site: str) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    store, remove = _capture_io(tiny, site)
    try:
        with torch.no_grad(), record(tiny, sites=site, dtype=torch.float32) as rec:
            tiny(images, mask)
    finally:
        remove()
    g = rec[site]
    module = tiny.attention_sites()[site]
    q, k, v, a = (_flat(getattr(g, n), g.kind, n) for n in ("q", "k", "v", "a"))
    query, key, value, *rest = store["args"]  # type: ignore[misc]
    key_padding_mask = rest[0] if rest else None

    # 1. a is softmax(q k^T / sqrt(d) + mask) of the recorded q, k
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(a, logits.softmax(-1), atol=1e-6, rtol=0)

    # 2. a @ v through out_proj reproduces the layer's output
    heads_out = (a @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
    torch.testing.assert_close(module.out_proj(heads_out), store["out"], atol=1e-5, rtol=0)

    # 3. nn.MultiheadAttention on the same weights gives the same per-head maps
    reference = nn.MultiheadAttention(module.embed_dim, module.num_heads, batch_first=True).eval()
    reference.load_state_dict(module.state_dict())
    _, weights = reference(query, key, value, key_padding_mask=key_padding_mask, average_attn_weights=False)
    torch.testing.assert_close(a, weights, atol=1e-5, rtol=0)


def test_padded_keys_get_zero_attention(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad(), record(tiny, sites="*.encoder.*", tensors=("a",), dtype=torch.float32) as rec:
        tiny(images, mask)
    for name in rec:
        g = rec[name]
        rows, cols = g.geometry.valid_cells[1]
        a = g.a[1]  # [h, H, W, H, W]
        assert rows < a.shape[-2] and cols < a.shape[-1]  # the second image really has padded cells
        assert torch.all(a[..., rows:, :] == 0) and torch.all(a[..., :, cols:] == 0)
        torch.testing.assert_close(a.sum((-2, -1)), torch.ones(a.shape[:3]), atol=1e-5, rtol=0)


def test_recording_never_changes_outputs(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad():
        plain = tiny(images, mask)
        with record(tiny) as rec:
            recorded = tiny(images, mask)
    assert len(rec) == len(tiny.attention_sites())
    torch.testing.assert_close(recorded["pred_logits"], plain["pred_logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(recorded["pred_boxes"], plain["pred_boxes"], atol=1e-6, rtol=0)


def _no_instrumentation_left(model: Detector) -> bool:
    modules = [model.backbone, *model.stages]
    return all(not m.probes for m in model.attention_sites().values()) and all(
        not m._forward_pre_hooks for m in modules
    )


def test_hooks_are_removed_even_when_the_forward_raises(tiny: Detector) -> None:
    with pytest.raises(ValueError, match="channels"), record(tiny):
        assert not _no_instrumentation_left(tiny)
        tiny(torch.randn(1, 4, 64, 64))
    assert _no_instrumentation_left(tiny)
    with pytest.raises(RecordingBudgetError), record(tiny, budget_bytes=10):
        tiny(torch.randn(1, 3, 64, 64))
    assert _no_instrumentation_left(tiny)


def test_selection_is_a_slice_of_the_full_recording(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad():
        with record(tiny, dtype=torch.float32) as full:
            tiny(images, mask)
        with record(
            tiny,
            sites=["stage2.encoder.0.self_attn", "stage1.decoder.1.*"],
            tensors=("q", "a"),
            heads=[0, 2],
            query_pixels=[(5.0, 5.0), (40.0, 70.0)],
            decoder_queries=[3, 7],
            dtype=torch.float32,
        ) as part:
            tiny(images, mask)
    enc = part["stage2.encoder.0.self_attn"]  # single-head: only head 0 exists
    assert enc.heads == (0,) and enc.k is None and enc.v is None
    assert enc.queries == ((0, 0), (2, 4))  # stride 16
    assert enc.a.shape == (2, 1, 2, 6, 8)
    torch.testing.assert_close(enc.a[:, :, 1], full["stage2.encoder.0.self_attn"].a[:, :1, 2, 4])
    torch.testing.assert_close(enc.q, full["stage2.encoder.0.self_attn"].q)
    cross = part["stage1.decoder.1.cross_attn"]
    assert cross.a.shape == (2, 2, 2, 3, 4) and cross.q.shape == (2, 2, 2, 16)
    torch.testing.assert_close(cross.a, full["stage1.decoder.1.cross_attn"].a[:, [0, 2]][:, :, [3, 7]])
    self_attn = part["stage1.decoder.1.self_attn"]
    assert self_attn.a.shape == (2, 2, 2, 20)
    assert set(part) == {"stage2.encoder.0.self_attn", "stage1.decoder.1.self_attn", "stage1.decoder.1.cross_attn"}


def test_grid_shapes_and_default_storage(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad(), record(tiny) as rec:
        tiny(images, mask)
    enc = rec["stage1.encoder.0.self_attn"]  # C5 of 96x128: 3x4 grid, 4 heads of 16
    assert enc.q.shape == (2, 4, 3, 4, 16) and enc.a.shape == (2, 4, 3, 4, 3, 4)
    assert enc.q.dtype == torch.float16 and enc.a.device.type == "cpu"
    cross = rec["stage2.decoder.0.cross_attn"]  # C4: 6x8 grid
    assert cross.q.shape == (2, 4, 20, 16) and cross.k.shape == (2, 4, 6, 8, 16) and cross.a.shape == (2, 4, 20, 6, 8)
    dec = rec["stage2.decoder.0.self_attn"]
    assert dec.k.shape == (2, 4, 20, 16) and dec.a.shape == (2, 4, 20, 20)


def test_geometry_metadata(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad(), record(tiny, sites="stage2.encoder.0.self_attn", image_sizes=[(480, 640), (320, 480)]) as rec:
        tiny(images, mask)
    geo = rec["stage2.encoder.0.self_attn"].geometry
    assert geo.stride == 16 and geo.feature_size == (6, 8) and geo.input_size == (96, 128)
    assert geo.valid_sizes == ((96, 128), (64, 96)) and geo.valid_cells == ((6, 8), (4, 6))
    assert geo.cell_to_pixel(2, 3) == (40.0, 56.0)
    assert geo.pixel_to_cell(40.0, 56.0) == (2, 3)
    assert geo.cell_to_original(1, 2, 3) == (40.0 * 320 / 64, 56.0 * 480 / 96)
    with pytest.raises(ValueError, match="outside"):
        geo.pixel_to_cell(200.0, 0.0)


def test_estimate_matches_what_is_held(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad(), record(tiny, sites="stage1.*", heads=[1], decoder_queries=[0, 5, 9]) as rec:
        tiny(images, mask)
    held = {name: rec[name].nbytes() for name in rec}
    assert held == rec.estimated_bytes
    assert rec.estimated_bytes == estimate_bytes(
        tiny, (96, 128), batch=2, selection=rec.selection, sites=list(rec.estimated_bytes)
    )


def test_full_sdetr_estimate_by_hand() -> None:
    """Full SDETR at 800x1333: stage-2 encoder a = 1 head x (50*84)^2 cells^2 x 2 bytes per site."""
    from sdetr import build_model

    model = build_model("sdetr")
    assert feature_size(800, 1333, 16) == (50, 84) and feature_size(800, 1333, 32) == (25, 42)
    est = estimate_bytes(model, (800, 1333), sites="stage2.encoder.0.self_attn", selection=None)
    cells = 50 * 84
    assert est["stage2.encoder.0.self_attn"] == 2 * (cells * cells + 3 * cells * 256)


def test_budget_refusal_names_estimate_and_fitting_filters(tiny: Detector) -> None:
    with pytest.raises(RecordingBudgetError) as info, record(tiny, budget_bytes=60_000):
        tiny(torch.randn(1, 3, 128, 128))
    message = str(info.value)
    assert "would hold" in message and "over the budget of 58.6 KiB" in message
    assert "query_pixels with 16 points" in message and "stage 1 only (sites='stage1.*'): 55.2 KiB (fits)" in message


def test_heads_that_no_site_has_are_rejected(tiny: Detector) -> None:
    with pytest.raises(ValueError, match=r"stage2\.encoder\.0\.self_attn has 1 head"):
        record(tiny, sites="stage2.encoder.*", heads=[2])


def test_streaming_callback_reduces_without_storing(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    seen: list[str] = []
    entropy: dict[str, float] = {}

    def reduce(site: str, grids) -> None:  # type: ignore[no-untyped-def]
        seen.append(site)
        a = grids.a.float().flatten(-2) if grids.kind == "encoder_self" else grids.a.float()
        entropy[site] = float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())

    with torch.no_grad(), record(tiny, sites="*.encoder.*", callback=reduce, keep=False, budget_bytes=1) as rec:
        tiny(images, mask)
    assert seen == [name for name in tiny.attention_sites() if ".encoder." in name]  # forward order
    assert len(rec) == 0  # nothing kept, so no budget applies either
    assert all(0 < value <= math.log(8 * 6) + 1e-3 for value in entropy.values())


def test_keep_graph_gives_gradients_of_a(tiny: Detector) -> None:
    images = torch.randn(1, 3, 64, 64)
    with record(tiny, sites="stage2.encoder.1.self_attn", tensors=("a",), keep_graph=True) as rec:
        out = tiny(images)
        out["pred_logits"][0, :, 0].sum().backward()
    g = rec["stage2.encoder.1.self_attn"]
    assert g.a.requires_grad and g.a.dtype == torch.float32
    grad = g.a_grad()
    assert grad.shape == (1, 1, 4, 4, 4, 4) and grad.abs().sum() > 0
    tiny.zero_grad()


def test_a_recorder_refuses_re_entry_and_leaves_nothing_behind(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    """Issue 11: entering the same recorder twice leaked hooks; the next plain forward raised RecordingBudgetError."""
    images, mask = batch
    rec = record(tiny, sites="stage1.encoder.0.self_attn", budget_bytes=1)
    with rec:
        with pytest.raises(RuntimeError, match="already active"), rec:
            pass
        assert tiny.attention_sites()["stage1.encoder.0.self_attn"].probes == [rec]  # still recording once
    assert all(not site.probes for site in tiny.attention_sites().values())
    assert not tiny.backbone._forward_pre_hooks
    with torch.no_grad():
        tiny(images, mask)  # no budget error: nothing is attached any more
    with rec:  # a recorder may be used again after its block ended
        pass
    first, second = "stage1.encoder.0.self_attn", "stage2.encoder.0.self_attn"
    with (
        record(tiny, sites=first, tensors="a") as outer,
        record(tiny, sites=second, tensors="a") as inner,
        torch.no_grad(),
    ):
        tiny(images, mask)  # two recorders nest
    assert list(outer) == [first] and list(inner) == [second]


def test_decoder_queries_outside_the_model_are_refused_before_the_forward(tiny: Detector) -> None:
    """Issue 11: ``decoder_queries=[999]`` gave an IndexError in the middle of the forward."""
    with pytest.raises(
        ValueError, match=r"decoder_queries=\[3, 999, -1\]: \[999, -1\] are not queries .* 20 \(indices 0..19\)"
    ):
        record(tiny, sites="stage1.decoder.*", decoder_queries=[3, 999, -1])
