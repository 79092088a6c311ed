"""The ResNet stem's max pool (3x3, stride 2, padding 1), computed faster with the same result.

PyTorch's CPU kernel for this pool is slow on NCHW tensors: on this project's 2-core machine it
took 80 ms for ResNet-50's stem output at 800x1333 and 9 ms for a quickstart batch (the full-width
ResNet-10 with this stem, the default until the patchify stem), about 4 %
of a forward, against 0.4-0.5 ms for the same pool on an NHWC (channels-last) tensor. A maximum
is exact whatever the order of comparisons, so the pool can be computed another way and give
the same numbers bit for bit:

- with autograd off: separably, a 3-tap stride-2 maximum along the rows, then along the columns
  (``torch.maximum`` on strided views; NaN propagates as in the pool);
- with autograd recording: PyTorch's own pool on a channels-last copy, whose argmax indices equal
  the NCHW kernel's, ties included (both keep the first maximum in window order; tested). The
  backward is then PyTorch's NCHW pool backward with those indices, so the gradient is the same
  and stays NCHW (a channels-last gradient made the ReLU's backward 6x slower). The separable
  form is not used here: ``torch.maximum`` splits the gradient between tied inputs, and a pool
  after a ReLU has many ties at zero.

:func:`stem_max_pool` falls back to the module itself wherever that could differ: another pool
geometry, an input that is not NCHW-contiguous (channels-last inputs already take the fast
kernel), forward hooks on the pool or global ones, and inside ``torch.compile`` (which generates
its own pool).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdetr.model.resnet_blocks import forward_hooks_on


def _max_3_stride_2(x: Tensor, dim: int) -> Tensor:
    """Maximum over windows of 3 with stride 2 and one element of padding along ``dim``.

    Args:
        x: any shape with ``n = x.shape[dim]``.
    Returns:
        contiguous, with ``ceil(n / 2)`` along ``dim``: output ``i`` is the maximum of inputs
        ``2i - 1``, ``2i`` and ``2i + 1`` that exist.
    """
    index: list[slice] = [slice(None)] * x.dim()
    index[dim] = slice(0, None, 2)
    even = x[tuple(index)]  # inputs 2i: ceil(n / 2) of them, one per output
    index[dim] = slice(1, None, 2)
    odd = x[tuple(index)]  # inputs 2i + 1: floor(n / 2) of them
    out = even.clone(memory_format=torch.contiguous_format)  # always a copy: written in place below
    right = out.narrow(dim, 0, odd.shape[dim])  # outputs with an input 2i + 1
    torch.maximum(right, odd, out=right)
    left = out.narrow(dim, 1, out.shape[dim] - 1)  # outputs i >= 1 have an input 2i - 1 = odd[i - 1]
    torch.maximum(left, odd.narrow(dim, 0, out.shape[dim] - 1), out=left)
    return out


def separable_max_pool(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 3, 2, 1)`` without autograd, bit for bit, in two 1-D passes.

    Args:
        x: ``[B, C, H, W]``.
    Returns:
        ``[B, C, ceil(H / 2), ceil(W / 2)]``, NCHW-contiguous.
    """
    return _max_3_stride_2(_max_3_stride_2(x, 2), 3)  # rows, then columns


#: The stem pool's geometry as ``aten.max_pool2d_with_indices`` takes it.
_GEOMETRY = ([3, 3], [2, 2], [1, 1], [1, 1], False)  # kernel, stride, padding, dilation, ceil_mode


class _ChannelsLastPool(torch.autograd.Function):
    """The stem pool through the channels-last kernel, with the NCHW kernel's backward."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        # x: [B, C, H, W] NCHW -> values and argmax indices [B, C, H', W'], both NCHW
        values, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *_GEOMETRY
        )
        return values.contiguous(), indices.contiguous()

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]
    ) -> None:
        ctx.save_for_backward(inputs[0], output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor, _: Tensor | None) -> Tensor:  # type: ignore[override]
        x, indices = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *_GEOMETRY, indices)


def is_stem_pool(pool: nn.Module) -> bool:
    """Whether ``pool`` is ResNet's stem pool: ``nn.MaxPool2d(3, 2, 1)``, dilation 1, floor mode."""
    if type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode:
        return False
    return all(
        value in (expected, (expected, expected))
        for value, expected in ((pool.kernel_size, 3), (pool.stride, 2), (pool.padding, 1), (pool.dilation, 1))
    )


def stem_max_pool(pool: nn.Module, x: Tensor) -> Tensor:
    """``pool(x)`` bit for bit (values and gradients), faster on NCHW inputs; see the module doc.

    Args:
        pool: the backbone's stem pool.
        x: ``[B, C, H, W]``, the stem's ReLU output.
    Returns:
        ``[B, C, ceil(H / 2), ceil(W / 2)]``, in ``x``'s memory format.
    """
    plain_input = x.dim() == 4 and x.is_contiguous()  # NCHW; channels-last inputs take the fast kernel already
    if forward_hooks_on((pool,)) or not is_stem_pool(pool) or not plain_input or torch.compiler.is_compiling():
        return pool(x)
    if torch.is_grad_enabled() and x.requires_grad:
        values, _ = _ChannelsLastPool.apply(x)  # [B, C, H', W'] NCHW
        return values
    return separable_max_pool(x)
