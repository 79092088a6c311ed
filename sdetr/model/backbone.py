"""Frozen-BatchNorm ResNet backbone returning C4 (stride 16) and C5 (stride 32) with masks.

How it computes is a :class:`BackboneSpeed`, picked by name (``Backbone.set_speed``,
``Detector.set_speed``, ``load_model(speed=...)``):

- ``"default"``: inference is torchvision's result, bit for bit: with autograd off the frozen
  batch norms, ReLUs and residual adds run in place on the convolutions' fresh outputs (the
  same operations in the same order, fewer allocations; torchvision's own forward wherever a
  forward hook sits on a block's modules). On a CPU in float32, with no hook anywhere in the
  body, the activations also stay in oneDNN's blocked layout from the stem to the returned
  levels (:mod:`sdetr.model.blocked_layout`), which saves two reorders per convolution and
  keeps every number. In training steps (training mode with autograd
  recording) the frozen batch norms are folded into their convolutions, the folded weights
  recomputed every step (:mod:`sdetr.model.resnet_blocks`), and the convolutions run
  channels-last. Eval-mode forwards with autograd on (gradient attributions) are
  torchvision's forward;
- ``"fast"``: folded and channels-last everywhere;
- ``"exact"``: torchvision's modules and forward everywhere.

Every speed but ``exact`` also computes the ResNet stem's max pool faster on NCHW inputs, with
the same values and gradients bit for bit (:mod:`sdetr.model.max_pool`), GroupNorm backbones
included (a patchify stem has no pool).

All compute the same function and differ by float32 rounding only: the folding's (about 1e-5
at the detector's outputs on the parity tests' padded batch, depending on the thread count),
channels-last's (about 2e-5). The parity tests against the original code hold the default's
inference to 1e-5. GroupNorm backbones (``sdetr-tiny``) have nothing to fold and always run
torchvision's modules in NCHW (channels-last measured 0.75x the quickstart's steps per second
there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr.config import ModelConfig
from sdetr.model.blocked_layout import blocked_layout_available, dense_convolution_is_onednn
from sdetr.model.max_pool import stem_max_pool
from sdetr.model.resnet_blocks import (
    FoldedBasicBlock,
    FoldedBottleneck,
    block_path,
    build_resnet,
    conv_norm,
    folds,
    is_training_step,
    runs_in_place,
)

#: Levels a backbone can return, with the torchvision layer that produces each.
LEVEL_LAYERS = {"c4": "layer3", "c5": "layer4"}


@dataclass(frozen=True)
class BackboneSpeed:
    """How the backbone computes its (mathematically fixed) function; see the module doc.

    Attributes:
        fold_training: fold frozen batch norms into their convolutions in training steps (the
            backbone in training mode with autograd recording).
        fold_inference: fold them in every other forward too (eval mode or autograd off).
        channels_last_training: run the convolutions in NHWC memory format in training steps.
        channels_last_inference: ... and in every other forward.
        in_place_inference: in an unfolded forward with autograd off (inference), apply the
            frozen batch norms, ReLUs and residual adds in place on the convolutions' fresh
            outputs: the same operations in the same order, so bit for bit torchvision's
            result, with fewer allocations. Off wherever a forward hook sits on the block's
            modules (a hook could hold an output that the next operation would overwrite).
        fast_max_pool: compute the stem's max pool on NCHW inputs in a faster way with the same
            values and gradients, bit for bit (:mod:`sdetr.model.max_pool`); any backbone.
        blocked_inference: where the in-place inference runs the whole backbone (no hook on
            any of its modules) on a CPU in float32 without autocast, keep the activations in
            oneDNN's blocked layout between convolutions (:mod:`sdetr.model.blocked_layout`):
            the same result bit for bit, without the reorders to and from NCHW around each
            convolution.
    All others apply to frozen-BatchNorm backbones only.
    """

    fold_training: bool = True
    fold_inference: bool = False
    channels_last_training: bool = True
    channels_last_inference: bool = False
    in_place_inference: bool = True
    fast_max_pool: bool = True
    blocked_inference: bool = True


#: Named speeds: ``default``, ``fast`` and ``exact`` (torchvision's modules, bit for bit).
BACKBONE_SPEEDS: dict[str, BackboneSpeed] = {
    "default": BackboneSpeed(),
    "fast": BackboneSpeed(fold_inference=True, channels_last_inference=True),
    "exact": BackboneSpeed(
        fold_training=False,
        channels_last_training=False,
        in_place_inference=False,
        fast_max_pool=False,
        blocked_inference=False,
    ),
}


def backbone_speed(speed: str | BackboneSpeed) -> BackboneSpeed:
    """A :class:`BackboneSpeed` or the one named ``speed``.

    Raises:
        ValueError: an unknown name (the message lists the names).
    """
    if isinstance(speed, BackboneSpeed):
        return speed
    if speed not in BACKBONE_SPEEDS:
        raise ValueError(f"speed={speed!r}; use one of {', '.join(BACKBONE_SPEEDS)} or a BackboneSpeed")
    return BACKBONE_SPEEDS[speed]


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Pad mask ``[B, H, W]`` (True = padded) resized to ``size`` by nearest interpolation."""
    return F.interpolate(mask[:, None].float(), size=size).to(torch.bool)[:, 0]


