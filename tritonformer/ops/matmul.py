"""Matrix products: ``matmul`` (torch.matmul's batch broadcasting) and ``linear`` with a fused
bias + activation epilogue; autograd Functions with Triton backwards.

Every product is one launch of ``kernels.matmul.gemm``. Batch dims are handled without
copies where the strides allow: a (..., M, K) @ (K, N) product runs as one 2-D GEMM over the
flattened rows, other batches as strided batched GEMMs, and gradients of broadcast batch
dims are summed inside the kernel in fp32. The linear forward's epilogue adds the bias,
applies the activation and, when a gradient will be needed, also stores its input Z (what
torch saves for it too); the backward runs one elementwise pass (dZ = dY * act'(Z), with
dbias summed on the way; only dbias without an activation) and then two plain GEMMs,
dX = dZ W and dW = dZ^T X. Each gradient is written in its input's own dtype from the fp32
accumulator (fp32 master weights get fp32 gradients with no 16-bit round trip).
"""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.matmul import dz_and_dbias, gemm
from ..reference import ACTIVATIONS
from ..runtime import (
    DEVICE_TYPE,
    autocast_dtype,
    check_choice,
    check_same_device,
    check_same_dtype,
    check_tensor,
)


def _collapse(dims: list[tuple[int, tuple[int, ...]]]) -> list[tuple[int, tuple[int, ...]]]:
    """Merge adjacent (size, strides-per-tensor) dims that every tensor lays out as one."""
    out: list[tuple[int, tuple[int, ...]]] = []
    for size, strides in dims:
        if out and all(so == s * size for so, s in zip(out[-1][1], strides, strict=True)):
            out[-1] = (out[-1][0] * size, strides)
        else:
            out.append((size, strides))
    return out


