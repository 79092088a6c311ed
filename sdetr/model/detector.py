"""The detector: backbone -> one or more transformer stages -> shared class and box heads.

``detr`` has one stage on C5; ``sdetr`` has stage 1 on C5 and stage 2 on C4, whose decoder
starts from stage 1's last decoder output. Every decoder layer's output goes through the
shared heads; the last is the prediction and the others are ``aux_outputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from sdetr.config import ModelConfig, StageConfig
from sdetr.model.attention import Attention
from sdetr.model.backbone import Backbone, BackboneSpeed
from sdetr.model.denoising import DenoisingBatch
from sdetr.model.images import ImageBatch
from sdetr.model.position import build_position_embedding
from sdetr.model.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer

Prediction = dict[str, Tensor]


class MLP(nn.Module):
    """Linear layers with ReLU between them (``layers.{i}`` as the original ``bbox_embed``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class Stage(nn.Module):
    """Input projection, position embedding, encoder, decoder and the stage's object queries."""

    def __init__(self, config: ModelConfig, stage: StageConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.feature = stage.feature
        self.from_previous = stage.from_previous
        self.stride = config.feature_stride(stage.feature)
        self.input_proj = nn.Conv2d(config.feature_channels(stage.feature), dim, kernel_size=1)
        self.query_embed = nn.Embedding(config.num_queries, dim)
        self.position = build_position_embedding(config.position, dim)
        self.encoder = Encoder(
            [
                EncoderLayer(dim, heads, config.ffn_dim, config.dropout, config.norm_first)
                for heads in stage.encoder_heads_per_layer()
            ],
            dim,
            config.norm_first,
        )
        self.decoder = Decoder(
            [
                DecoderLayer(dim, heads, config.ffn_dim, config.dropout, config.norm_first)
                for heads in stage.decoder_heads_per_layer()
            ],
            dim,
        )
        for module in (self.encoder, self.decoder):
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)

    def forward(
        self, features: Tensor, mask: Tensor, tgt: Tensor | None, denoising: DenoisingBatch | None = None
    ) -> tuple[Tensor, Tensor]:
        """Args:
            features: ``[B, C, H, W]`` backbone level; mask: ``[B, H, W]`` True = padded.
            tgt: ``[B, Q, E]`` decoder start (previous stage's output), or None for zeros
                (``[B, Q + D, E]`` with denoising queries).
            denoising: training-only queries (denoising queries, and extra query groups before them),
                appended after the ``Q`` matching ones.
        Returns:
            the normed output of every decoder layer, ``[L, B, Q, E]`` (``[L, B, Q + D, E]`` with
            denoising queries), and the encoder's output (the memory), ``[B, HW, E]``.
        """
        pos = self.position(mask).to(features.dtype).flatten(2).transpose(1, 2)  # [B, HW, E]
        x = self.input_proj(features).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, E]
        flat_mask = mask.flatten(1)  # [B, HW]
        memory = self.encoder(x, pos, flat_mask)  # [B, HW, E]
        query_pos = self.query_embed.weight[None].expand(x.shape[0], -1, -1)  # [B, Q, E]
        if tgt is None:
            tgt = torch.zeros_like(query_pos)
            if denoising is not None:
                tgt = torch.cat((tgt, denoising.content.to(tgt.dtype)), dim=1)  # [B, Q + D, E]
        self_attn_mask = None
        if denoising is not None:
            query_pos = torch.cat((query_pos, denoising.position.to(query_pos.dtype)), dim=1)  # [B, Q + D, E]
            self_attn_mask = denoising.self_attn_mask
        return self.decoder(tgt, query_pos, memory, pos, flat_mask, self_attn_mask), memory


