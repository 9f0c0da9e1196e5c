"""LayerNorm over the last dimension, and fused residual-add + LayerNorm: autograd Functions
and functional API."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.layer_norm import layer_norm_bwd, layer_norm_fwd
from ..runtime import (
    DEVICE_TYPE,
    FLOAT_DTYPES,
    autocast_dtype,
    check_choice,
    check_same_device,
    check_tensor,
)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an [M, N] view with unit column stride over its last dim (a copy only if the
    leading dims cannot be flattened into one row stride)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return t.dtype if t is not None else None


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, x, weight, bias, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        x2 = _rows(x)
        y, _, mean, rstd = layer_norm_fwd(x2, None, weight, bias, eps, out_dtype, None, x.shape)
        ctx.save_for_backward(x2, weight, mean, rstd)
        # The backward's arguments, decided here: the backward runs on autograd's device
        # thread, where Python runs several times slower (docs/perf/layer_norm_softmax.md).
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.meta = (x.dtype if need_x else None, _dtype(weight) if need_w else None,
                    _dtype(bias) if need_b else None, x.shape)  # fmt: skip
        return y

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx_dtype, dw_dtype, db_dtype, shape = ctx.meta
        dx, _, dw, db = layer_norm_bwd(
            x2, weight, _rows(dy), None, mean, rstd, dx_dtype, None, dw_dtype, db_dtype, shape
        )
        return dx, dw, db, None, None


class AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, x, residual, weight, bias, eps: float, out_dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        sum_dtype = torch.promote_types(x.dtype, residual.dtype)
        y, s, mean, rstd = layer_norm_fwd(
            _rows(x), _rows(residual), weight, bias, eps, out_dtype, sum_dtype, x.shape
        )
        ctx.save_for_backward(s, weight, mean, rstd)
        # The backward's arguments, decided here (as in LayerNormFunction). One kernel writes
        # the gradient of s for x and/or residual, in their dtypes; one tensor serves both
        # when they share a dtype.
        x_dtype, r_dtype = x.dtype, residual.dtype
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        first = x_dtype if need_x else (r_dtype if need_r else None)
        second = r_dtype if need_x and need_r and r_dtype != x_dtype else None
        ctx.meta = (x_dtype, r_dtype, need_x, need_r, first, second,
                    _dtype(weight) if need_w else None, _dtype(bias) if need_b else None)
        return s, y

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, ds: torch.Tensor | None, dy: torch.Tensor | None):
        s, weight, mean, rstd = ctx.saved_tensors
        x_dtype, r_dtype, need_x, need_r, first, second, dw_dtype, db_dtype = ctx.meta
        if dy is None:  # only s was used: the LayerNorm contributes nothing
            dx = ds.to(x_dtype) if need_x else None
            dr = ds.to(r_dtype) if need_r else None
            return dx, dr, None, None, None, None
        g1, g2, dw, db = layer_norm_bwd(
            _rows(s), weight, _rows(dy), _rows(ds) if ds is not None else None, mean, rstd,
            first, second, dw_dtype, db_dtype, s.shape,
        )  # fmt: skip
        dx = g1 if need_x else None
        dr = (g2 if g2 is not None else g1) if need_r else None
        return dx, dr, dw, db, None, None


def _check_param(t: torch.Tensor, name: str, n: int) -> None:
    check_tensor(t, name)
    if t.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) (x's last dimension), got {tuple(t.shape)}"
        )


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
) -> None:
    check_tensor(x, "x", min_ndim=1)
    n = x.shape[-1]
    dev = x.device
    if weight is not None:
        _check_param(weight, "weight", n)
    if bias is not None:
        _check_param(bias, "bias", n)
    if (weight is not None and weight.device != dev) or (bias is not None and bias.device != dev):
        check_same_device(x=x, weight=weight, bias=bias)
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, Real)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if out_dtype is not None:
        check_choice(out_dtype, "out_dtype", FLOAT_DTYPES)


def _out_dtype(out_dtype: torch.dtype | None, in_dtype: torch.dtype) -> torch.dtype:
    """The dtype of y: explicit, else fp32 under autocast (torch's policy), else the input's."""
    if out_dtype is not None:
        return out_dtype
    return torch.float32 if autocast_dtype() is not None else in_dtype


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias.

    The counterpart of ``torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)``.

    Args:
        x: (..., N), at least 1-D and non-empty, fp32/fp16/bf16, any strides (copied only if
            its last dim is not unit-stride or its leading dims cannot be flattened).
        weight, bias: None or (N,), each of any float dtype, on x's device; independently
            optional.
        eps: > 0, added to the variance.
        out_dtype: keyword-only; the dtype of y. By default y has x's dtype, or fp32 under
            torch.autocast (torch runs layer_norm in fp32 there); the kernel writes it directly.

    Returns:
        y of x's shape, contiguous. Mean and variance are computed in fp32 whatever the
        dtypes; gradients come back in the dtype of each input (weight/bias gradients reduced
        over rows in fp32).
    """
    _check_args(x, weight, bias, eps, out_dtype)
    return LayerNormFunction.apply(
        x, _contiguous(weight), _contiguous(bias), float(eps), _out_dtype(out_dtype, x.dtype)
    )


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + LayerNorm (the pre-LN step): s = x + residual, y = layer_norm(s).

    Args:
        x: (..., N), fp32/fp16/bf16, any strides (e.g. a block's output).
        residual: same shape as x, fp32/fp16/bf16 (the residual stream); its dtype may differ
            from x's.
        weight, bias, eps: as in ``layer_norm``.
        out_dtype: keyword-only; the dtype of y (default: s's dtype, or fp32 under autocast).

    Returns:
        (s, y), both of x's shape and contiguous: s = x + residual in
        ``torch.promote_types(x.dtype, residual.dtype)`` (the new residual stream), and y the
        LayerNorm of s. Gradients from both outputs flow into x and residual, each in its own
        dtype.
    """
    _check_args(x, weight, bias, eps, out_dtype)
    check_tensor(residual, "residual")
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    check_same_device(x=x, residual=residual)
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    return AddLayerNormFunction.apply(
        x, residual, _contiguous(weight), _contiguous(bias), float(eps),
        _out_dtype(out_dtype, sum_dtype),
    )  # fmt: skip
