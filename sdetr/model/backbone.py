"""Frozen-BatchNorm ResNet backbone returning C4 (stride 16) and C5 (stride 32) with masks.

Fast mode (``Backbone.set_fast(True)``, or ``Detector.set_fast``; off by default): the frozen
batch norms are folded into their convolutions (:mod:`sdetr.model.resnet_blocks`) and the
backbone runs in channels-last memory format. Both only reorder float arithmetic: outputs
change by float32 rounding (measured in ``benchmarks/speed.py``), not in meaning. The default
path is torchvision's, bit for bit.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr.config import ModelConfig
from sdetr.model.resnet_blocks import FoldedBasicBlock, FoldedBottleneck, build_resnet, conv_norm

#: Levels a backbone can return, with the torchvision layer that produces each.
LEVEL_LAYERS = {"c4": "layer3", "c5": "layer4"}


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
        norm_layer = FrozenBatchNorm2d if config.backbone_norm == "frozen_bn" else partial(nn.GroupNorm, 32)
        kwargs: dict[str, object] = {"norm_layer": norm_layer}
        if config.backbone in ("resnet50", "resnet101"):
            kwargs["replace_stride_with_dilation"] = replace_stride
        elif config.dilation:
            raise ValueError(f"dilation is only supported for resnet50/101, not {config.backbone}")
        body = build_resnet(config.backbone, **kwargs)
        self.fold = False  # frozen batch norms folded into their convolutions
        self.channels_last = False  # NHWC convolutions
        del body.fc, body.avgpool  # classification head: unused, no parameters kept
        self.body = body
        self.levels = levels
        self.num_channels = {level: config.feature_channels(level) for level in levels}  # type: ignore[arg-type]
        if config.backbone_weights is not None:
            self.load_imagenet_weights(config.backbone_weights)
        if config.freeze_stem:
            for name, parameter in self.body.named_parameters():
                if not name.startswith(("layer2", "layer3", "layer4")):
                    parameter.requires_grad_(False)

    def set_fast(self, enabled: bool = True, channels_last: bool | None = None) -> None:
        """Fold frozen batch norms into the convolutions and run channels-last (or switch back).

        ``channels_last`` (default: ``enabled``) picks the memory format separately: folding alone
        moves outputs less (see :mod:`sdetr.model.resnet_blocks`).
        """
        self.fold = enabled
        self.channels_last = enabled if channels_last is None else channels_last
        for module in self.body.modules():
            if isinstance(module, FoldedBasicBlock | FoldedBottleneck):
                module.fold = enabled

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
            raise ValueError(
                f"{path}: not a {type(self.body).__name__} ImageNet state dict "
                f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)"
            )

    def forward(self, images: Tensor, mask: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Args:
        images: ``[B, 3, H, W]`` normalised images.
        mask: ``[B, H, W]`` True on padded pixels.
        """
        body = self.body
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images  # NHWC
        x = body.maxpool(F.relu(conv_norm(body.conv1, body.bn1, x, self.fold)))
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for level_name, layer_name in (("c2", "layer1"), ("c3", "layer2"), *LEVEL_LAYERS.items()):
            x = getattr(body, layer_name)(x)  # [B, C, H/stride, W/stride]
            if level_name in self.levels:
                out[level_name] = (x.contiguous(), resize_mask(mask, x.shape[-2:]))  # back to NCHW
            if len(out) == len(self.levels):
                break
        return out
