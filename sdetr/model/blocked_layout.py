"""Inference in oneDNN's blocked memory layout, with the frozen batch norms applied in place.

On a CPU, PyTorch computes an NCHW float32 convolution with oneDNN, which works in a blocked
layout (``nChw16c`` on AVX-512: channels in blocks of 16, the block innermost). Each call
reorders the input into that layout and the output back to NCHW, two extra passes over the
activations. A ResNet whose activations stay in oneDNN's layout between convolutions
(``Tensor.to_mkldnn()``) skips those passes, and its convolutions return the same numbers bit
for bit: the same primitive computes them, only the copies differ.

PyTorch does not convolve every dense input with oneDNN: small ones (one image of a few
thousand pixels, or 1x1 convolutions on one thread) go to its own im2col kernel, which sums in
another order. :func:`dense_convolution_is_onednn` asks PyTorch which kernel the dense input
would get; where it is not oneDNN, the blocked path convolves that dense input the same way.

What the opaque layout lacks is a per-channel multiply and add, the frozen batch norm.
oneDNN's own batch norm computes ``(x - mean) * s + t`` with one fused multiply-add, which
rounds once where torchvision's ``x * s + t`` rounds twice. :func:`scale_shift_` runs the
frozen batch norm as torchvision's two operations, ``mul_`` then ``add_``, channel by channel,
on a dense tensor over the same memory, ``[N, C / b, H, W, b]``: bit for bit its result. ReLU
(``relu_``), the residual add (``add_``, oneDNN's sum) and max pooling run on the opaque
tensors directly and equal PyTorch's on finite numbers (a NaN comes out of oneDNN's ReLU as
0, where PyTorch keeps it).

The dense alias reads the layout from oneDNN's memory descriptor
(``torch.ops.mkldnn._get_mkldnn_serialized_md``) and accepts only what it can check: the
descriptor's dimensions must be the tensor's own, unpadded, float32, and its strides must be
exactly those of a packed ``nchw`` or ``nChw{b}c`` layout. Anything else (another oneDNN
version, another layout, channels padded to a whole block) takes the exact dense detour; and
:func:`blocked_layout_available` is false where even a stem-like convolution's output cannot
be aliased, so the backbone then stays NCHW rather than detour at every batch norm.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor, nn

__all__ = ["blocked_layout_available", "dense_convolution_is_onednn", "scale_shift_"]

# The serialized memory descriptor (oneDNN 3.x, as PyTorch 2.14 exposes it): byte offsets of
# the fields read here. Each field is checked against what the tensor itself says, so a
# different struct gives ``None``, not a wrong alias.
_NDIMS = 4  # int32
_DIMS = 8  # int64[12]
_DATA_TYPE = 104  # int32; dnnl_f32 = 3
_PADDED_DIMS = 112  # int64[12]
_PADDED_OFFSETS = 208  # int64[12]
_OFFSET0 = 304  # int64
_FORMAT_KIND = 312  # int32; dnnl_blocked = 2
_STRIDES = 320  # int64[12]
_INNER_NBLKS = 416  # int32
_INNER_BLKS = 424  # int64[12]
_INNER_IDXS = 520  # int64[12]
_F32 = 3
_BLOCKED = 2


def blocked_layout_available() -> bool:
    """Whether the blocked path can run here: oneDNN enabled now, the operators this module uses
    present, and a oneDNN convolution output that :func:`scale_shift_` can alias (checked once)."""
    if not torch.backends.mkldnn.enabled:  # a runtime switch: read on every call
        return False
    return _aliasable_here()


@functools.cache
def _aliasable_here() -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch._C, "_select_conv_backend"):
        return False
    if not all(hasattr(torch.ops.mkldnn, name) for name in ("data_ptr", "_nbytes", "_get_mkldnn_serialized_md")):
        return False
    conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)  # a stem-like convolution on a small batch
    with torch.no_grad():
        out = conv(torch.zeros(2, 3, 8, 8).to_mkldnn())  # [2, 64, 8, 8], oneDNN's layout
    return _blocked_alias(out) is not None


def dense_convolution_is_onednn(conv: nn.Conv2d, shape: torch.Size) -> bool:
    """Whether PyTorch convolves a dense NCHW float32 CPU input of ``shape`` ``[B, C, H, W]``
    with ``conv`` through oneDNN (else its own kernel, whose sums are ordered differently)."""
    # Never read, only its shape and kind: one element expanded, so asking allocates nothing
    # (an allocation the size of the input would also move glibc's mmap threshold).
    probe = torch.zeros((), dtype=torch.float32, device="cpu").expand(shape)
    backend = torch._C._select_conv_backend(  # type: ignore[attr-defined]
        probe, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups, None
    )
    return bool(backend == torch._C._ConvBackend.Mkldnn)  # type: ignore[attr-defined]


def scale_shift_(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` per channel, rounded after the multiply and after the add (as
    torchvision's frozen batch norm), in place on a oneDNN tensor.

    Args:
        x: opaque oneDNN float32 ``[B, C, H, W]``; overwritten.
        scale, shift: ``[C]``.
    Returns:
        ``x`` itself, or, where its layout cannot be aliased, a new oneDNN tensor computed on a
        dense copy (the same numbers).
    """
    alias = _blocked_alias(x)  # [B, C / b, H, W, b] over x's memory, used only here
    if alias is None:
        dense = x.to_dense()  # [B, C, H, W]
        return dense.mul_(scale.reshape(1, -1, 1, 1)).add_(shift.reshape(1, -1, 1, 1)).to_mkldnn()
    channels = (1, -1, 1, 1, alias.shape[-1])  # channel c = (c // b, c % b), as in the alias
    alias.mul_(scale.reshape(channels)).add_(shift.reshape(channels))
    return x