class Detector(nn.Module):
    """A DETR-family detector built from a :class:`~sdetr.config.ModelConfig`.

    Stages are attributes ``stage1``, ``stage2``, ...; attention layers carry stable site names
    (``stage2.encoder.0.self_attn``, ``stage1.decoder.2.cross_attn``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_path: str | None = None  # set by load_model: the file the weights came from
        levels = tuple(dict.fromkeys(stage.feature for stage in config.stages))
        self.backbone = Backbone(config, levels)
        self.num_stages = len(config.stages)
        for index, stage in enumerate(config.stages, start=1):
            self.add_module(f"stage{index}", Stage(config, stage))
        self.class_embed = nn.Linear(config.hidden_dim, config.num_classes + 1)
        self.bbox_embed = MLP(config.hidden_dim, config.hidden_dim, 4, 3)
        for name, module in self.attention_sites().items():
            module.site = name

    @property
    def stages(self) -> list[Stage]:
        return [getattr(self, f"stage{index}") for index in range(1, self.num_stages + 1)]

    def set_speed(self, speed: str | BackboneSpeed) -> Detector:
        """How the backbone computes: ``"default"`` (torchvision's result, bit for bit, in
        inference, its batch norms computed in place; frozen batch norms folded and channels-last
        convolutions in training steps), ``"fast"`` (folded and channels-last everywhere) or
        ``"exact"`` (torchvision's modules and forward everywhere); see
        :mod:`sdetr.model.backbone`. Outputs move only by float32 rounding. Returns the model."""
        self.backbone.set_speed(speed)
        return self

    def compile_parts(self, **options: object) -> Detector:
        """``torch.compile`` the backbone and every stage in place (opt-in; ``options`` go to
        ``torch.compile``, e.g. ``dynamic=True`` for varying image sizes).

        The input checks and the heads stay eager, so the compiled graphs have no breaks (tested
        with ``fullgraph=True``). Recording and head gates were not tested on a compiled model:
        instrument an uncompiled one. The first call per input shape compiles (minutes on a CPU).
        Returns the model.
        """
        self.backbone.compile(**options)
        for stage in self.stages:
            stage.compile(**options)
        return self

    def attention_sites(self) -> dict[str, Attention]:
        """Every attention layer by its stable site name, in forward order."""
        sites: dict[str, Attention] = {}
        for index, stage in enumerate(self.stages, start=1):
            for i, enc in enumerate(stage.encoder.layers):
                sites[f"stage{index}.encoder.{i}.self_attn"] = cast(EncoderLayer, enc).self_attn
            for i, dec in enumerate(stage.decoder.layers):
                sites[f"stage{index}.decoder.{i}.self_attn"] = cast(DecoderLayer, dec).self_attn
                sites[f"stage{index}.decoder.{i}.cross_attn"] = cast(DecoderLayer, dec).cross_attn
        return sites

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        mask: Tensor | None = None,
        encoder_outputs: bool = False,
        denoising: DenoisingBatch | None = None,
    ) -> dict:
        """Args:
            images: ``[B, 3, H, W]`` normalised images, or a list of ``[3, H_i, W_i]`` ones, of any
                float dtype (converted to the model's) and finite (a NaN or inf pixel is refused).
            mask: optional ``[B, H, W]`` bool pad mask (True = padded) for a tensor input.
            encoder_outputs: also apply the shared heads to every cell of each stage's encoder
                output (for :mod:`sdetr.model.encoder_loss`; training only).
            denoising: training-only queries: denoising queries (:mod:`sdetr.model.denoising`) and
                extra query groups (:mod:`sdetr.model.query_groups`); they never change the matching
                queries' outputs (a self-attention mask hides them).
        Returns:
            ``pred_logits [B, Q, num_classes + 1]``, ``pred_boxes [B, Q, 4]`` (cx, cy, w, h in
            [0, 1] of the unpadded image) and ``aux_outputs``, the earlier decoder layers'
            predictions (a list of dicts with the same two keys). With ``encoder_outputs``,
            ``encoder_outputs`` too: per stage ``pred_logits [B, h, w, num_classes + 1]``,
            ``pred_boxes [B, h, w, 4]`` and the cells' pad ``mask [B, h, w]``. With ``denoising``,
            ``denoising`` too: every decoder layer's predictions for the ``D`` denoising queries
            (a list of dicts, ``pred_logits [B, D, C + 1]``, ``pred_boxes [B, D, 4]``).
        """
        batch = ImageBatch.from_input(images, mask)
        weight = self.class_embed.weight  # inputs follow the model: float16/float64 images are converted
        pixels = batch.tensors.to(device=weight.device, dtype=weight.dtype)  # [B, 3, H, W]
        features = self.backbone(pixels, batch.mask.to(weight.device))
        tgt: Tensor | None = None
        decoded = []
        dense: list[Prediction] = []
        for stage in self.stages:
            level_features, level_mask = features[stage.feature]
            # hs [L, B, Q, E]: every decoder layer's output; memory [B, HW, E]: the encoder's output
            hs, memory = stage(level_features, level_mask, tgt if stage.from_previous else None, denoising)
            tgt = hs[-1]
            decoded.append(hs)
            if encoder_outputs:
                cells = memory.unflatten(1, level_mask.shape[1:])  # [B, HW, E] -> [B, h, w, E]
                dense.append(
                    {
                        "pred_logits": self.class_embed(cells),
                        "pred_boxes": self.bbox_embed(cells).sigmoid(),
                        "mask": level_mask,
                    }
                )
        hs = torch.cat(decoded)  # [total decoder layers, B, Q (+ D), E]
        all_logits = self.class_embed(hs)  # [L, B, Q (+ D), C + 1]
        all_boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q (+ D), 4]
        queries = self.config.num_queries
        logits, boxes = all_logits[:, :, :queries], all_boxes[:, :, :queries]  # [L, B, Q, ...]
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ],
        }
        if encoder_outputs:
            outputs["encoder_outputs"] = dense
        if denoising is not None:  # the denoising queries' predictions per layer, [B, D, ...]
            outputs["denoising"] = [
                {"pred_logits": lg, "pred_boxes": bx}
                for lg, bx in zip(all_logits[:, :, queries:], all_boxes[:, :, queries:], strict=True)
            ]
        return outputs
