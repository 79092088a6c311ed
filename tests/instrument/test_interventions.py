"""Head gates and attention patching."""

from __future__ import annotations

import copy

import pytest
import torch

from sdetr import Detector, gate_heads, patch_attention, record


def test_gate_one_everywhere_changes_nothing(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    with torch.no_grad():
        plain = tiny(images, mask)
        with gate_heads(tiny, sites="*") as gates:
            gated = tiny(images, mask)
    assert len(gates) == len(tiny.attention_sites())
    torch.testing.assert_close(gated["pred_boxes"], plain["pred_boxes"], atol=1e-6, rtol=0)
    assert all(not m.probes for m in tiny.attention_sites().values())


@pytest.mark.parametrize(("site", "head"), [("stage1.encoder.1.self_attn", 2), ("stage2.decoder.0.cross_attn", 0)])
def test_gate_zero_equals_removing_the_heads_out_proj_slice(tiny: Detector, batch, site: str, head: int) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    heads = tiny.attention_sites()[site].num_heads
    gate = [1.0] * heads
    gate[head] = 0.0
    with torch.no_grad(), gate_heads(tiny, {site: gate}):
        gated = tiny(images, mask)
    by_hand = copy.deepcopy(tiny)
    module = by_hand.attention_sites()[site]
    d = module.head_dim
    with torch.no_grad():
        module.out_proj.weight[:, head * d : (head + 1) * d] = 0
        manual = by_hand(images, mask)
    torch.testing.assert_close(gated["pred_logits"], manual["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(gated["pred_boxes"], manual["pred_boxes"], atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(tiny(images, mask)["pred_logits"], gated["pred_logits"], atol=1e-4)


def test_gate_gradients_measure_head_importance(tiny: Detector) -> None:
    images = torch.randn(1, 3, 64, 64)
    with gate_heads(tiny, sites="stage1.encoder.*", requires_grad=True) as gates:
        loss = tiny(images)["pred_logits"].logsumexp(-1).sum()
        loss.backward()
    tiny.zero_grad()
    for name, gate in gates.items():
        assert gate.grad is not None and gate.grad.shape == (4,), name
        assert gate.grad.abs().sum() > 0


def test_gate_validation(tiny: Detector) -> None:
    wrong_size = gate_heads(tiny, {"stage2.encoder.0.self_attn": [1, 0]})
    with pytest.raises(ValueError, match="the site has 1 heads"), wrong_size:
        pass
    with pytest.raises(KeyError, match="unknown site"), gate_heads(tiny, {"stage9.encoder.0.self_attn": [1]}):
        pass


def test_patching_with_the_recorded_map_reproduces_the_output(tiny: Detector, batch) -> None:  # type: ignore[no-untyped-def]
    images, mask = batch
    site = "stage2.encoder.1.self_attn"
    with torch.no_grad():
        with record(tiny, sites=site, tensors=("a",), dtype=torch.float32) as rec:
            plain = tiny(images, mask)
        with patch_attention(tiny, {site: rec[site].a}):  # grid layout [B, h, H, W, H, W] accepted
            patched = tiny(images, mask)
        torch.testing.assert_close(patched["pred_boxes"], plain["pred_boxes"], atol=1e-6, rtol=0)

        uniform = torch.full_like(rec[site].a, 1.0 / 48)  # 6x8 cells
        with (
            patch_attention(tiny, {site: uniform}),
            record(tiny, sites=site, tensors=("a",), dtype=torch.float32) as seen,
        ):
            changed = tiny(images, mask)
    assert not torch.allclose(changed["pred_boxes"], plain["pred_boxes"], atol=1e-4)
    torch.testing.assert_close(seen[site].a, uniform)  # probes run in order: the recorder sees the patch


def test_callable_patch_and_shape_check(tiny: Detector) -> None:
    images = torch.randn(1, 3, 64, 64)
    site = "stage1.decoder.1.self_attn"  # (layer 0 attends over all-zero values: any map gives 0)
    with torch.no_grad(), patch_attention(tiny, {site: lambda a: a.roll(1, dims=-1)}):
        rolled = tiny(images)
    with torch.no_grad():
        assert not torch.allclose(rolled["pred_boxes"], tiny(images)["pred_boxes"])
    bad_patch = patch_attention(tiny, {site: torch.zeros(1, 4, 3)})
    with (
        pytest.raises(ValueError, match=r"patch for stage1\.decoder\.1\.self_attn has shape"),
        torch.no_grad(),
        bad_patch,
    ):
        tiny(images)
    assert all(not m.probes for m in tiny.attention_sites().values())


def test_gates_run_on_the_fused_path_and_recorders_on_the_explicit_one(
    tiny: Detector,
    batch,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sdetr.model.attention import Attention

    explicit_calls: list[str] = []
    original = Attention._explicit

    def counting(self: Attention, *args, **kwargs):  # type: ignore[no-untyped-def]
        explicit_calls.append(self.site)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "_explicit", counting)
    images, mask = batch
    site = "stage1.encoder.0.self_attn"
    gate = [1.0] * tiny.attention_sites()[site].num_heads
    gate[1] = 0.0
    with torch.no_grad(), gate_heads(tiny, {site: gate}, sites="*"):
        tiny(images, mask)
    assert explicit_calls == []  # every site gated, none materialised A
    with torch.no_grad(), gate_heads(tiny, {site: gate}), record(tiny, sites=site, tensors=("a",)):
        tiny(images, mask)
    assert explicit_calls == [site]  # only the recorded site