def _int(blob: bytes, offset: int, size: int) -> int:
    return int.from_bytes(blob[offset : offset + size], "little", signed=True)


def _int64s(blob: bytes, offset: int, count: int) -> list[int]:
    return [_int(blob, offset + 8 * i, 8) for i in range(count)]


def _blocked_alias(x: Tensor) -> Tensor | None:
    """A dense float32 tensor over the memory of the 4-D oneDNN tensor ``x``, or ``None``.

    Args:
        x: an opaque oneDNN (``x.is_mkldnn``) float32 tensor ``[N, C, H, W]``.
    Returns:
        ``[N, C / b, H, W, b]`` sharing ``x``'s memory, element ``[n, c // b, h, w, c % b]``
        being ``x[n, c, h, w]``: ``b`` is oneDNN's channel block (16 for ``nChw16c``, 1 for
        plain ``nchw``). Writing to it writes ``x``. It does not keep ``x`` alive: use it while
        ``x`` is referenced. ``None`` when the layout is not one of these, or cannot be read.
    """
    if not (x.is_mkldnn and x.dim() == 4 and x.dtype == torch.float32 and x.numel() > 0):
        return None
    blob = torch.ops.mkldnn._get_mkldnn_serialized_md(x).numpy().tobytes()
    if len(blob) < _INNER_IDXS + 8:
        return None
    shape = list(x.shape)
    n, c, h, w = shape
    if (
        _int(blob, _NDIMS, 4) != 4
        or _int64s(blob, _DIMS, 4) != shape
        or _int(blob, _DATA_TYPE, 4) != _F32
        or _int64s(blob, _PADDED_DIMS, 4) != shape
        or _int64s(blob, _PADDED_OFFSETS, 4) != [0, 0, 0, 0]
        or _int(blob, _OFFSET0, 8) != 0
        or _int(blob, _FORMAT_KIND, 4) != _BLOCKED
    ):
        return None
    blocks = _int(blob, _INNER_NBLKS, 4)
    if blocks == 0:
        block = 1
    elif blocks == 1 and _int64s(blob, _INNER_IDXS, 1) == [1]:
        block = _int64s(blob, _INNER_BLKS, 1)[0]
    else:
        return None
    if block < 1 or c % block:
        return None
    if _int64s(blob, _STRIDES, 4) != [c * h * w, h * w * block, w * block, block]:
        return None
    if torch.ops.mkldnn._nbytes(x) != x.numel() * 4:
        return None
    memory = (ctypes.c_float * x.numel()).from_address(torch.ops.mkldnn.data_ptr(x))
    return torch.frombuffer(memory, dtype=torch.float32).view(n, c // block, h, w, block)
