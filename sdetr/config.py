"""Typed model configuration and the named presets.

A model is a backbone followed by one or more transformer *stages*. Each stage reads one
backbone level (``"c4"`` stride 16 or ``"c5"`` stride 32), projects it to ``hidden_dim``,
encodes it and decodes a set of object queries. A stage may start its decoder from the
previous stage's last decoder output (SDETR's stage 2) instead of from zeros.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from sdetr.typed_fields import ConfigError, check_fields, check_names, coerce, field_types, unknown_field_message

FeatureLevel = Literal["c4", "c5"]
PositionKind = Literal["sine", "learned"]
BackboneNorm = Literal["frozen_bn", "group_norm"]
BackboneStem = Literal["resnet", "patchify"]
BackboneName = Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"]

#: GroupNorm groups of a ``group_norm`` backbone at ``backbone_width`` 1 (in proportion otherwise).
GROUP_NORM_GROUPS = 32

#: Output channels of layer3 (C4) and layer4 (C5) for each supported ResNet.
BACKBONE_CHANNELS: dict[str, dict[str, int]] = {
    "resnet10": {"c4": 256, "c5": 512},
    "resnet18": {"c4": 256, "c5": 512},
    "resnet34": {"c4": 256, "c5": 512},
    "resnet50": {"c4": 1024, "c5": 2048},
    "resnet101": {"c4": 1024, "c5": 2048},
}


def _per_layer(value: int | tuple[int, ...], layers: int, name: str) -> tuple[int, ...]:
    """Expand an int (same for every layer) or check a per-layer tuple."""
    if isinstance(value, int):
        return (value,) * layers
    if len(value) != layers:
        raise ConfigError(f"{name} has {len(value)} entries but the stage has {layers} layers")
    return tuple(value)


@dataclass(frozen=True)
class StageConfig:
    """One transformer stage.

    Attributes:
        feature: backbone level the stage reads.
        encoder_layers / decoder_layers: number of layers.
        encoder_heads / decoder_heads: heads of every layer (int) or of each layer (tuple).
        from_previous: start the decoder from the previous stage's last decoder output.
    """

    feature: FeatureLevel = "c5"
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_heads: int | tuple[int, ...] = 8
    decoder_heads: int | tuple[int, ...] = 8
    from_previous: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.encoder_layers < 0:
            raise ConfigError(f"encoder_layers={self.encoder_layers}; use 0 or more")
        if self.decoder_layers < 1:
            raise ConfigError(f"decoder_layers={self.decoder_layers}; a stage needs at least 1 decoder layer")
        for heads in self.encoder_heads_per_layer() + self.decoder_heads_per_layer():
            if heads < 1:
                raise ConfigError(f"heads={heads}; every attention layer needs at least 1 head")

    @classmethod
    def from_dict(cls, data: Any, where: str = "stage") -> StageConfig:
        """A stage from a dict (as in a checkpoint's config); wrong fields or types raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a dict of StageConfig fields, got {type(data).__name__}")
        _check_names(cls, data, where)
        values = {name: coerce(value, field_types(cls)[name], f"{where}.{name}") for name, value in data.items()}
        return cls(**values)

    def encoder_heads_per_layer(self) -> tuple[int, ...]:
        return _per_layer(self.encoder_heads, self.encoder_layers, "encoder_heads")

    def decoder_heads_per_layer(self) -> tuple[int, ...]:
        return _per_layer(self.decoder_heads, self.decoder_layers, "decoder_heads")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a detector's architecture.

    Attributes:
        name: preset name this config came from (informational).
        backbone: torchvision ResNet variant; ``"resnet10"`` is ResNet-18 with one basic block per
            stage instead of two (torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``, no ImageNet
            weights), the quickstart's backbone.
        dilation: replace layer4's stride by dilation (DETR-DC5); C5 then has stride 16.
        backbone_weights: optional local file with ImageNet weights (torchvision names).
        backbone_norm: ``"frozen_bn"`` (the original: pretrained statistics, frozen) or
            ``"group_norm"`` (32 groups at width 1; for training the backbone from scratch,
            batch-independent).
        backbone_width: multiplier of every backbone convolution's channels (1: the ResNet as
            published). 0.5 halves them (ResNet-10: 64..512 -> 32..256), for from-scratch
            backbones only (ImageNet weights exist at width 1); ``32 * backbone_width`` must be
            a whole number, and GroupNorm then uses ``32 * backbone_width`` groups, so each group
            holds as many channels as at width 1.
        backbone_stem: ``"resnet"`` (the published stem: a 7x7 stride-2 convolution, norm, ReLU and
            a 3x3 stride-2 max pool) or ``"patchify"`` (ConvNeXt's: one 4x4 stride-4 convolution,
            then norm and ReLU, no pool; same stride 4 into layer1, for from-scratch backbones
            only: ImageNet weights have the 7x7 stem). It sees whole 4x4 patches only: the last
            ``H mod 4`` rows and ``W mod 4`` columns of a (padded) batch do not reach layer1.
        freeze_stem: keep conv1, bn1 and layer1 frozen (the original, with pretrained weights).
        hidden_dim / ffn_dim / dropout: transformer sizes.
        position: ``"sine"`` (fixed) or ``"learned"`` position embeddings.
        norm_first: pre-norm layers (LayerNorm before each sub-layer) instead of post-norm.
        num_classes: largest class id + 1 (COCO: 91); the logits have one more (no-object).
        num_queries: object queries per stage.
        stages: the transformer stages, in order.
    """

    name: str = "custom"
    backbone: BackboneName = "resnet50"
    dilation: bool = False
    backbone_weights: str | None = None
    backbone_norm: BackboneNorm = "frozen_bn"
    backbone_width: float = 1.0
    backbone_stem: BackboneStem = "resnet"
    freeze_stem: bool = True
    hidden_dim: int = 256
    ffn_dim: int = 2048
    dropout: float = 0.1
    position: PositionKind = "sine"
    norm_first: bool = False
    num_classes: int = 91
    num_queries: int = 100
    stages: tuple[StageConfig, ...] = field(default_factory=lambda: (StageConfig(),))

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("hidden_dim", "ffn_dim", "num_classes", "num_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}; use a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}; use a probability in [0, 1)")
        self._check_backbone_shape()
        if not self.stages:
            raise ConfigError("a model needs at least one stage")
        if self.stages[0].from_previous:
            raise ConfigError("stage 1 cannot start from a previous stage (from_previous=True)")
        for i, stage in enumerate(self.stages, start=1):
            for heads in stage.encoder_heads_per_layer() + stage.decoder_heads_per_layer():
                if self.hidden_dim % heads:
                    raise ConfigError(f"stage {i}: hidden_dim={self.hidden_dim} is not divisible by heads={heads}")

    def _check_backbone_shape(self) -> None:
        groups = GROUP_NORM_GROUPS * self.backbone_width
        if not (groups >= 1 and groups == round(groups)):
            raise ConfigError(
                f"backbone_width={self.backbone_width}; use a positive multiple of 1/{GROUP_NORM_GROUPS} "
                "(e.g. 0.5 or 0.75), so that every stage has a whole number of channels and of GroupNorm groups"
            )
        if self.backbone_weights is None:
            return
        problems = []
        if self.backbone_width != 1.0:
            problems.append(
                f"backbone_width={self.backbone_width}: ImageNet weights fit the ResNet at width 1 only; "
                "set backbone_width=1"
            )
        if self.backbone_stem != "resnet":
            problems.append(
                f"backbone_stem={self.backbone_stem!r}: ImageNet weights have the ResNet's 7x7 stem; "
                "set backbone_stem=resnet"
            )
        if problems:
            raise ConfigError(
                f"backbone_weights={self.backbone_weights!r} with "
                + "; and ".join(problems)
                + " (or leave the weights out)"
            )

    def feature_channels(self, level: FeatureLevel) -> int:
        """Channels of the backbone level ``level`` at this config's ``backbone_width``."""
        return round(BACKBONE_CHANNELS[self.backbone][level] * self.backbone_width)

    def group_norm_groups(self) -> int:
        """GroupNorm groups of a ``group_norm`` backbone: :data:`GROUP_NORM_GROUPS` at width 1, in
        proportion otherwise."""
        return round(GROUP_NORM_GROUPS * self.backbone_width)

    def feature_stride(self, level: FeatureLevel) -> int:
        if level == "c4":
            return 16
        return 16 if self.dilation else 32

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (``dataclasses.replace``); unknown fields raise :class:`ConfigError`."""
        check_names(ModelConfig, changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """``{field: (this value, other's value)}`` for every architecture field that differs (not ``name``)."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) != getattr(other, f.name)
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "model config") -> ModelConfig:
        """A config from :meth:`to_dict`'s output (as stored in checkpoints and recordings).

        Raises:
            ConfigError: not a dict, an unknown field (with the closest valid name) or a value of
                the wrong type or range (naming the field).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a dict of ModelConfig fields, got {type(data).__name__}")
        _check_names(cls, data, where)
        values = {name: coerce(value, field_types(cls)[name], f"{where}.{name}") for name, value in data.items()}
        return cls(**values)


def _check_names(cls: type, data: dict[Any, Any], where: str) -> None:
    for name in data:
        if not isinstance(name, str) or name not in field_types(cls):
            raise ConfigError(f"{where}: {unknown_field_message(cls, str(name))}")


def _detr() -> ModelConfig:
    return ModelConfig(name="detr", stages=(StageConfig("c5", 6, 6, 8, 8),))


def _sdetr() -> ModelConfig:
    return ModelConfig(
        name="sdetr",
        stages=(
            StageConfig("c5", 3, 3, encoder_heads=8, decoder_heads=8),
            StageConfig("c4", 3, 3, encoder_heads=1, decoder_heads=8, from_previous=True),
        ),
    )


def _sdetr_multihead() -> ModelConfig:
    base = _sdetr()
    return base.replace(
        name="sdetr-multihead",
        stages=(base.stages[0], dataclasses.replace(base.stages[1], encoder_heads=8)),
    )


def _sdetr_tiny() -> ModelConfig:
    """SDETR's two stages, small, on a narrow ResNet-10 trained from scratch: the CPU quickstart's model.

    A ResNet-10 (one basic block per ResNet stage instead of ResNet-18's two) at half width (32..256
    channels instead of 64..512) with a patchify stem (one 4x4 stride-4 convolution, no max pool):
    a float32 training step of the quickstart takes about 0.5x the time of the full-width ResNet-10
    with the usual stem, the previous default, so 21 epochs fit 10 minutes on a 2-core CPU without
    bf16 (README, "Training and evaluation"). ``backbone_width=1, backbone_stem="resnet"`` is the
    previous choice, and ``backbone="resnet18"`` the one before it.
    """
    return ModelConfig(
        name="sdetr-tiny",
        backbone="resnet10",
        backbone_norm="group_norm",  # no pretrained weights here: trained from scratch
        backbone_width=0.5,
        backbone_stem="patchify",
        freeze_stem=False,
        hidden_dim=64,
        ffn_dim=128,
        dropout=0.0,
        num_queries=20,
        stages=(
            StageConfig("c5", 2, 2, encoder_heads=4, decoder_heads=4),
            StageConfig("c4", 2, 2, encoder_heads=1, decoder_heads=4, from_previous=True),
        ),
    )


def _sdetr_tiny_multihead() -> ModelConfig:
    """``sdetr-tiny`` with as many heads in the stage-2 encoder as its stage-1 encoder (the study's ablation)."""
    base = _sdetr_tiny()
    return base.replace(
        name="sdetr-tiny-multihead",
        stages=(base.stages[0], dataclasses.replace(base.stages[1], encoder_heads=base.stages[0].encoder_heads)),
    )


#: Registry of named presets: name -> function returning a fresh config.
PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "sdetr": _sdetr,
    "detr": _detr,
    "sdetr-multihead": _sdetr_multihead,
    "sdetr-tiny": _sdetr_tiny,
    "sdetr-tiny-multihead": _sdetr_tiny_multihead,
}


class UnknownPresetError(ConfigError, KeyError):
    """A preset name that is not in :data:`PRESETS` (a ``KeyError`` too, for ``PRESETS``-style lookups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def get_config(preset: str, **overrides: Any) -> ModelConfig:
    """The config of a named preset, with optional field overrides.

    Raises:
        UnknownPresetError: ``preset`` is not in :data:`PRESETS` (the message lists them).
        ConfigError: an override that is not a field (with the closest one) or has the wrong type.
    """
    if preset not in PRESETS:
        close = difflib.get_close_matches(str(preset), list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownPresetError(f"unknown preset {preset!r}{hint}; available: {', '.join(PRESETS)}")
    config = PRESETS[preset]()
    if not overrides:
        return config
    check_names(ModelConfig, overrides)
    return config.replace(**overrides)
