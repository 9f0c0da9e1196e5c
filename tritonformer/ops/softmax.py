"""Softmax along any dimension: autograd Function and functional API."""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.softmax import softmax_bwd, softmax_fwd
from ..runtime import DEVICE_TYPE, autocast_dtype, check_tensor


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., n) as a 2-D [rows, n] view with unit column stride, any row stride.

    A copy is made only when no such view exists (the last dimension is not unit-stride, or
    the leading dimensions cannot be merged into one stride).
    """
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SoftmaxFunction(torch.autograd.Function):
    """Softmax over the last dimension; y is saved for the backward (x is not)."""

    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        y = softmax_fwd(as_rows(x), out_dtype)
        if x.dim() != 2:
            y = y.view(x.shape)
        ctx.save_for_backward(y)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        dx = softmax_bwd(as_rows(y), as_rows(dy), ctx.x_dtype)
        return (dx if y.dim() == 2 else dx.view(y.shape)), None


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, the counterpart of ``torch.softmax(x, dim)``.

    Args:
        x: at least 1-D, non-empty, fp32/fp16/bf16, any layout. When ``dim`` is the last
            dimension and has unit stride (e.g. a contiguous x) nothing is copied; otherwise
            ``dim`` is moved last and that view copied once to contiguous memory.
        dim: the dimension to normalise, in [-x.dim(), x.dim()). Rows of any length work:
            long rows are processed in chunks with an online max and sum.

    Returns:
        A tensor shaped like x (a view with ``dim`` moved back into place when it was not
        last), computed in fp32 and returned in x's dtype; under torch.autocast in fp32
        (torch's autocast policy for softmax), written by the kernel directly. The gradient
        comes back in x's dtype.
    """
    check_tensor(x, "x", min_ndim=1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for x of shape "
                         f"{tuple(x.shape)}, got {dim}")
    dim = dim % x.dim()
    out_dtype = torch.float32 if autocast_dtype() is not None else x.dtype
    if dim == x.dim() - 1:
        return SoftmaxFunction.apply(x, out_dtype)
    return SoftmaxFunction.apply(x.movedim(dim, -1), out_dtype).movedim(-1, dim)
