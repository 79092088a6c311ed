"""torchvision ResNets whose frozen batch norms can be folded into the preceding convolutions.

Each block folds according to two switches (set by ``Backbone.set_speed``): ``fold_training`` in
training steps (the block in training mode with autograd recording) and ``fold_inference`` in
every other forward (eval mode or autograd off: inference, gradient attributions). With the
switch that applies off, the block runs exactly as torchvision's.

A frozen batch norm is an affine map per channel, ``y = x * s + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``, so
``norm(conv(x)) = conv'(x)`` with ``conv'.weight = conv.weight * s`` and ``conv'.bias = t``
(+ ``conv.bias * s``). The folded weights are computed from the module's own parameters in
every forward: they follow the trained convolution weights in training (the product is
differentiable) and cost one elementwise pass over the weights, far less than a pass over the
activations. The modules (and so the state-dict names) are torchvision's, unchanged; only the
blocks' ``forward`` differs. Forward hooks on blocks and layers fire as usual; hooks on the
individual ``convN`` / ``bnN`` modules of a folded pair do not (they are not called).
GroupNorm (and any other norm) is applied as usual.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool) -> Tensor:
    """``norm(conv(x))``; in one convolution when ``fold`` and ``norm`` is a frozen batch norm.

    Args:
        x: ``[B, C_in, H, W]``.
    Returns:
        ``[B, C_out, H', W']``.
    """
    if not fold or not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
    weight = conv.weight * scale[:, None, None, None]  # [C_out, C_in / groups, k, k]
    bias = norm.bias - norm.running_mean * scale  # [C_out]
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class Folding(Protocol):
    """The two folding switches (a block's attributes, or a ``BackboneSpeed``)."""

    @property
    def fold_training(self) -> bool: ...
    @property
    def fold_inference(self) -> bool: ...


def is_training_step(module: nn.Module) -> bool:
    """Whether ``module``'s forward is part of a training step: training mode, autograd recording."""
    return module.training and torch.is_grad_enabled()


def folds(module: nn.Module, switches: Folding) -> bool:
    """Whether ``module`` folds now: ``fold_training`` in a training step, else ``fold_inference``."""
    return switches.fold_training if is_training_step(module) else switches.fold_inference


def _shortcut(block: BasicBlock | Bottleneck, x: Tensor, fold: bool) -> Tensor:
    if block.downsample is None:
        return x
    conv, norm = block.downsample[0], block.downsample[1]
    return conv_norm(conv, norm, x, fold)


class FoldedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` (ResNet-18/34); folds frozen norms as :func:`folds` says."""

    fold_training: bool = False
    fold_inference: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not folds(self, self):
            return super().forward(x)
        out = conv_norm(self.conv1, self.bn1, x, True).relu_()  # in place on fresh outputs, as torchvision
        out = conv_norm(self.conv2, self.bn2, out, True)
        return out.add_(_shortcut(self, x, True)).relu_()


class FoldedBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet-50/101); folds frozen norms as :func:`folds` says."""

    fold_training: bool = False
    fold_inference: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not folds(self, self):
            return super().forward(x)
        out = conv_norm(self.conv1, self.bn1, x, True).relu_()  # in place on fresh outputs, as torchvision
        out = conv_norm(self.conv2, self.bn2, out, True).relu_()
        out = conv_norm(self.conv3, self.bn3, out, True)
        return out.add_(_shortcut(self, x, True)).relu_()


#: Block type and blocks per stage of each supported depth (as torchvision's factories).
ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (FoldedBasicBlock, [2, 2, 2, 2]),
    "resnet34": (FoldedBasicBlock, [3, 4, 6, 3]),
    "resnet50": (FoldedBottleneck, [3, 4, 6, 3]),
    "resnet101": (FoldedBottleneck, [3, 4, 23, 3]),
}


def build_resnet(name: str, **kwargs: Any) -> ResNet:
    """A torchvision ``ResNet`` of depth ``name`` (random weights) built from the folded blocks."""
    if name not in ARCHITECTURES:
        raise ValueError(f"backbone={name!r}; supported: {', '.join(ARCHITECTURES)}")
    block, layers = ARCHITECTURES[name]
    return torchvision.models.ResNet(block, layers, **kwargs)
