"""torchvision ResNets whose frozen batch norms can be folded into the preceding convolutions.

Each block folds according to two switches (set by ``Backbone.set_speed``): ``fold_training`` in
training steps (the block in training mode with autograd recording) and ``fold_inference`` in
every other forward (eval mode or autograd off: inference, gradient attributions). With the
switch that applies off, the block runs exactly as torchvision's: in inference (autograd off,
``in_place_inference``, no forward hooks on its modules) with the frozen batch norms, ReLUs and
residual add applied in place on the convolutions' fresh outputs, the same operations in the
same order (bit for bit torchvision's result, fewer allocations); otherwise torchvision's own
forward. The in-place path also takes opaque oneDNN tensors, which the backbone passes in its
blocked-layout inference (:mod:`sdetr.model.blocked_layout`); the blocks' code is the same.

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

from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as nn_module
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr.model.blocked_layout import dense_convolution_is_onednn, scale_shift_


def frozen_norm_(norm: FrozenBatchNorm2d, x: Tensor) -> Tensor:
    """``norm(x)``, computed in place on ``x`` with the operations of torchvision's
    ``FrozenBatchNorm2d.forward`` in its order, so bit for bit its result.

    Only for a fresh ``x`` that nothing else holds: a convolution's own output, in inference. When
    the result's dtype differs from ``x``'s (a bf16 convolution output under autocast meets the
    float32 statistics, and torchvision's result is float32), ``norm(x)`` is returned instead.

    Args:
        norm: the frozen batch norm (its ``weight``, ``bias``, ``running_mean``, ``running_var``
            are ``[C]`` buffers).
        x: ``[B, C, H, W]``, overwritten when computed in place; dense, or an opaque oneDNN
            tensor (:mod:`sdetr.model.blocked_layout`), whose result is then oneDNN too.
    Returns:
        ``[B, C, H, W]``: ``x`` itself, or a new tensor in the promoted dtype (dense ``x``), or a
        new oneDNN tensor where a oneDNN ``x``'s layout cannot be aliased.
    """
    if torch.promote_types(x.dtype, norm.weight.dtype) != x.dtype:
        return norm(x)
    scale = norm.weight.reshape(1, -1, 1, 1) * (norm.running_var.reshape(1, -1, 1, 1) + norm.eps).rsqrt()
    bias = norm.bias.reshape(1, -1, 1, 1) - norm.running_mean.reshape(1, -1, 1, 1) * scale  # [1, C, 1, 1]
    if x.is_mkldnn:
        return scale_shift_(x, scale.flatten(), bias.flatten())
    return x.mul_(scale).add_(bias)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor, fold: bool, in_place: bool = False) -> Tensor:
    """``norm(conv(x))``; in one convolution when ``fold`` and ``norm`` is a frozen batch norm,
    else with the frozen batch norm applied in place on the convolution's output when ``in_place``
    or when ``x`` is a oneDNN tensor (the blocked path, which is in place by construction).

    Args:
        x: ``[B, C_in, H, W]``.
    Returns:
        ``[B, C_out, H', W']``.
    """
    if not isinstance(norm, FrozenBatchNorm2d):
        return norm(conv(x))
    if not fold:
        if x.is_mkldnn:
            return _conv_norm_blocked(conv, norm, x)
        return frozen_norm_(norm, conv(x)) if in_place else norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
    weight = conv.weight * scale[:, None, None, None]  # [C_out, C_in / groups, k, k]
    bias = norm.bias - norm.running_mean * scale  # [C_out]
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_norm_blocked(conv: nn.Conv2d, norm: FrozenBatchNorm2d, x: Tensor) -> Tensor:
    """``norm(conv(x))`` in place, for an opaque oneDNN ``x`` ``[B, C_in, H, W]``, with the numbers
    of the dense path: oneDNN's convolution where PyTorch would use it on the dense input, else
    PyTorch's own on a dense copy. Returns a oneDNN ``[B, C_out, H', W']``."""
    if dense_convolution_is_onednn(conv, x.shape):
        return frozen_norm_(norm, conv(x))
    return frozen_norm_(norm, conv(x.to_dense())).to_mkldnn()


def forward_hooks_on(modules: Iterable[nn.Module]) -> bool:
    """Whether a forward hook or pre-hook watches calls of ``modules``: on one of them, or global."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def runs_in_place(modules: Iterable[nn.Module]) -> bool:
    """Whether an unfolded forward through ``modules`` may overwrite the convolutions' outputs:
    autograd off (inference), and no forward hooks there (or global ones) that could hold an
    output which the next operation would then change under them."""
    return not torch.is_grad_enabled() and not forward_hooks_on(modules)


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
    return conv_norm(conv, norm, x, fold, in_place=True)


#: How a block runs: its frozen norms folded into the convolutions, unfolded with the norms,
#: ReLUs and residual add in place on fresh convolution outputs, or torchvision's own forward.
BlockPath = Literal["folded", "in_place", "torchvision"]


def block_path(block: FoldedBasicBlock | FoldedBottleneck) -> BlockPath:
    """How ``block`` runs now (see :data:`BlockPath`). The in-place path assumes torchvision's
    modules: convolutions that return new tensors and ``FrozenBatchNorm2d`` norms."""
    if folds(block, block):
        return "folded"
    if block.in_place_inference and isinstance(block.bn1, FrozenBatchNorm2d) and runs_in_place(block.modules()):
        return "in_place"
    return "torchvision"


class FoldedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` (ResNet-18/34); folds frozen norms as :func:`folds` says."""

    fold_training: bool = False
    fold_inference: bool = False
    in_place_inference: bool = False

    def forward(self, x: Tensor) -> Tensor:
        path = block_path(self)
        if path == "torchvision":
            return super().forward(x)
        fold = path == "folded"
        out = conv_norm(self.conv1, self.bn1, x, fold, in_place=True).relu_()  # in place on fresh outputs
        out = conv_norm(self.conv2, self.bn2, out, fold, in_place=True)
        return out.add_(_shortcut(self, x, fold)).relu_()


class FoldedBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet-50/101); folds frozen norms as :func:`folds` says."""

    fold_training: bool = False
    fold_inference: bool = False
    in_place_inference: bool = False

    def forward(self, x: Tensor) -> Tensor:
        path = block_path(self)
        if path == "torchvision":
            return super().forward(x)
        fold = path == "folded"
        out = conv_norm(self.conv1, self.bn1, x, fold, in_place=True).relu_()  # in place on fresh outputs
        out = conv_norm(self.conv2, self.bn2, out, fold, in_place=True).relu_()
        out = conv_norm(self.conv3, self.bn3, out, fold, in_place=True)
        return out.add_(_shortcut(self, x, fold)).relu_()


#: Block type and blocks per stage of each supported depth (as torchvision's factories).
ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet10": (FoldedBasicBlock, [1, 1, 1, 1]),  # ResNet-18 at half depth: the CPU quickstart's
    "resnet18": (FoldedBasicBlock, [2, 2, 2, 2]),
    "resnet34": (FoldedBasicBlock, [3, 4, 6, 3]),
    "resnet50": (FoldedBottleneck, [3, 4, 6, 3]),
    "resnet101": (FoldedBottleneck, [3, 4, 23, 3]),
}


#: The output channels of a ResNet's stem and four stages at width 1 (torchvision's, per block
#: expansion: basic blocks give these, bottlenecks four times the last four).
STAGE_PLANES = (64, 64, 128, 256, 512)


class ScaledResNet(ResNet):
    """torchvision's ``ResNet`` with every stage's channels multiplied by ``width``.

    At ``width=1`` with the ResNet stem it is torchvision's model: the same modules in the same order, the same
    state-dict names and the same initialisation, parameter for parameter from the same seed
    (tested), so every existing config builds what it built before. ``width=0.5`` halves every
    convolution's channels (ResNet-10: 64..512 -> 32..256), about a quarter of the convolutions'
    work; ``32 * width`` must be a whole number (:class:`~sdetr.config.ModelConfig` checks it).
    ``stem_kind="patchify"`` replaces the 7x7 stride-2 stem convolution and the max pool by one
    4x4 stride-4 convolution (``maxpool`` is then ``nn.Identity``).
    Only the constructor differs from torchvision's (which fixes the stem at 64 channels); the
    forward and ``_make_layer`` are torchvision's.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        width: float = 1.0,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        num_classes: int = 1000,
        stem_kind: str = "resnet",
    ) -> None:
        nn.Module.__init__(self)  # torchvision's constructor, stage widths scaled, from here on
        stem, *planes = (round(channels * width) for channels in STAGE_PLANES)
        dilate = replace_stride_with_dilation or [False, False, False]
        if len(dilate) != 3:
            raise ValueError(f"replace_stride_with_dilation needs one flag per layer2..4, got {dilate}")
        self._norm_layer = norm_layer
        self.inplanes, self.dilation, self.groups, self.base_width = stem, 1, 1, 64
        self.maxpool: nn.Module
        if stem_kind == "resnet":
            self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        elif stem_kind == "patchify":  # ConvNeXt's: non-overlapping 4x4 patches, stride 4, no pool
            self.conv1 = nn.Conv2d(3, stem, kernel_size=4, stride=4, bias=False)
        else:
            raise ValueError(f"stem_kind={stem_kind!r}; use 'resnet' or 'patchify'")
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_kind == "resnet" else nn.Identity()
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2, dilate=dilate[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)  # drawn as torchvision's is
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)


def build_resnet(name: str, width: float = 1.0, **kwargs: Any) -> ResNet:
    """A ResNet of depth ``name`` (random weights) built from the folded blocks, its channels
    times ``width`` (:class:`ScaledResNet`; at 1, torchvision's model)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"backbone={name!r}; supported: {', '.join(ARCHITECTURES)}")
    block, layers = ARCHITECTURES[name]
    return ScaledResNet(block, layers, width, **kwargs)
