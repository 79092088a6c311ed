"""The one attention module: fused == explicit == nn.MultiheadAttention on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sdetr.model.attention import Attention, attention_weights


class PassThrough:
    """A probe that changes nothing: forces the explicit path."""

    def __init__(self) -> None:
        self.maps: list[Tensor] = []

    def on_weights(self, site: Attention, q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
        self.maps.append(a)
        return a

    def on_heads(self, site: Attention, heads_out: Tensor) -> Tensor:
        return heads_out


def _inputs(seed: int = 0, batch: int = 2, lq: int = 5, lk: int = 7, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, lq, dim, generator=g)
    key = torch.randn(batch, lk, dim, generator=g)
    value = torch.randn(batch, lk, dim, generator=g)
    mask = torch.zeros(batch, lk, dtype=torch.bool)
    mask[1, -3:] = True  # the second item has three padded keys
    return query, key, value, mask


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_fused_and_explicit_paths_agree(heads: int) -> None:
    attn = Attention(16, heads).eval()
    query, key, value, mask = _inputs()
    fused = attn(query, key, value, mask)
    attn.probes.append(PassThrough())
    explicit = attn(query, key, value, mask)
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads", [1, 4])
def test_matches_torch_multihead_attention(heads: int) -> None:
    ours = Attention(16, heads).eval()
    theirs = nn.MultiheadAttention(16, heads, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())  # same parameter names, same packing
    query, key, value, mask = _inputs(seed=1)
    expected, weights = theirs(query, key, value, key_padding_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(ours(query, key, value, mask), expected, atol=1e-6, rtol=0)
    probe = PassThrough()
    ours.probes.append(probe)
    ours(query, key, value, mask)
    torch.testing.assert_close(probe.maps[0], weights, atol=1e-6, rtol=0)


def test_padded_keys_get_zero_weight_and_rows_sum_to_one() -> None:
    _, key, _, mask = _inputs()
    q = torch.randn(2, 3, 5, 4)
    k = key.view(2, 7, 4, 4).transpose(1, 2)[:, :3]
    a = attention_weights(q, k, mask)
    assert a.shape == (2, 3, 5, 7)
    assert torch.all(a[1, :, :, -3:] == 0)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 5))


def test_hand_computed_single_head() -> None:
    """Two keys, identity projections: the weights are a plain softmax of dot products / sqrt(d)."""
    attn = Attention(2, 1).eval()
    with torch.no_grad():
        attn.in_proj_weight.copy_(torch.eye(2).repeat(3, 1))
        attn.in_proj_bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(2))
        attn.out_proj.bias.zero_()
    query = torch.tensor([[[1.0, 0.0]]])
    key = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    value = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])
    w = torch.softmax(torch.tensor([1.0, 0.0]) / 2**0.5, 0)  # [0.6698, 0.3302]
    expected = torch.tensor([[[10 * w[0], 10 * w[1]]]])
    torch.testing.assert_close(attn(query, key, value), expected)


def test_bad_head_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        Attention(16, 3)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_mask_matches_torch_and_both_paths(heads: int) -> None:
    """The training-only ``attn_mask`` (True = blocked) with a key padding mask, against
    nn.MultiheadAttention's boolean masks; blocked pairs get zero weight on the explicit path."""
    ours = Attention(16, heads).eval()
    theirs = nn.MultiheadAttention(16, heads, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    query, key, value, mask = _inputs(seed=2)
    blocked = torch.zeros(5, 7, dtype=torch.bool)
    blocked[0, 2:] = True  # query 0 sees keys 0 and 1 only
    blocked[3, :2] = True
    expected, weights = theirs(query, key, value, key_padding_mask=mask, attn_mask=blocked, average_attn_weights=False)
    fused = ours(query, key, value, mask, attn_mask=blocked)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    probe = PassThrough()
    ours.probes.append(probe)
    torch.testing.assert_close(ours(query, key, value, mask, attn_mask=blocked), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(probe.maps[0], weights, atol=1e-6, rtol=0)
    assert torch.all(probe.maps[0][:, :, 0, 2:] == 0) and torch.all(probe.maps[0][:, :, 3, :2] == 0)
