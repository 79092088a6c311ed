"""An independent re-statement of the original SDETR / DETR forward, for parity tests.

Written from ../shared/reference/README.md only: sequence-first ``nn.MultiheadAttention``
post-norm layers, the original state-dict names, IntermediateLayerGetter over a frozen-BN
ResNet-50. It imports nothing from ``sdetr``.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d


def sine_position(mask: Tensor, num_pos_feats: int = 128) -> Tensor:
    """README: running sums of the not-padded mask, normalised, 2*pi, interleaved sin/cos, y then x."""
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.tensor([10000 ** (2 * (i // 2) / num_pos_feats) for i in range(num_pos_feats)], device=mask.device)
    px = x[:, :, :, None] / dim_t
    py = y[:, :, :, None] / dim_t
    out_x = torch.empty_like(px)
    out_y = torch.empty_like(py)
    out_x[..., 0::2] = px[..., 0::2].sin()
    out_x[..., 1::2] = px[..., 1::2].cos()
    out_y[..., 0::2] = py[..., 0::2].sin()
    out_y[..., 1::2] = py[..., 1::2].cos()
    return torch.cat((out_y, out_x), dim=3).permute(0, 3, 1, 2)


class RefEncoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ffn: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:  # src [HW, B, d]
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, value=src, key_padding_mask=mask)[0]))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class RefDecoderLayer(nn.Module):
    def __init__(self, d: int, nhead: int, ffn: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, value=tgt)[0]))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, value=memory, key_padding_mask=mask)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class RefStack(nn.Module):
    def __init__(self, layer: nn.Module, n: int, norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n))
        self.norm = nn.LayerNorm(256) if norm else None


class RefTransformer(nn.Module):
    def __init__(self, enc_heads: int, dec_heads: int, enc_layers: int, dec_layers: int) -> None:
        super().__init__()
        self.encoder = RefStack(RefEncoderLayer(256, enc_heads), enc_layers, norm=False)
        self.decoder = RefStack(RefDecoderLayer(256, dec_heads), dec_layers, norm=True)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor, tgt: Tensor | None) -> Tensor:
        bs = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)
        query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, mask, pos)
        out = torch.zeros_like(query_pos) if tgt is None else tgt.transpose(0, 1)
        hs = []
        for layer in self.decoder.layers:
            out = layer(out, memory, mask, pos, query_pos)
            hs.append(self.decoder.norm(out))
        return torch.stack(hs).transpose(1, 2)  # [L, B, Q, d]


class RefBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer3": "c4", "layer4": "c5"})


class RefMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 4)])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[2](F.relu(self.layers[1](F.relu(self.layers[0](x)))))


def _level(body: RefBody, images: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    out = {}
    for name, feat in body.body(images).items():
        m = F.interpolate(mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
        out[name] = (feat, m, sine_position(m))
    return out


def _heads(class_embed: nn.Linear, bbox_embed: RefMLP, hs: Tensor) -> dict:
    logits, boxes = class_embed(hs), bbox_embed(hs).sigmoid()
    return {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1], strict=True)],
    }


class RefSDETR(nn.Module):
    def __init__(self, stage2_encoder_heads: int = 1) -> None:
        super().__init__()
        self.mytransformer1 = RefTransformer(8, 8, 3, 3)
        self.mytransformer2 = RefTransformer(stage2_encoder_heads, 8, 3, 3)
        self.class_embed = nn.Linear(256, 92)
        self.bbox_embed = RefMLP()
        self.query_embed1 = nn.Embedding(100, 256)
        self.query_embed2 = nn.Embedding(100, 256)
        self.input_proj1 = nn.Conv2d(2048, 256, 1)
        self.input_proj2 = nn.Conv2d(1024, 256, 1)
        self.backbone = nn.Sequential(RefBody())

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        levels = _level(self.backbone[0], images, mask)
        f5, m5, p5 = levels["c5"]
        f4, m4, p4 = levels["c4"]
        hs1 = self.mytransformer1(self.input_proj1(f5), m5, self.query_embed1.weight, p5, None)
        hs2 = self.mytransformer2(self.input_proj2(f4), m4, self.query_embed2.weight, p4, hs1[-1])
        return _heads(self.class_embed, self.bbox_embed, torch.cat([hs1, hs2]))


class RefDETR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = RefTransformer(8, 8, 6, 6)
        self.class_embed = nn.Linear(256, 92)
        self.bbox_embed = RefMLP()
        self.query_embed = nn.Embedding(100, 256)
        self.input_proj = nn.Conv2d(2048, 256, 1)
        self.backbone = nn.Sequential(RefBody())

    def forward(self, images: Tensor, mask: Tensor) -> dict:
        f5, m5, p5 = _level(self.backbone[0], images, mask)["c5"]
        hs = self.transformer(self.input_proj(f5), m5, self.query_embed.weight, p5, None)
        return _heads(self.class_embed, self.bbox_embed, hs)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and frozen-BN buffer distinct random values (not default inits)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 + 0.8)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif "backbone" in name and name.endswith("weight") and tensor.dim() == 1:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.4 + 0.8)
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            elif "query_embed" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            elif tensor.dim() > 1:
                # sqrt(2 / fan_in) keeps the signal alive through ReLUs; sharper attention maps
                gain = 3.0 if "in_proj" in name else math.sqrt(2.0)
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * gain / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


def freeze_like_original_(model: nn.Module) -> nn.Module:
    """The original training script's freezing: backbone parameters outside layer2-4 (the stem
    and layer1) get no gradient, so a timed train step does the original's backward."""
    for name, parameter in model.named_parameters():
        if name.startswith("backbone") and not any(f"layer{i}" in name for i in (2, 3, 4)):
            parameter.requires_grad_(False)
    return model


def original_checkpoint(model: nn.Module, **args: object) -> dict:
    """A dict shaped like the original training script's checkpoint files."""
    return {
        "model": model.state_dict(),
        "optimizer": {},
        "lr_scheduler": {},
        "epoch": 149,
        "args": argparse.Namespace(lr=1e-4, hidden_dim=256, **args),
    }
