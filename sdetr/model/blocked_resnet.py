"""CPU inference of a frozen-BatchNorm ResNet in oneDNN's blocked layout, weights prepacked once.

PyTorch computes a float32 CPU convolution with oneDNN. For an ordinary (NCHW) tensor, every
call reorders the input into oneDNN's blocked layout (channels in blocks of 16), reorders the
weights the same way, runs the primitive and reorders the result back. This module keeps the
activations in the blocked layout (``Tensor.to_mkldnn()``) from the stem to the last requested
layer, with every convolution's folded weights (:func:`sdetr.model.resnet_blocks.folded_weights`)
reordered once and cached. At 2 threads the same primitives add the same products in the same
order, so the features equal the folded dense path's bit for bit (tested on this project's CPU;
at 1 thread oneDNN picks other 1x1-convolution kernels for plain tensors and the two differ by
float32 rounding). Measured on this project's 2-core CPU: ResNet-50 at 512x512, batch 2, 1.39x
torchvision's path, 1.30x the folded dense path (``benchmarks/speed.py`` measures the model).
It is part of the opt-in ``"fast"`` speed (:mod:`sdetr.model.backbone`).

It applies only where it can compute the same function: float32 CPU images without autocast,
autograd off, every norm a frozen batch norm, no hooks on the ResNet's submodules (they would not
fire), and not while ``torch.compile`` traces. :func:`blocked_applicable` checks exactly that;
:class:`sdetr.model.backbone.Backbone` falls back to the dense path otherwise.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from sdetr.model.resnet_blocks import folded_weights

#: The ResNet's layers in order (each a sequence of blocks).
LAYERS = ("layer1", "layer2", "layer3", "layer4")


class PackedConv(NamedTuple):
    """A convolution with its frozen batch norm folded in, weights in oneDNN's layout."""

    weight: Tensor  # oneDNN-reordered [C_out, C_in / groups, k, k]
    bias: Tensor  # oneDNN [C_out]
    padding: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def __call__(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W]`` (blocked layout) -> ``[B, C_out, H', W']`` (blocked layout)."""
        weight, bias = self.weight, self.bias
        return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)


def pack_conv(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> PackedConv:
    """``norm(conv(.))`` folded into one convolution and reordered for oneDNN."""
    weight, bias = folded_weights(conv, norm)
    padding = tuple(conv.padding) if not isinstance(conv.padding, str) else None
    if padding is None:
        raise ValueError(f"string padding {conv.padding!r} is not supported by the blocked path")
    reordered = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().to_mkldnn(), list(padding), list(conv.stride), list(conv.dilation), conv.groups
    )
    return PackedConv(reordered, bias.detach().to_mkldnn(), padding, conv.stride, conv.dilation, conv.groups)


class PackedBlock(NamedTuple):
    """One residual block: its convolutions in order and the shortcut's (None: identity)."""

    convs: tuple[PackedConv, ...]  # 2 (BasicBlock) or 3 (Bottleneck)
    shortcut: PackedConv | None

    def __call__(self, x: Tensor) -> Tensor:
        """``relu(convs(x) + shortcut(x))``, a ReLU after every convolution but the last; blocked layout."""
        out = x
        for conv in self.convs[:-1]:
            out = torch.relu(conv(out))
        out = self.convs[-1](out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + identity)


def pack_block(block: BasicBlock | Bottleneck) -> PackedBlock:
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, Bottleneck):
        pairs.append((block.conv3, block.bn3))
    shortcut = None if block.downsample is None else pack_conv(block.downsample[0], block.downsample[1])
    return PackedBlock(tuple(pack_conv(conv, norm) for conv, norm in pairs), shortcut)  # type: ignore[arg-type]


class PackedResNet(NamedTuple):
    """Every convolution of a ResNet, folded and reordered; ``key`` identifies the weights it came from."""

    stem: PackedConv
    layers: dict[str, tuple[PackedBlock, ...]]
    key: tuple[tuple[int, int, int], ...] | None  # None: weights whose changes cannot be tracked


def weights_key(body: nn.Module) -> tuple[tuple[int, int, int], ...] | None:
    """Identity, in-place version counter and storage of every parameter and buffer of ``body``.

    Any in-place change (an optimiser step, ``load_state_dict``), a replaced tensor or a move
    changes it. None for inference-mode tensors, which keep no version counter.
    """
    try:
        return tuple((id(t), t._version, t.data_ptr()) for t in itertools.chain(body.parameters(), body.buffers()))
    except RuntimeError:
        return None


def pack_resnet(body: ResNet) -> PackedResNet:
    with torch.no_grad():
        layers = {name: tuple(pack_block(block) for block in getattr(body, name)) for name in LAYERS}
        return PackedResNet(pack_conv(body.conv1, body.bn1), layers, weights_key(body))  # type: ignore[arg-type]


class PackedWeights:
    """The cached :class:`PackedResNet` of one backbone, repacked whenever its weights change.

    Not part of the state dict; copies and pickles of the owning module start empty (the
    oneDNN tensors cannot be copied or pickled, and are rebuilt at the next inference).
    """

    def __init__(self) -> None:
        self.packed: PackedResNet | None = None

    def get(self, body: ResNet) -> PackedResNet:
        key = weights_key(body)
        if self.packed is None or key is None or self.packed.key != key:
            self.packed = pack_resnet(body)
        return self.packed

    def clear(self) -> None:
        self.packed = None

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedWeights:
        return PackedWeights()

    def __getstate__(self) -> dict[str, Any]:
        return {"packed": None}


def _has_hooks(body: nn.Module) -> bool:
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in body.modules() if m is not body)


def _norms(body: ResNet) -> list[nn.Module]:
    """The stem's norm and every block's, shortcuts included."""
    norms = [body.bn1]
    for name in LAYERS:
        for block in getattr(body, name):
            norms += [block.bn1, block.bn2, *([block.bn3] if isinstance(block, Bottleneck) else [])]
            if block.downsample is not None:
                norms.append(block.downsample[1])
    return norms


def blocked_applicable(body: ResNet, images: Tensor) -> bool:
    """Whether :func:`blocked_features` computes what the folded dense path would (see the module doc)."""
    if torch.compiler.is_compiling():
        return False
    return (
        not torch.is_grad_enabled()
        and images.device.type == "cpu"
        and images.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and all(isinstance(norm, FrozenBatchNorm2d) for norm in _norms(body))
        and not _has_hooks(body)
    )


def blocked_features(body: ResNet, weights: PackedWeights, images: Tensor, until: str) -> dict[str, Tensor]:
    """The outputs of ``body``'s layers up to ``until``, computed in the blocked layout.

    Args:
        images: ``[B, 3, H, W]`` float32 on the CPU.
        until: the last layer to run (``"layer3"`` or ``"layer4"``).
    Returns:
        ``{layer name: [B, C, H / stride, W / stride]}`` as ordinary (dense, NCHW) tensors.
    """
    packed = weights.get(body)
    x = body.maxpool(torch.relu(packed.stem(images.to_mkldnn())))  # [B, 64, H/4, W/4], blocked
    out: dict[str, Tensor] = {}
    for name in LAYERS:
        for block in packed.layers[name]:
            x = block(x)  # [B, C, H / stride, W / stride], blocked
        out[name] = x.to_dense()
        if name == until:
            break
    return out