class Backbone(nn.Module):
    """A torchvision ResNet with every BatchNorm frozen.

    With ``freeze_stem`` (the original), conv1, bn1 and layer1 never train; layer2..4 do.
    The forward returns the requested levels as ``{level: (features [B, C, h, w], mask [B, h, w])}``.
    """

    def __init__(self, config: ModelConfig, levels: tuple[str, ...]) -> None:
        super().__init__()
        replace_stride = [False, False, config.dilation]
        norm_layer = (
            FrozenBatchNorm2d
            if config.backbone_norm == "frozen_bn"
            else partial(nn.GroupNorm, config.group_norm_groups())
        )
        kwargs: dict[str, object] = {"norm_layer": norm_layer}
        if config.backbone in ("resnet50", "resnet101"):
            kwargs["replace_stride_with_dilation"] = replace_stride
        elif config.dilation:
            raise ValueError(f"dilation is only supported for resnet50/101, not {config.backbone}")
        body = build_resnet(config.backbone, config.backbone_width, stem_kind=config.backbone_stem, **kwargs)
        del body.fc, body.avgpool  # classification head: unused, no parameters kept
        self.body = body
        self.backbone_name = config.backbone  # e.g. "resnet50", for error messages
        self.levels = levels
        self.num_channels = {level: config.feature_channels(level) for level in levels}  # type: ignore[arg-type]
        if config.backbone_weights is not None:
            self.load_imagenet_weights(config.backbone_weights)
        if config.freeze_stem:
            for name, parameter in self.body.named_parameters():
                if not name.startswith(("layer2", "layer3", "layer4")):
                    parameter.requires_grad_(False)
        self.set_speed("default")

    def set_speed(self, speed: str | BackboneSpeed) -> None:
        """Compute the same features another way: ``"default"``, ``"fast"``, ``"exact"`` or a
        :class:`BackboneSpeed` (see the module doc)."""
        self.speed = backbone_speed(speed)
        for module in self.body.modules():
            if isinstance(module, FoldedBasicBlock | FoldedBottleneck):
                frozen = isinstance(module.bn1, FrozenBatchNorm2d)  # other norms: torchvision's forward
                module.fold_training = frozen and self.speed.fold_training
                module.fold_inference = frozen and self.speed.fold_inference
                module.in_place_inference = frozen and self.speed.in_place_inference

    def _channels_last(self) -> bool:
        """Whether this forward runs NHWC (see :class:`BackboneSpeed`)."""
        if not isinstance(self.body.bn1, FrozenBatchNorm2d):
            return False
        speed = self.speed
        return speed.channels_last_training if is_training_step(self) else speed.channels_last_inference

    def _runs_blocked(self, images: Tensor) -> bool:
        """Whether this forward keeps oneDNN's blocked layout (``blocked_inference``): unfolded
        in-place inference through every module of the body, float32 on a CPU, no autocast,
        not inside ``torch.compile`` or a trace, NCHW images and weights, frozen batch norms,
        every block on its in-place path, and oneDNN for layer1's first convolution."""
        speed, body = self.speed, self.body
        if not (
            speed.blocked_inference
            and speed.in_place_inference
            and not folds(self, speed)
            and isinstance(body.bn1, FrozenBatchNorm2d)
            and images.dtype == torch.float32
            and images.device.type == "cpu"
            and images.numel() > 0
            and images.is_contiguous()  # NCHW, as are the weights below: NHWC takes other kernels
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()  # a trace would keep the blocked memory's addresses
            and not torch.jit.is_scripting()
            and blocked_layout_available()
        ):
            return False
        modules = list(body.modules())  # walked once for the three checks below
        return (
            runs_in_place(modules)
            and all(m.weight.is_contiguous() for m in modules if isinstance(m, nn.Conv2d))
            and all(block_path(b) == "in_place" for b in modules if isinstance(b, FoldedBasicBlock | FoldedBottleneck))
            and self._layer1_convolves_with_onednn(images.shape)
        )

    def _layer1_convolves_with_onednn(self, shape: torch.Size) -> bool:
        """Whether PyTorch would convolve layer1's first (dense) input with oneDNN. Where it
        would not (1x1 convolutions on one thread, for example), most convolutions would take a
        dense detour in the blocked path, which is then slower than the NCHW path.

        Args:
            shape: the images' ``[B, 3, H, W]``; layer1's input is ``[B, C0, ceil(H/4), ceil(W/4)]``
                after the ResNet stem, ``[B, C0, floor(H/4), floor(W/4)]`` after a patchify stem
                (``C0``: the stem's channels, 64 at ``backbone_width`` 1).
        """
        conv = self.body.layer1[0].conv1
        batch, _, height, width = shape
        if isinstance(self.body.maxpool, nn.Identity):  # patchify: a 4x4 stride-4 convolution, no padding
            size = [height // 4, width // 4]
        else:
            size = [-(-height // 4), -(-width // 4)]
        return dense_convolution_is_onednn(conv, torch.Size([batch, conv.in_channels, *size]))

    def load_imagenet_weights(self, path: str | Path) -> None:
        """Load torchvision-format ImageNet weights from a local file (never downloads)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone_weights={str(path)!r} does not exist; pass a local torchvision "
                "ResNet state-dict file or leave backbone_weights unset"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        if missing or unexpected:
            hint = ""
            if self.backbone_name == "resnet10":
                hint = " (torchvision has no resnet10 weights: it trains from scratch)"
            raise ValueError(
                f"{path}: not a torchvision {self.backbone_name} ImageNet state dict{hint} "
                f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)"
            )

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Args:
        images: ``[B, 3, H, W]`` normalised images.
        mask: ``[B, H, W]`` True on padded pixels.
        """
        body, speed = self.body, self.speed
        fold = folds(self, speed)
        blocked = self._runs_blocked(images)
        if blocked:
            x = images.to_mkldnn()  # opaque oneDNN [B, 3, H, W] until the levels come out
        elif self._channels_last():
            x = images.contiguous(memory_format=torch.channels_last)  # NHWC
        else:
            x = images
        in_place = speed.in_place_inference and runs_in_place((body.conv1, body.bn1))
        x = conv_norm(body.conv1, body.bn1, x, fold, in_place).relu_()  # [B, C0, H/2, W/2] (H/4, W/4: patchify)
        fast_pool = speed.fast_max_pool and not blocked  # oneDNN's own pool is fast
        if not isinstance(body.maxpool, nn.Identity):  # a patchify stem has no pool (already at H/4, W/4)
            x = stem_max_pool(body.maxpool, x) if fast_pool else body.maxpool(x)  # [B, C0, H/4, W/4]
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for level_name, layer_name in (("c2", "layer1"), ("c3", "layer2"), *LEVEL_LAYERS.items()):
            x = getattr(body, layer_name)(x)  # [B, C, H/stride, W/stride]
            if level_name in self.levels:
                features = x.to_dense() if blocked else x.contiguous()  # back to NCHW
                out[level_name] = (features, resize_mask(mask, x.shape[-2:]))
            if len(out) == len(self.levels):
                break
        return out