def _contiguous_strides(sizes: list[int]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(sizes):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def _batched_gemm(
    x: torch.Tensor, y: torch.Tensor, keep: list[bool], out_dtype: torch.dtype
) -> torch.Tensor:
    """Sum over the batch dims not kept of x @ y; x (*batch, M, K), y (*batch, K, N).

    x and y share one batch shape (expanded views, stride 0 where broadcast). Returns the
    contiguous (*kept batch sizes, M, N) product, reduced in fp32 inside the kernel.
    """
    nb = x.dim() - 2
    m, k, n = x.shape[-2], x.shape[-1], y.shape[-1]
    kept = [i for i in range(nb) if keep[i] and x.shape[i] != 1]
    red = [i for i in range(nb) if not keep[i] and x.shape[i] != 1]
    x = x.permute(*kept, *red, nb, nb + 1)
    y = y.permute(*kept, *red, nb, nb + 1)
    kept_sizes = [x.shape[i] for i in range(len(kept))]
    out_strides = [s * m * n for s in _contiguous_strides(kept_sizes)]

    def plan(x, y):
        o = _collapse([(x.shape[i], (x.stride(i), y.stride(i), out_strides[i]))
                       for i in range(len(kept))])
        r = _collapse([(x.shape[i], (x.stride(i), y.stride(i)))
                       for i in range(len(kept), len(kept) + len(red))])
        return o, r

    o, r = plan(x, y)
    if len(o) > 2 or len(r) > 1:  # strides no batch layout of the kernel can follow
        x, y = x.contiguous(), y.contiguous()
        o, r = plan(x, y)
    o = [(1, (0, 0, 0))] * (2 - len(o)) + o
    r = r or [(1, (0, 0))]
    size5 = [o[0][0], o[1][0], r[0][0]]
    x5 = x.as_strided([*size5, m, k], [o[0][1][0], o[1][1][0], r[0][1][0], x.stride(-2),
                                       x.stride(-1)])
    y5 = y.as_strided([*size5, k, n], [o[0][1][1], o[1][1][1], r[0][1][1], y.stride(-2),
                                       y.stride(-1)])
    return gemm(x5, y5, out_dtype).c.view(*kept_sizes, m, n)


def _broadcast(a: torch.Size, b: torch.Size) -> tuple[int, ...] | None:
    """torch's broadcast of two batch shapes, or None when they don't broadcast (plain
    Python: torch.broadcast_shapes costs tens of microseconds per call)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and x != 1 and y != 1 for x, y in zip(a, b, strict=True)):
        return None
    return tuple(x if y == 1 else y for x, y in zip(a, b, strict=True))


def _rows(a: torch.Tensor) -> torch.Tensor | None:
    """a (..., M, K) as a (L*M, K) view, or None when its strides don't allow one."""
    try:
        return a.view(-1, a.shape[-1])
    except RuntimeError:
        return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype (t itself when it already is: ``Tensor.to`` costs ~1 us of host time)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _matmul_forward(ctx, a: torch.Tensor, b: torch.Tensor, batch: tuple[int, ...],
                    dt: torch.dtype) -> torch.Tensor:
    """The product in dtype ``dt``, batch dims ``batch`` (a's and b's broadcast), and with an
    autograd ``ctx`` what its backward needs (ctx None: no graph is recorded, nothing is
    saved)."""
    ac, bc = _cast(a, dt), _cast(b, dt)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if b.dim() == 2:
        a2 = ac if ac.dim() == 2 else _rows(ac)
    else:
        a2 = _rows(ac) if b.shape[:-2].numel() == 1 else None
    need_a, need_b = ctx.needs_input_grad[:2] if ctx is not None else (False, False)
    if a2 is not None:  # (..., M, K) @ (K, N): one 2-D GEMM over all rows
        x, y = a2, bc if bc.dim() == 2 else bc.view(k, n)
        out = gemm(x, y, dt).c
        out = out.view(*batch, m, n) if batch else out
    else:
        x, y = ac.expand(*batch, m, k), bc.expand(*batch, k, n)
        out = _batched_gemm(x, y, [True] * len(batch), dt).view(*batch, m, n)
    if ctx is not None:
        ctx.dtypes = (a.dtype, b.dtype)
        ctx.shapes = (a.shape, b.shape, batch)
        ctx.flat = a2 is not None
        ctx.save_for_backward(x if need_b else None, y if need_a else None)
    return out


def _records_grad(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> bool:
    """Whether autograd records an op on these inputs (else the ops skip their autograd
    Function, whose bookkeeping costs tens of microseconds per call)."""
    return torch.is_grad_enabled() and (
        a.requires_grad or b.requires_grad or (c is not None and c.requires_grad))


class MatmulFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, batch: tuple[int, ...],
                dt: torch.dtype) -> torch.Tensor:
        return _matmul_forward(ctx, a, b, batch, dt)

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dc: torch.Tensor):
        x, y = ctx.saved_tensors
        a_shape, b_shape, batch = ctx.shapes
        a_dtype, b_dtype = ctx.dtypes
        need_a, need_b = ctx.needs_input_grad[:2]
        da = db = None
        if ctx.flat:
            dc2 = dc.reshape(-1, dc.shape[-1])
            if need_a:  # dA = dC B^T
                da = gemm(dc2, y.t(), a_dtype).c.view(a_shape)
            if need_b:  # dB = A^T dC, reduced over all rows in fp32
                db = gemm(x.t(), dc2, b_dtype).c.view(b_shape)
            return da, db, None, None
        nb = len(batch)

        def keep(shape: torch.Size) -> list[bool]:
            lead = nb - (len(shape) - 2)
            return [i >= lead and shape[i - lead] != 1 for i in range(nb)]

        if need_a:
            da = _batched_gemm(dc, y.transpose(-1, -2), keep(a_shape), a_dtype).view(a_shape)
        if need_b:
            db = _batched_gemm(x.transpose(-1, -2), dc, keep(b_shape), b_dtype).view(b_shape)
        return da, db, None, None


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product with torch.matmul's batch broadcasting, the counterpart of ``a @ b``.

    Args:
        a: (*A, M, K), at least 2-D; fp32, fp16 or bf16; any strides.
        b: (*B, K, N), at least 2-D; same dtype and device as a (outside autocast).

    Returns:
        (*broadcast(A, B), M, N), contiguous, in the inputs' dtype, or the autocast dtype
        under torch.autocast (gradients come back in each input's own dtype). Accumulation
        is fp32; fp32 inputs use TF32 only when ``torch.backends.cuda.matmul.allow_tf32``.
        Transposed or strided inputs are read in place; (..., M, K) @ (K, N) runs as one
        2-D GEMM over the flattened rows when a's strides allow it.
    """
    check_tensor(a, "a", min_ndim=2)
    check_tensor(b, "b", min_ndim=2)
    check_same_device(a=a, b=b)
    dt = autocast_dtype()
    if dt is None:
        check_same_dtype(a=a, b=b)
        dt = a.dtype
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"a's last dimension ({a.shape[-1]}) must equal b's second-to-last ({b.shape[-2]}); "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    batch = () if a.dim() == b.dim() == 2 else _broadcast(a.shape[:-2], b.shape[:-2])
    if batch is None:
        raise ValueError(
            f"the batch dimensions of a {tuple(a.shape[:-2])} and b {tuple(b.shape[:-2])} "
            "do not broadcast"
        )
    if not _records_grad(a, b):
        return _matmul_forward(None, a, b, batch, dt)
    return MatmulFunction.apply(a, b, batch, dt)


def _linear_forward(ctx, x, weight, bias, activation: str | None,
                    dt: torch.dtype) -> torch.Tensor:
    """activation(x W^T + b) in dtype ``dt``, and with an autograd ``ctx`` what its backward
    needs, the activation's input Z = x W^T + b included (ctx None: no graph is recorded,
    nothing is saved)."""
    xc, wc = _cast(x, dt), _cast(weight, dt)  # the bias is read in its own dtype, into fp32
    flat = xc.dim() == 2
    x2 = xc if flat else xc.reshape(-1, x.shape[-1])
    y2, z = gemm(x2, wc.t(), dt, bias=bias, activation_name=activation,
                 save_z=ctx is not None and activation is not None)
    if ctx is not None:
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x2 if need_w else None, wc if need_x else None, z)
        ctx.activation = activation
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.x_shape = x.shape
    return y2 if flat else y2.view(*x.shape[:-1], weight.shape[0])


class LinearFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, x, weight, bias, activation: str | None, dt: torch.dtype) -> torch.Tensor:
        return _linear_forward(ctx, x, weight, bias, activation, dt)

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dy: torch.Tensor):
        x2, wc, z = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = dz = db = None
        want_dz = z is not None and (need_x or need_w)
        if want_dz or need_b:  # dZ = dY * act'(Z) and dbias, in one pass over dY
            dz, db = dz_and_dbias(dy2, z, ctx.activation, want_dz, b_dtype if need_b else None)
        dz = dy2 if dz is None else dz  # no activation: dZ is dY
        if need_x:  # dX = dZ W
            dx = gemm(dz, wc, x_dtype).c.view(ctx.x_shape)
        if need_w:  # dW = dZ^T X, reduced over every row in fp32
            dw = gemm(dz.t(), x2, w_dtype).c
        return dx, dw, db, None, None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias), the counterpart of ``F.linear`` plus an activation.

    Args:
        x: (..., in_features), fp32, fp16 or bf16, any strides (flattened to rows as
            ``x.reshape(-1, in_features)``, a view where the strides allow).
        weight: (out_features, in_features), torch's layout; read in place (no transpose copy).
        bias: optional (out_features,).
        activation: None, "relu", "gelu" (erf) or "gelu_tanh", applied to the fp32
            accumulator in the GEMM's epilogue (on sm_90's 16-bit path, exact GELU by a
            separate pass over Z in the output dtype, as torch's linear then gelu does).

    Returns:
        (..., out_features), contiguous, in the inputs' dtype (which must match outside
        autocast), or the autocast dtype under torch.autocast; gradients come back in each
        input's own dtype. When a gradient will be needed, the epilogue also stores
        Z = x W^T + b (in the output dtype) for the backward.
    """
    check_choice(activation, "activation", ACTIVATIONS)
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
    check_same_device(x=x, weight=weight, bias=bias)
    dt = autocast_dtype()
    if dt is None:
        check_same_dtype(x=x, weight=weight, bias=bias)
        dt = x.dtype
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal weight's in_features "
            f"({weight.shape[1]}); got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"bias must have weight's out_features ({weight.shape[0]}) elements, got "
            f"{tuple(bias.shape)}"
        )
    if not _records_grad(x, weight, bias):
        return _linear_forward(None, x, weight, bias, activation, dt)
    return LinearFunction.apply(x, weight, bias, activation, dt)
